"""The OpenAI-compatible /v1 API: wire format in ``protocol``, media decoding in ``media``, routes in ``routes``."""

from .routes import mount_api

__all__ = ["mount_api"]
