"""Provider adapters behind one narrow Protocol."""

from __future__ import annotations

from collections.abc import Callable

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


def provider_named(
    name: str, *, api_key: str, base_url: str | None = None, api_version: str | None = None
) -> Provider:
    """The provider registered by default as ``name`` ("openai", "azure", "anthropic", "xai",
    "gemini"), at ``base_url`` (Azure's: the resource's endpoint, and its ``api_version``) or
    at its own service when None."""
    if name == "azure":
        if not base_url:
            raise ValueError("Azure OpenAI needs the resource's endpoint as base_url")
        return AzureOpenAIProvider(endpoint=base_url, api_key=api_key, api_version=api_version)
    kinds: dict[str, Callable[..., Provider]] = {
        "openai": OpenAIProvider,
        "anthropic": AnthropicProvider,
        "xai": XAIProvider,
        "gemini": GeminiProvider,
    }
    if name not in kinds:
        raise ValueError(f"no provider named {name!r}; one of azure, {', '.join(kinds)}")
    if base_url is None:
        return kinds[name](api_key=api_key)
    return kinds[name](api_key=api_key, base_url=base_url)
