"""Model families: what the engine must know of each architecture, chosen by ``model_type``.

``base`` is the interface; ``autoglm`` the project's own architecture; ``hf`` the transformers-native
checkpoints (GLM-4.1V/4.5V, Qwen2.5/3-VL, Qwen2.5/3-Omni); ``probe_attention`` the probed kernels
those use for focus.
"""

from __future__ import annotations

from .autoglm import AUTOGLM, AutoGLMFamily
from .base import ModelFamily, Prepared
from .hf import HF_FAMILIES, HFFamily


def family_for(model_or_config) -> ModelFamily:
    """The family of a model or a config, chosen by its ``model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", "")
    if model_type == "autoglm":
        return AUTOGLM
    if model_type in HF_FAMILIES:
        return HF_FAMILIES[model_type]
    supported = ", ".join(["autoglm", *HF_FAMILIES])
    raise ValueError(f"no model family for model_type {model_type!r}; supported: {supported}")


__all__ = ["AUTOGLM", "AutoGLMFamily", "HF_FAMILIES", "HFFamily", "ModelFamily", "Prepared", "family_for"]
