"""Provider adapters behind one narrow Protocol."""

from __future__ import annotations

from batchinfer.providers.base import InputStream, LiveProvider, Provider
from batchinfer.providers.openai import OpenAIProvider

__all__ = ["InputStream", "LiveProvider", "OpenAIProvider", "Provider"]
