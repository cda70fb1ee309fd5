"""The seed's public API, as its article wrote it:

    from autoglm_app.seed import AutoGLMModel, MultiModalConfig
    config = MultiModalConfig(vision_encoder="vit-tiny", audio_encoder="qwenaudio-lite",
                              text_decoder="glm-tiny", quantize="int4")
    model = AutoGLMModel.from_pretrained("assets/autoglm-phone-tiny", config=config)
    print(model.summary())

``from_pretrained`` loads a checkpoint through the app's loader (quantization, device
plan) and checks that the checkpoint is the architecture the config names; the seed's model
names (``"autoglm-phone-9b"``) stand for the published checkpoints' hub ids;
``from_config`` builds a fresh random-weight model from the config alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

__all__ = ["AutoGLMModel", "MultiModalConfig"]

# the names the seed's article uses -> the published checkpoints (AutoGLM-Phone-9B is a GLM-4.1V model)
PUBLISHED_CHECKPOINTS = {"autoglm-phone-9b": "zai-org/AutoGLM-Phone-9B"}

ENCODER_ALIASES = {"qwenaudio-lite": dict(num_mel_bins=80, audio_hidden_size=256, audio_layers=4, audio_heads=4),
                   "qwenaudio": dict(num_mel_bins=128, audio_hidden_size=1024, audio_layers=12, audio_heads=16)}
DECODER_ALIASES = {
    "glm-tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     moe_intermediate_size=128, num_experts=4),
    "glm-small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                      moe_intermediate_size=512, num_experts=8),
    "glm-4-9b": dict(hidden_size=4096, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=2,
                     moe_intermediate_size=1712, num_experts=8, vocab_size=151552, partial_rotary_factor=0.5),
}


@dataclass
class MultiModalConfig:
    """The seed API: ``MultiModalConfig(vision_encoder='vit-tiny', audio_encoder='qwenaudio-lite',
    text_decoder='glm-tiny', quantize='int4')``. Names map to AutoGLMConfig fields; ``overrides``
    sets any AutoGLMConfig field directly."""

    vision_encoder: str = "vit-tiny"
    audio_encoder: str = "qwenaudio-lite"
    text_decoder: str = "glm-tiny"
    quantize: str | None = None
    overrides: dict = field(default_factory=dict)

    def to_autoglm_kwargs(self) -> dict:
        if self.audio_encoder not in ENCODER_ALIASES:
            raise ValueError(f"unknown audio_encoder {self.audio_encoder!r}; choose from {sorted(ENCODER_ALIASES)}")
        if self.text_decoder not in DECODER_ALIASES:
            raise ValueError(f"unknown text_decoder {self.text_decoder!r}; choose from {sorted(DECODER_ALIASES)}")
        return {"vision_model": self.vision_encoder, **ENCODER_ALIASES[self.audio_encoder],
                **DECODER_ALIASES[self.text_decoder], **self.overrides}


class AutoGLMModel:
    @staticmethod
    def from_pretrained(name_or_path: str, config: MultiModalConfig | None = None, **load_kwargs):
        import os

        from .loading.checkpoints import ModelNotFoundError, load_model

        quantize = config.quantize if config is not None else None
        hub_id = None if os.path.exists(name_or_path) else PUBLISHED_CHECKPOINTS.get(str(name_or_path).lower())
        try:
            loaded = load_model(hub_id or name_or_path, quantize=quantize, **load_kwargs)
        except ModelNotFoundError as e:
            if hub_id is None:
                raise
            raise ModelNotFoundError(
                f"{name_or_path!r} is the published checkpoint {hub_id}, which is not here: {e} To try the "
                "API without it, pass the shipped demo model instead: AutoGLMModel.from_pretrained("
                "'assets/autoglm-phone-tiny', config=config)") from e
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
