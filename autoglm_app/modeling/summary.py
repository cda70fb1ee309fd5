"""Per-sub-module accounting of parameters and bytes, 4-bit layers included.

A bitsandbytes 4-bit weight is stored packed (two values per uint8) with its
quantization state (absmax, and with double quantization the nested absmax and
code books) beside it; we count the original number of values as parameters and
every stored byte as memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


def quant_state_bytes(state) -> int:
    """Bytes held by a bitsandbytes QuantState (absmax, code, nested state)."""
    total = 0
    for name in ("absmax", "code", "offset"):
        t = getattr(state, name, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += quant_state_bytes(nested)
    return total


def tensor_stats(p: torch.Tensor) -> tuple[int, int, str]:
    """(parameter count, bytes held, dtype label) for one parameter or buffer."""
    state = getattr(p, "quant_state", None)
    if state is not None:
        count = math.prod(state.shape)
        return count, p.numel() * p.element_size() + quant_state_bytes(state), "nf4"
    return p.numel(), p.numel() * p.element_size(), str(p.dtype).replace("torch.", "")


@dataclass
class Row:
    name: str
    params: int = 0
    bytes: int = 0
    dtypes: set = field(default_factory=set)
    devices: set = field(default_factory=set)

    def add(self, p: torch.Tensor) -> None:
        count, nbytes, dtype = tensor_stats(p)
        self.params += count
        self.bytes += nbytes
        self.dtypes.add(dtype)
        self.devices.add(str(p.device))


def module_rows(model: nn.Module) -> list[Row]:
    """Group parameters into the rows a person reads: towers, adapter, each layer's parts, head."""
    rows: dict[str, Row] = {}
    for name, p in model.named_parameters():
        rows.setdefault(row_name(name), Row(row_name(name))).add(p)
    return list(rows.values())


def row_name(param_name: str) -> str:
    parts = param_name.split(".")
    if parts[0] == "model":
        parts = parts[1:]
    head = parts[0]
    if head in ("vision_tower", "audio_tower", "embed_tokens", "norm"):
        return head
    if head == "adapter":
        return ".".join(parts[:2])
    if head == "layers":
        layer = f"layers.{parts[1]}"
        if parts[2] == "mlp":
            if len(parts) > 3 and parts[3] == "router":
                return f"{layer}.router"
            if len(parts) > 3 and parts[3] == "experts":
                return f"{layer}.experts"
            return f"{layer}.mlp"
        return f"{layer}.attention"  # attention, its norms and memory slots
    return head


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def total_parameters(model: nn.Module) -> int:
    return sum(tensor_stats(p)[0] for p in model.parameters())


def total_bytes(model: nn.Module) -> int:
    return sum(tensor_stats(p)[1] for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


def summarize(model: nn.Module) -> str:
    rows = module_rows(model)
    lines = [f"{'module':<24} {'params':>12} {'dtype':<16} {'device':<14} {'bytes':>11}"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        lines.append(
            f"{r.name:<24} {r.params:>12,} {','.join(sorted(r.dtypes)):<16} "
            f"{','.join(sorted(r.devices)):<14} {human_bytes(r.bytes):>11}"
        )
    lines.append("-" * len(lines[0]))
    total_p = sum(r.params for r in rows)
    total_b = sum(r.bytes for r in rows)
    lines.append(f"{'total':<24} {total_p:>12,} {'':<16} {'':<14} {human_bytes(total_b):>11}")
    return "\n".join(lines)
