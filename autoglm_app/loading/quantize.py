"""Everything about 4-bit (and int8) weights, in one place: which modules stay 16-bit, the bitsandbytes
config a load gets, the bytes a quantized weight takes, the check that a load quantized what it should,
and the construction of one NF4 layer from a 16-bit weight (the fused-expert split uses it).

The 16-bit dtype is float16 on GPUs *and* on the CPU: bitsandbytes' 4-bit CPU kernels run in float16,
and on the small test model float16 compute matched fp32 logits to 1.5e-3 relative L2 where bfloat16
was off by 1.4e-2 (its 8-bit mantissa), at about the same speed.

Byte estimates follow what bitsandbytes actually stores (see ``bitsandbytes.functional.quantize_4bit``):
an NF4 weight of ``n`` values is ``ceil(n / 2)`` packed bytes plus a ``QuantState`` with, under double
quantization, one uint8 absmax per 64-value block, a float32 ``offset``, the 16-entry float32 NF4 code,
and a nested state of one float32 absmax per 256 blocks with its own 256-entry float32 code book. This
is the same accounting as ``autoglm_app.modeling.summary.total_bytes``.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..config import QUANTIZE_CHOICES

__all__ = [
    "check_load",
    "KEEP_16BIT",
    "QUANTIZE_CHOICES",
    "QuantizationError",
    "compute_dtype",
    "converts",
    "default_quantize",
    "guard_cpu_int4_packing",
    "int8_weight_bytes",
    "is_kept_16bit",
    "keep_16bit_patterns",
    "linear4bit",
    "model_dtype",
    "nf4_weight_bytes",
    "quantization_config",
    "skip_patterns",
    "verify_quantized",
]

PLAIN_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Module names (path components) kept out of quantization, in a 16-bit dtype: the
# encoders, the adapter, the MoE router gates, the embeddings and the output head.
# Norms are not nn.Linear, so they are never quantized anyway.
KEEP_16BIT = ["vision_tower", "audio_tower", "adapter", "router", "embed_tokens", "lm_head"]

# Decoder projections that must be quantized (every layer's attention, every expert).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

NF4_BLOCKSIZE = 64  # bitsandbytes' default 4-bit block size
NESTED_BLOCKSIZE = 256  # double quantization: the absmax values are quantized in blocks of 256
NF4_CODE_BYTES = 16 * 4  # the NF4 code: 16 float32 values
NESTED_CODE_BYTES = 256 * 4  # the 8-bit dynamic code book of the nested state
OFFSET_BYTES = 4  # float32 mean subtracted from the absmax before nesting


class QuantizationError(RuntimeError):
    """A projection that should be quantized was loaded in full precision."""


# ----------------------------------------------------------------------------- which modules, which dtype


def is_kept_16bit(module_name: str) -> bool:
    """True when ``module_name`` lies inside one of the KEEP_16BIT modules."""
    parts = module_name.split(".")
    return any(key in parts for key in KEEP_16BIT)


def keep_16bit_patterns(names: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """KEEP_16BIT as transformers 5 skip patterns.

    transformers matches ``llm_int8_skip_modules`` from the start of a module's full
    name or as a suffix, so a bare 'router' would miss 'model.layers.0.mlp.router.classifier'
    and 'vision_tower' would miss 'model.vision_tower.vit...'. The pattern
    ``(?:.*\\.)?router`` matches the component anywhere, at a module boundary.
    """
    return [rf"(?:.*\.)?{name}" for name in (KEEP_16BIT if names is None else names)]


def skip_patterns(model: nn.Module, keep_16bit: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """What a bitsandbytes load leaves unconverted: the kept modules (as ``keep_16bit_patterns``) and the
    model's own ``_keep_in_fp32_modules``, as transformers' 4-bit and 8-bit quantizers assemble them."""
    return keep_16bit_patterns(keep_16bit) + list(getattr(model, "_keep_in_fp32_modules", None) or [])


def converts(module_name: str, module: nn.Module, patterns: list[str]) -> bool:
    """True when a bitsandbytes load turns this module into a 4-bit / 8-bit layer: an exact ``nn.Linear``
    (not a subclass) that no skip pattern matches, by transformers' own matching rule."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    return type(module) is nn.Linear and should_convert_module(module_name, patterns)


def default_quantize() -> str:
    """int4 on a GPU; fp32 on the CPU (the accurate choice where memory is rarely the limit)."""
    return "int4" if torch.cuda.is_available() else "fp32"


def compute_dtype() -> torch.dtype:
    """The 16-bit dtype for kept modules and 4-bit compute: float16 on GPU and CPU (see module docstring)."""
    return torch.float16


def model_dtype(quantize: str) -> torch.dtype:
    """The dtype a load with ``quantize`` gives the weights it does not quantize."""
    return compute_dtype() if quantize in ("int4", "int8") else PLAIN_DTYPES[quantize]


def quantization_config(quantize: str, keep_16bit: list[str] | tuple | None = None):
    """BitsAndBytesConfig for int4 (NF4, double quantization) or int8 (LLM.int8); None otherwise."""
    from transformers import BitsAndBytesConfig

    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown quantize {quantize!r}; choose one of {', '.join(QUANTIZE_CHOICES)}")
    if quantize == "int4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(),
            llm_int8_skip_modules=keep_16bit_patterns(keep_16bit),
        )
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep_16bit_patterns(keep_16bit))
    return None


# ----------------------------------------------------------------------------- bytes


def nf4_weight_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes bitsandbytes holds for one NF4 weight of ``numel`` values (packed data + QuantState)."""
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    packed = (numel + 1) // 2
    if not double_quant:
        return packed + blocks * 4 + NF4_CODE_BYTES
    nested_blocks = math.ceil(blocks / NESTED_BLOCKSIZE)
    return packed + blocks + OFFSET_BYTES + NF4_CODE_BYTES + nested_blocks * 4 + NESTED_CODE_BYTES


def int8_weight_bytes(out_features: int, in_features: int) -> int:
    """LLM.int8: one int8 per value plus one float32 scale per output row (SCB)."""
    return out_features * in_features + out_features * 4


# ----------------------------------------------------------------------------- one NF4 layer


def linear4bit(weight: torch.Tensor, dtype: torch.dtype, device) -> nn.Module:
    """(out, in) 16-bit weight -> a packed NF4 Linear4bit (double quantization) on ``device``.

    The weight is quantized as the layer moves there; the layer stays on the portable CPU path
    (see ``guard_cpu_int4_packing``). ``dtype`` is the layer's compute dtype.
    """
    import bitsandbytes as bnb

    out_f, in_f = weight.shape
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, compress_statistics=True,
                              quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(weight.detach().to("cpu", dtype).contiguous(), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)
    layer = layer.to(device)
    layer.support_avx512bf16_for_cpu = False
    return layer


def guard_cpu_int4_packing(model: nn.Module) -> int:
    """Keep every 4-bit layer on bitsandbytes' portable CPU path.

    On a CPU with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight in place on its first
    inference forward: the NF4 bytes change layout and the quantization statistics are unpacked to
    float32, so the layer no longer holds what the planner estimated and the Model tab reports (the
    small test model grew from 34.8 kB to 50.2 kB), and layers narrower than one quantization block
    (in_features 32 with 64-value blocks, as in tiny real-config MoE checkpoints) fail with a reshape
    error. The app's int4 path is for GPUs; on a CPU it must behave, and take the memory it said it
    would, whatever the CPU. Returns how many layers were switched."""
    import bitsandbytes as bnb

    switched = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


# ----------------------------------------------------------------------------- the proof after a load


def verify_quantized(model: nn.Module, quantize: str, family=None) -> int:
    """Raise QuantizationError unless every decoder projection and expert projection is quantized.

    For a transformers-native family (``family.layers_path``) every nn.Linear inside the decoder
    layers outside the family's 16-bit modules must be quantized, and no fused 3-D expert tensor
    may be left.

    Returns the number of quantized layers checked. A full-precision projection here would be a
    silent memory regression (a 9B model would no longer fit its GPUs).
    """
    if quantize not in ("int4", "int8"):
        return 0
    import bitsandbytes as bnb

    expected = bnb.nn.Linear4bit if quantize == "int4" else bnb.nn.Linear8bitLt
    layers_path = getattr(family, "layers_path", None)
    targets = _hf_targets(model, family) if layers_path else _autoglm_targets(model)
    checked = len(targets)
    wrong = [f"{name} ({type(m).__name__})" for name, m in targets if not isinstance(m, expected)]
    if wrong or not checked:
        raise QuantizationError(
            f"{quantize} load left {len(wrong)} of {checked} decoder projections unquantized "
            f"(expected {expected.__name__}): {', '.join(wrong[:8])}{' ...' if len(wrong) > 8 else ''}"
        )
    return checked


def _autoglm_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if name.startswith("model.layers.") and name.rsplit(".", 1)[-1] in ATTENTION_PROJECTIONS + EXPERT_PROJECTIONS
            and not is_kept_16bit(name)]


def _hf_targets(model: nn.Module, family) -> list[tuple[str, nn.Module]]:
    """Every nn.Linear and every fused 3-D expert module inside the decoder layers, outside the kept modules."""
    prefix, keep = family.layers_path + ".", set(family.keep_16bit)
    return [(name, m) for name, m in model.named_modules()
            if name.startswith(prefix) and not keep & set(name.split("."))
            and (isinstance(m, nn.Linear) or any(p.dim() == 3 for p in m.parameters(recurse=False)))]


def check_load(model: nn.Module, quantize: str, progress, family=None) -> int:
    """After any load or build: prove it quantized what it should (``verify_quantized``) and, for int4, that the
    CPU packing is usable (``guard_cpu_int4_packing``), as a stage of ``progress``; logs and returns the count."""
    progress.stage("checking the quantized layers")
    checked = verify_quantized(model, quantize, family)
    if quantize == "int4":
        guard_cpu_int4_packing(model)
    if checked:
        logging.getLogger("autoglm_app.loading.checkpoints").info("%d decoder projections verified %s", checked,
                                                                  quantize)
    return checked
