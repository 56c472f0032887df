"""Small builders shared by the tests."""

from __future__ import annotations

from typing import Any


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
