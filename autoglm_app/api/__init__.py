"""The OpenAI-compatible /v1 API: wire models in ``protocol``, conversion and chunk builders in
``serving``, media decoding in ``media``, thin routes in ``routes``."""

from .routes import mount_api

__all__ = ["mount_api"]
