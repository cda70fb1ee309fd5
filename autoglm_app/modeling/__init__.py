"""The AutoGLM-Phone architecture as a transformers model, registered with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from .configuration_autoglm import AutoGLMConfig
from .modeling_autoglm import AutoGLMBackbone, AutoGLMForConditionalGeneration, AutoGLMMoE, AutoGLMRouter
from .processing_autoglm import AudioSpan, AutoGLMProcessor, ImageSpan, build_tokenizer

AutoConfig.register("autoglm", AutoGLMConfig, exist_ok=True)
AutoModel.register(AutoGLMConfig, AutoGLMForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(AutoGLMConfig, AutoGLMForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(AutoGLMConfig, AutoGLMForConditionalGeneration, exist_ok=True)

__all__ = [
    "AudioSpan",
    "AutoGLMBackbone",
    "AutoGLMConfig",
    "AutoGLMForConditionalGeneration",
    "AutoGLMMoE",
    "AutoGLMProcessor",
    "AutoGLMRouter",
    "ImageSpan",
    "build_tokenizer",
]
