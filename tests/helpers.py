"""Small builders shared by the tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from batchinfer.testing import Emulator


def chat_requests(n: int, *, prefix: str = "q", words: int = 5) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{prefix}{i}",
            "body": {
                "messages": [
                    {"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": " ".join([f"question {i}"] * words)},
                ]
            },
            "metadata": {"row": i},
        }
        for i in range(n)
    ]


async def eventually(probe: Callable[[], Awaitable[object]], *, seconds: float = 10.0) -> Any:
    """Poll ``probe`` until it returns something truthy, failing after ``seconds``."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        value = await probe()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"still not true after {seconds} s: {probe}")
        await asyncio.sleep(0.01)


def calls(emulator: Emulator, method: str, path: str) -> int:
    """How many requests the emulator received for ``method path`` (query left out)."""
    return sum(1 for m, p in emulator.requests if m == method and p == path)


class MemoryCheckpoint:
    """A submit's checkpoint kept in memory, for a provider driven outside a BatchInfer."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.inputs: list[str] = []

    @property
    def input_ref(self) -> str | None:
        return self.inputs[-1] if self.inputs else None

    @property
    def notes(self) -> dict[str, str]:
        return self.values

    async def record_input(self, ref: str) -> None:
        self.inputs.append(ref)

    async def note(self, **values: str) -> None:
        self.values.update(values)
