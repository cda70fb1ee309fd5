"""Device planning: how many bytes each part of the model holds, and which device holds it.

The model is cut into *placement units* that are never split across devices:

    model.vision_tower, model.audio_tower, model.adapter, model.embed_tokens,
    model.layers.0 ... model.layers.{N-1}, model.norm, lm_head

The encoders, the adapter and the embeddings go on the first device (the
multimodal prefix is built there), ``norm`` and ``lm_head`` on the last, and the
decoder layers are cut into contiguous runs, one per device, chosen to minimise
the largest per-device total. Everything here runs on the ``meta`` device: the
9B configuration is planned in about a second without allocating its weights.
The bytes of a quantized weight come from ``quantize`` (what bitsandbytes stores).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from ..config import normalize_device_text, parse_gpus
from .quantize import int8_weight_bytes, is_kept_16bit, nf4_weight_bytes

logger = logging.getLogger(__name__)

GiB = 1024**3

BYTES_PER_PARAM = {"fp32": 4, "fp16": 2, "bf16": 2, "int4": 2, "int8": 2}  # non-quantized tensors

ENCODER_UNITS = ("model.vision_tower", "model.audio_tower", "model.adapter", "model.embed_tokens")
HEAD_UNITS = ("model.norm", "lm_head")


class PlanError(ValueError):
    """The model does not fit the devices and budget given."""


# ----------------------------------------------------------------------------- helpers


def parse_memory(text: str | int) -> int:
    """'24GiB' / '24 GB' / '512MiB' / '512MB' / '1024' (bytes) -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read memory size {text!r}: use e.g. 24GiB, 24GB, 512MiB or 512MB")
    value, unit = float(match.group(1)), (match.group(2) or "B").upper()
    if unit == "B":
        scale = 1
    else:
        power = "KMGT".index(unit[0]) + 1
        scale = (1024 if "I" in unit else 1000) ** power
    return int(value * scale)


def normalize_device(device: Any) -> int | str:
    """0 / '0' / 'cuda:0' / torch.device('cuda', 0) -> 0 ; 'cpu' -> 'cpu' (what accelerate's device maps take)."""
    if isinstance(device, torch.device):
        device = str(device) if device.index is None else (device.index if device.type == "cuda" else str(device))
    if isinstance(device, int):
        return device
    return normalize_device_text(device)


def device_label(device: int | str) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def placement_unit(param_name: str) -> str:
    """The placement unit a parameter or buffer belongs to."""
    parts = param_name.split(".")
    if parts[0] == "model":
        if len(parts) > 2 and parts[1] == "layers":
            return ".".join(parts[:3])
        return ".".join(parts[:2])
    return parts[0]


def placement_units(num_layers: int) -> list[str]:
    return [*ENCODER_UNITS, *(f"model.layers.{i}" for i in range(num_layers)), *HEAD_UNITS]


# ----------------------------------------------------------------------------- estimation


def build_on_meta(config_or_model: Any) -> nn.Module:
    """An AutoGLM model on the meta device (no memory) from a config, a config path or a model."""
    if isinstance(config_or_model, nn.Module):
        return config_or_model
    from autoglm_app.modeling import AutoGLMConfig, AutoGLMForConditionalGeneration

    config = load_config(config_or_model) if not isinstance(config_or_model, AutoGLMConfig) else config_or_model
    with torch.device("meta"):
        return AutoGLMForConditionalGeneration(config)


def load_config(source: Any):
    """AutoGLMConfig from a config object, a JSON file, a checkpoint directory or a dict."""
    from autoglm_app.modeling import AutoGLMConfig

    if isinstance(source, AutoGLMConfig):
        return source
    if isinstance(source, dict):
        return AutoGLMConfig(**{k: v for k, v in source.items() if k != "model_type"})
    path = os.fspath(source)
    if os.path.isdir(path):
        return AutoGLMConfig.from_pretrained(path)
    if os.path.isfile(path):
        with open(path) as f:
            data = json.load(f)
        if data.get("model_type", "autoglm") != "autoglm":
            raise ValueError(f"{path} is a {data.get('model_type')!r} config, not an AutoGLM one")
        return AutoGLMConfig.from_json_file(path)
    raise FileNotFoundError(f"no model config at {path!r} (give a config JSON file or a checkpoint directory)")


def estimate_module_bytes(model_on_meta: nn.Module, quantize: str) -> dict[str, int]:
    """Bytes each placement unit holds once loaded with ``quantize`` (int4/int8/fp16/bf16/fp32).

    int4: every nn.Linear weight outside KEEP_16BIT is NF4 with double quantization;
    int8: those weights are LLM.int8 (1 byte per value + a float32 scale per row);
    everything else (biases, kept modules, norms, embeddings) is 16-bit when quantizing,
    and the chosen dtype's size otherwise.
    """
    if quantize not in BYTES_PER_PARAM:
        raise ValueError(f"unknown quantize {quantize!r}; choose one of {sorted(BYTES_PER_PARAM)}")
    plain = BYTES_PER_PARAM[quantize]
    sizes: dict[str, int] = {}
    for module_name, module in model_on_meta.named_modules():
        quantized = (
            quantize in ("int4", "int8") and isinstance(module, nn.Linear) and not is_kept_16bit(module_name)
        )
        for pname, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            unit = placement_unit(full)
            if quantized and pname == "weight":
                if quantize == "int4":
                    nbytes = nf4_weight_bytes(p.numel())
                else:
                    nbytes = int8_weight_bytes(p.shape[0], p.shape[1])
            else:
                nbytes = p.numel() * plain
            sizes[unit] = sizes.get(unit, 0) + nbytes
        for bname, b in module.named_buffers(recurse=False):
            full = f"{module_name}.{bname}" if module_name else bname
            size = plain if b.is_floating_point() else b.element_size()
            sizes[placement_unit(full)] = sizes.get(placement_unit(full), 0) + b.numel() * size
    return sizes


# ----------------------------------------------------------------------------- planning


@dataclass
class Plan:
    """Where each placement unit goes, and the estimated bytes on each device."""

    device_map: dict[str, int | str]
    bytes_per_device: dict[str, int]  # keyed by device label ('cuda:0', 'cpu', or 'cpu#1' for repeats)
    total_bytes: int
    quantize: str
    budget_bytes_per_device: int = 0
    devices: list[int | str] = field(default_factory=list)
    slot_labels: list[str] = field(default_factory=list)
    units_per_slot: list[list[str]] = field(default_factory=list)

    def layers_on(self, slot: int) -> list[int]:
        return [int(u.rsplit(".", 1)[1]) for u in self.units_per_slot[slot] if u.startswith("model.layers.")]

    def table(self) -> str:
        """Which units and layers sit on which device, and the estimated GiB per device."""
        rows = [f"{'device':<10} {'holds':<66} {'est. GiB':>9}"]
        rows.append("-" * len(rows[0]))
        for slot, label in enumerate(self.slot_labels):
            units = self.units_per_slot[slot]
            parts = [u.split(".")[-1] for u in units if u in ENCODER_UNITS]
            layers = self.layers_on(slot)
            if layers:
                span = f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
                parts.append(f"{span} ({len(layers)})")
            parts += [u.split(".")[-1] for u in units if u in HEAD_UNITS]
            rows.append(f"{label:<10} {', '.join(parts) or '-':<66} {self.bytes_per_device[label] / GiB:>9.2f}")
        rows.append("-" * len(rows[0]))
        budget = f"{self.quantize}, budget {self.budget_bytes_per_device / GiB:.2f} GiB per device"
        rows.append(f"{'total':<10} {budget:<66} {self.total_bytes / GiB:>9.2f}")
        return "\n".join(rows)


def _slot_labels(devices: list[int | str]) -> list[str]:
    labels = [device_label(d) for d in devices]
    return [f"{lab}#{i}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]


def _balanced_partition(fixed: list[int], layers: list[int]) -> list[int]:
    """Cut ``layers`` into len(fixed) contiguous runs minimising max(fixed[d] + run_d).

    Returns the run boundaries (len(fixed) + 1 indices). Exact DP over contiguous
    partitions, O(D * L^2), tiny for any real model; ties go to the earliest cut.
    """
    D, L = len(fixed), len(layers)
    prefix = [0]
    for b in layers:
        prefix.append(prefix[-1] + b)
    INF = float("inf")
    # best[d][j]: minimal max load placing the first j layers on devices 0..d.
    best = [[INF] * (L + 1) for _ in range(D)]
    cut = [[0] * (L + 1) for _ in range(D)]
    for j in range(L + 1):
        best[0][j] = fixed[0] + prefix[j]
    for d in range(1, D):
        for j in range(L + 1):
            for i in range(j + 1):
                load = max(best[d - 1][i], fixed[d] + prefix[j] - prefix[i])
                if load < best[d][j]:
                    best[d][j], cut[d][j] = load, i
    bounds = [L]
    for d in range(D - 1, 0, -1):
        bounds.append(cut[d][bounds[-1]])
    bounds.append(0)
    return bounds[::-1]


def plan_device_map(
    config_or_model: Any, devices: list, budget_bytes_per_device: int | str, quantize: str
) -> Plan:
    """Place the model on ``devices`` (GPU indices, 'cuda:N' or 'cpu') within a per-device byte budget.

    Encoders, adapter and embeddings on the first device; norm and lm_head on the last;
    decoder layers contiguous, never split, balanced to minimise the busiest device.
    Raises PlanError (saying how much is missing) when it does not fit.
    """
    if not devices:
        raise ValueError("plan_device_map needs at least one device")
    budget = parse_memory(budget_bytes_per_device)
    devs = [normalize_device(d) for d in devices]
    labels = _slot_labels(devs)
    model = build_on_meta(config_or_model)
    sizes = estimate_module_bytes(model, quantize)
    num_layers = len(model.model.layers)
    units = placement_units(num_layers)
    unknown = set(sizes) - set(units)
    if unknown:
        raise ValueError(f"parameters outside the placement units: {sorted(unknown)}")
    layer_bytes = [sizes.get(f"model.layers.{i}", 0) for i in range(num_layers)]
    fixed = [0] * len(devs)
    fixed[0] += sum(sizes.get(u, 0) for u in ENCODER_UNITS)
    fixed[-1] += sum(sizes.get(u, 0) for u in HEAD_UNITS)
    bounds = _balanced_partition(fixed, layer_bytes)

    device_map: dict[str, int | str] = {}
    units_per_slot: list[list[str]] = [[] for _ in devs]
    for u in ENCODER_UNITS:
        device_map[u] = devs[0]
        units_per_slot[0].append(u)
    for slot in range(len(devs)):
        for i in range(bounds[slot], bounds[slot + 1]):
            device_map[f"model.layers.{i}"] = devs[slot]
            units_per_slot[slot].append(f"model.layers.{i}")
    for u in HEAD_UNITS:
        device_map[u] = devs[-1]
        units_per_slot[-1].append(u)
    loads = [fixed[s] + sum(layer_bytes[bounds[s] : bounds[s + 1]]) for s in range(len(devs))]
    total = sum(sizes.values())
    plan = Plan(
        device_map=device_map,
        bytes_per_device=dict(zip(labels, loads)),
        total_bytes=total,
        quantize=quantize,
        budget_bytes_per_device=budget,
        devices=devs,
        slot_labels=labels,
        units_per_slot=units_per_slot,
    )
    worst = max(loads)
    if worst > budget:
        short_total = total - budget * len(devs)
        busiest = labels[loads.index(worst)]
        detail = (
            f"the model needs {total / GiB:.2f} GiB in {quantize}; {len(devs)} device(s) x "
            f"{budget / GiB:.2f} GiB = {budget * len(devs) / GiB:.2f} GiB"
        )
        if short_total > 0:
            detail += f", {short_total / GiB:.2f} GiB missing in total"
        detail += (
            f"; the busiest device ({busiest}) would need {worst / GiB:.2f} GiB, "
            f"{(worst - budget) / GiB:.2f} GiB over its budget (decoder layers are never split)"
        )
        fixes = (["use --quantize int4"] if quantize != "int4" else []) + [
            "raise --gpu-memory if the GPUs have that much free", "list more GPUs in --gpus (e.g. --gpus 0,1)"]
        raise PlanError(f"the model does not fit: {detail}. Fix: {', or '.join(fixes)}.\n{plan.table()}")
    return plan


# ----------------------------------------------------------------------------- CLI


def parse_devices(gpus: str | Iterable | None) -> list[int | str]:
    """'0,1' / 'cuda:0,cpu' (through the one --gpus parser) / [0, 'cpu', torch.device] -> normalized devices."""
    if isinstance(gpus, str):
        return parse_gpus(gpus) or []
    return [normalize_device(g) for g in gpus or [] if str(g) != ""]


def run_plan(gpus: str, gpu_memory: str, quantize: str, model_config: str) -> str:
    """Plan ``model_config`` over ``gpus`` with ``gpu_memory`` each; return (and log) the table.

    Needs no GPU: the model is built on the meta device only.
    """
    devices = parse_devices(gpus) or ["cpu"]
    plan = plan_device_map(load_config(model_config), devices, parse_memory(gpu_memory), quantize)
    table = plan.table()
    logger.info("device plan for %s:\n%s", model_config, table)
    return table
