"""Focus for transformers-native families: probed attention kernels in transformers' attention registry.

``probe_sdpa`` / ``probe_eager`` run the real kernel, then hand the module's post-rotary (M-RoPE
included) query and cached keys to the FocusProbe attached to that module (``module.focus_probe``).
"""

from __future__ import annotations

import sys

import torch

PROBE_PREFIX = "probe_"


def _probed(base: str):
    """An attention function that runs ``base`` (sdpa / eager) and feeds the module's focus probe, if any."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        if base == "eager":
            fn = sys.modules[type(module).__module__].eager_attention_forward
        else:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            fn = ALL_ATTENTION_FUNCTIONS[base]
        out, weights = fn(module, query, key, value, attention_mask, **kwargs)
        probe = getattr(module, "focus_probe", None)
        if probe is not None:
            mask = attention_mask
            if mask is not None and mask.dtype != torch.bool:
                mask = mask == 0  # additive float mask -> allowed positions
            probe(module.layer_idx, query, key, mask, weights, 0)
        return out, weights

    return attention


def register_probe_attention() -> None:
    """Register probe_sdpa / probe_eager with transformers' attention and mask interfaces (idempotent)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    for base, mask in (("sdpa", sdpa_mask), ("eager", eager_mask)):
        AttentionInterface.register(PROBE_PREFIX + base, _probed(base))
        ALL_MASK_ATTENTION_FUNCTIONS.register(PROBE_PREFIX + base, mask)


def install_probe_attention(attention_modules: list) -> None:
    """Switch the configs of ``attention_modules`` (the text config only) to the probed kernel."""
    register_probe_attention()
    for config in {id(m.config): m.config for m in attention_modules}.values():
        impl = config._attn_implementation or "sdpa"
        if not impl.startswith(PROBE_PREFIX):
            base = "eager" if impl == "eager" else "sdpa"
            config._attn_implementation_internal = PROBE_PREFIX + base
