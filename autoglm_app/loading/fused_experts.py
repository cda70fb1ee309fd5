"""INT4 for MoE experts stored as fused 3-D tensors.

transformers 5 keeps the experts of Qwen3-VL-MoE, GLM-4.5V and Qwen3-Omni-MoE as two parameters,
``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I), which bitsandbytes does not quantize: the
bulk of such a model would stay 16-bit. ``SplitExperts`` replaces each fused module: one
``bnb.nn.Linear4bit`` (NF4, double quantization) per expert and projection, with the fused module's
forward signature, so the MoE block and its router stay as they are.

Two ways to get there:

- **streamed** (what the loader uses): ``streamed_expert_split()`` wraps ``from_pretrained``. transformers
  reads the checkpoint one tensor at a time under on-the-fly quantization (its conversion ops, e.g. merging
  per-expert weights into a fused tensor, or transposing, run per target tensor); each fused expert tensor
  is packed to 4-bit the moment it is produced and never set on the model, so the 16-bit experts are never
  all in memory: the extra host memory of the load is one fused tensor (one layer's gate_up or down
  projections) at a time, on top of the 4-bit model.
- **after the fact**: ``split_fused_experts(model)`` converts a model that already holds 16-bit fused
  experts, layer by layer (the fallback, and for models built in memory).

``python -m tools.fused_memory`` measures the peak host memory of both paths (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import gc
import logging
import threading
from contextlib import contextmanager

import torch
from torch import nn

from .quantize import linear4bit

log = logging.getLogger(__name__)

FUSED_NAMES = ("gate_up_proj", "down_proj")


def is_fused_experts(module: nn.Module) -> bool:
    p = getattr(module, "gate_up_proj", None)
    return isinstance(p, nn.Parameter) and p.dim() == 3 and getattr(module, "down_proj", None) is not None


class SplitExperts(nn.Module):
    """Per-expert 4-bit SwiGLU experts with the forward of transformers' fused ``*TextExperts``.

    ``SplitExperts(fused)`` converts a loaded fused module; ``SplitExperts.empty_like(fused)`` is a skeleton
    that ``load_fused`` fills one fused tensor at a time (the streamed load).
    """

    def __init__(self, fused: nn.Module | None = None, compute_dtype: torch.dtype = torch.float16, *,
                 num_experts: int | None = None, act_fn=None):
        super().__init__()
        self.compute_dtype = compute_dtype
        self.num_experts = fused.gate_up_proj.shape[0] if fused is not None else int(num_experts)
        self.act_fn = fused.act_fn if fused is not None else act_fn
        self.gate_up_proj = nn.ModuleList()
        self.down_proj = nn.ModuleList()
        if fused is not None:
            device = fused.gate_up_proj.device
            for name in FUSED_NAMES:
                self.load_fused(name, getattr(fused, name), device)

    @classmethod
    def empty_like(cls, fused: nn.Module, compute_dtype: torch.dtype = torch.float16) -> "SplitExperts":
        return cls(num_experts=fused.gate_up_proj.shape[0], act_fn=fused.act_fn, compute_dtype=compute_dtype)

    def load_fused(self, name: str, tensor: torch.Tensor, device=None) -> None:
        """Pack a fused (E, out, in) tensor into one Linear4bit per expert (replacing any earlier ones)."""
        if name not in FUSED_NAMES or tensor.dim() != 3 or tensor.shape[0] != self.num_experts:
            raise ValueError(f"expected {FUSED_NAMES} of shape ({self.num_experts}, out, in), got {name} "
                             f"{tuple(tensor.shape)}")
        device = tensor.device if device is None else device
        setattr(self, name, nn.ModuleList(linear4bit(tensor[e], self.compute_dtype, device)
                                          for e in range(self.num_experts)))

    @property
    def complete(self) -> bool:
        return len(self.gate_up_proj) == len(self.down_proj) == self.num_experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        # hidden_states (N, H); top_k_index / top_k_weights (N, k)
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            if not 0 <= e < self.num_experts:
                continue
            token, slot = torch.where(top_k_index == e)
            gate, up = self.gate_up_proj[e](hidden_states[token]).chunk(2, dim=-1)
            y = self.down_proj[e](self.act_fn(gate) * up) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def split_fused_experts(model: nn.Module, compute_dtype: torch.dtype = torch.float16) -> int:
    """Replace every fused experts module in ``model`` by SplitExperts; returns how many were split."""
    targets = [(name, m) for name, m in model.named_modules() if is_fused_experts(m)]
    for name, fused in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, SplitExperts(fused, compute_dtype))
        del fused
        gc.collect()
    if targets:
        log.info("split %d fused expert modules into per-expert 4-bit layers", len(targets))
    return len(targets)


# ----------------------------------------------------------------------------- streamed split at load time

_STREAM_LOCK = threading.RLock()


def _release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    A fused tensor is tens to hundreds of MiB; after it is packed, glibc keeps the freed 16-bit block in its heap
    (the packed 4-bit blocks allocated meanwhile pin it), so without this the resident size still grows with
    every layer even though nothing 16-bit is alive.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def _is_4bit_quantizer(hf_quantizer) -> bool:
    config = getattr(hf_quantizer, "quantization_config", None)
    return bool(getattr(config, "load_in_4bit", False))


@contextmanager
def streamed_expert_split(compute_dtype: torch.dtype = torch.float16):
    """Within this block, a 4-bit bitsandbytes ``from_pretrained`` packs fused expert tensors as they are read.

    transformers 5 sets every loaded tensor on the model through ``core_model_loading.set_param_for_module``;
    for the ``gate_up_proj`` / ``down_proj`` of a fused experts module this block packs the tensor into a
    ``SplitExperts`` kept aside for that module instead, so the 16-bit tensor is dropped at once (the fused
    module keeps its empty meta parameters while the load runs: transformers' conversion ops look at their
    shapes). When the block ends, each fused module is replaced by its SplitExperts. Other tensors, and loads
    that are not 4-bit, go through unchanged. Yields a dict: ``modules`` (how many were streamed),
    ``tensors``, ``bytes_16bit`` (the 16-bit bytes packed on the fly). Without that loader hook (another
    transformers version) nothing is streamed and ``split_fused_experts`` after the load does the work.
    """
    try:
        import transformers.core_model_loading as cml

        original = cml.set_param_for_module
    except (ImportError, AttributeError):  # pragma: no cover - other transformers versions
        log.warning("transformers has no set_param_for_module hook: fused experts are split after the load")
        yield {"modules": 0, "tensors": 0, "bytes_16bit": 0}
        return

    stats = {"modules": 0, "tensors": 0, "bytes_16bit": 0}
    pending: dict[int, tuple] = {}  # id(model) -> (model, {module path: SplitExperts})

    def set_param(model, target_name, param_value, loading_info, hf_quantizer, *args, **kwargs):
        module_path, _, leaf = target_name.rpartition(".")
        if (leaf in FUSED_NAMES and isinstance(param_value, torch.Tensor) and param_value.dim() == 3
                and _is_4bit_quantizer(hf_quantizer)):
            module = model.get_submodule(module_path) if module_path else model
            if is_fused_experts(module):
                splits = pending.setdefault(id(model), (model, {}))[1]
                split = splits.get(module_path)
                if split is None:
                    split = splits[module_path] = SplitExperts.empty_like(module, compute_dtype)
                _release_free_memory()  # the previous fused tensor (freed by now) goes back to the OS
                split.load_fused(leaf, param_value)
                loading_info.missing_keys.discard(target_name)
                stats["tensors"] += 1
                stats["bytes_16bit"] += param_value.numel() * 2
                return None
        return original(model, target_name, param_value, loading_info, hf_quantizer, *args, **kwargs)

    with _STREAM_LOCK:  # the hook is module-global: one streamed load at a time
        cml.set_param_for_module = set_param
        try:
            yield stats
        finally:
            cml.set_param_for_module = original
        for model, splits in pending.values():  # the load went through: put the packed experts in place
            for path, split in splits.items():
                parent_name, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, split)
            stats["modules"] += len(splits)
        pending.clear()
        _release_free_memory()


def check_split(model: nn.Module) -> int:
    """Raise unless every SplitExperts got both projections for all its experts; returns how many there are."""
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, SplitExperts)]
    broken = [n for n, m in modules if not m.complete]
    if broken:
        raise RuntimeError(f"fused experts not fully loaded (a projection missing from the checkpoint?): {broken[:4]}")
    return len(modules)


def module_bytes(module: nn.Module) -> int:
    """Bytes a module holds: parameters (4-bit ones with their quantization state) and buffers."""
    from autoglm_app.modeling.summary import total_bytes

    return total_bytes(module)
