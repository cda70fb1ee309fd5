"""The seed's public API, as its article wrote it:

    from autoglm_app.seed import AutoGLMModel, MultiModalConfig
    config = MultiModalConfig(vision_encoder="vit-tiny", audio_encoder="qwenaudio-lite",
                              text_decoder="glm-tiny", quantize="int4")
    model = AutoGLMModel.from_pretrained("assets/autoglm-phone-tiny", config=config)
    print(model.summary())

``from_pretrained`` loads a checkpoint through the app's loader (quantization, device
plan) and checks that the checkpoint is the architecture the config names;
``from_config`` builds a fresh random-weight model from the config alone.
"""

from __future__ import annotations

import logging

from .config import MultiModalConfig

log = logging.getLogger(__name__)

__all__ = ["AutoGLMModel", "MultiModalConfig"]


class AutoGLMModel:
    @staticmethod
    def from_pretrained(name_or_path: str, config: MultiModalConfig | None = None, **load_kwargs):
        from .loading.checkpoints import load_model

        quantize = config.quantize if config is not None else None
        loaded = load_model(name_or_path, quantize=quantize, **load_kwargs)
        model = loaded.model
        if config is not None and getattr(model.config, "model_type", "") == "autoglm":
            wanted = config.to_autoglm_kwargs()
            clashes = {k: (v, getattr(model.config, k)) for k, v in wanted.items()
                       if k in ("vision_model", "num_mel_bins") and getattr(model.config, k) != v}
            if clashes:
                log.warning("the checkpoint differs from the MultiModalConfig (wanted, found): %s", clashes)
        model.processor = loaded.processor
        return model

    @staticmethod
    def from_config(config: MultiModalConfig):
        from .modeling import AutoGLMConfig, AutoGLMForConditionalGeneration

        return AutoGLMForConditionalGeneration(AutoGLMConfig(**config.to_autoglm_kwargs())).eval()
