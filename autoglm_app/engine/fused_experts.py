"""INT4 for MoE experts stored as fused 3-D tensors.

transformers 5 keeps the experts of Qwen3-VL-MoE, GLM-4.5V and Qwen3-Omni-MoE as two parameters,
``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I), which bitsandbytes does not quantize: the
bulk of such a model would stay 16-bit. ``split_fused_experts`` replaces each fused module by
``SplitExperts``: one ``bnb.nn.Linear4bit`` (NF4, double quantization) per expert and projection,
with the fused module's forward signature, so the MoE block and its router stay as they are.

Layers are converted one at a time and each fused tensor is released as soon as its experts are
packed, so the extra memory of the conversion is one layer's experts at a time.
"""

from __future__ import annotations

import gc
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def is_fused_experts(module: nn.Module) -> bool:
    p = getattr(module, "gate_up_proj", None)
    return isinstance(p, nn.Parameter) and p.dim() == 3 and getattr(module, "down_proj", None) is not None


def _linear4bit(weight: torch.Tensor, compute_dtype: torch.dtype, device) -> nn.Module:
    """(out, in) 16-bit weight -> a packed NF4 Linear4bit on ``device`` (quantized as it moves there)."""
    import bitsandbytes as bnb

    out_f, in_f = weight.shape
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=compute_dtype, compress_statistics=True,
                              quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(weight.detach().to("cpu", compute_dtype).contiguous(), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)
    return layer.to(device)


class SplitExperts(nn.Module):
    """Per-expert 4-bit SwiGLU experts with the forward of transformers' fused ``*TextExperts``."""

    def __init__(self, fused: nn.Module, compute_dtype: torch.dtype = torch.float16):
        super().__init__()
        E = fused.gate_up_proj.shape[0]
        device = fused.gate_up_proj.device
        self.num_experts = E
        self.act_fn = fused.act_fn
        self.gate_up_proj = nn.ModuleList(_linear4bit(fused.gate_up_proj[e], compute_dtype, device) for e in range(E))
        self.down_proj = nn.ModuleList(_linear4bit(fused.down_proj[e], compute_dtype, device) for e in range(E))

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


def module_bytes(module: nn.Module) -> int:
    """Bytes a module holds: parameters (4-bit ones with their quantization state) and buffers."""
    from autoglm_app.modeling.summary import total_bytes

    return total_bytes(module)
