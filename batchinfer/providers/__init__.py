"""Provider adapters behind one narrow Protocol."""

from __future__ import annotations

from batchinfer.providers.anthropic import AnthropicProvider
from batchinfer.providers.azure import AzureOpenAIProvider
from batchinfer.providers.base import InputStream, LiveProvider, Provider
from batchinfer.providers.gemini import GeminiProvider
from batchinfer.providers.openai import OpenAIProvider
from batchinfer.providers.xai import XAIProvider

__all__ = [
    "AnthropicProvider",
    "AzureOpenAIProvider",
    "GeminiProvider",
    "InputStream",
    "LiveProvider",
    "OpenAIProvider",
    "Provider",
    "XAIProvider",
]
