"""Test helpers shipped with batchinfer: a real local OpenAI-compatible server, and a clock."""

from __future__ import annotations

from .clock import FakeClock
from .emulator import Emulator, ReceivedRequest

__all__ = ["Emulator", "FakeClock", "ReceivedRequest"]
