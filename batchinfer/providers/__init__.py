"""Provider adapters behind one narrow Protocol."""

from __future__ import annotations

from batchinfer.providers.base import InputStream, Provider
from batchinfer.providers.openai import OpenAIProvider

__all__ = ["InputStream", "OpenAIProvider", "Provider"]
