"""The seed's own import name: ``from autoglm import AutoGLMModel, MultiModalConfig``.

The same objects as ``autoglm_app.seed``; nothing else lives here.
"""

from autoglm_app.seed import AutoGLMModel, MultiModalConfig

__all__ = ["AutoGLMModel", "MultiModalConfig"]
