"""AutoGLM Studio: a Gradio app and OpenAI-compatible API for multimodal AutoGLM models."""
