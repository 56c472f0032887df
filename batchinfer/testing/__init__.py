"""Test helpers shipped with batchinfer: a real local OpenAI-compatible server."""

from __future__ import annotations

from .emulator import Emulator

__all__ = ["Emulator"]
