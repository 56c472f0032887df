"""One app, two providers: the same work as an OpenAI batch and as an Anthropic batch.

Runs as is against the local emulator, which speaks both APIs on one port; give each provider
its real key (and no base_url) and the same code runs against OpenAI and Anthropic. Each
request's body is in its provider's own format; what comes back (text, tokens, cost) reads the
same. The database is $BATCHINFER_DATABASE_URL, or an embedded Postgres when that is unset.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from batchinfer import AnthropicProvider, BatchInfer, OpenAIProvider, Provider
from batchinfer.testing import Emulator
from batchinfer.testing.postgres import database_or_embedded

QUESTIONS = ["What is a tide?", "Why do bees dance?", "How old is jazz?"]


def requests(provider: str) -> list[dict[str, Any]]:
    made = []
    for n, question in enumerate(QUESTIONS):
        body: dict[str, Any] = {"messages": [{"role": "user", "content": question}]}
        if provider == "anthropic":
            body["max_tokens"] = 200  # Anthropic requires it
        made.append({"custom_id": f"q-{n}", "body": body})
    return made


async def main(database_url: str) -> None:
    async with Emulator(step_seconds=0.2) as emulator:
        providers: list[Provider] = [
            OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url),
            AnthropicProvider(api_key=emulator.api_key, base_url=emulator.anthropic_base_url),
        ]
        async with BatchInfer(database_url, providers=providers, poll_interval=0.2) as bi:
            await bi.migrate()
            runs = [
                ("openai", "/v1/chat/completions", "gpt-4o-mini"),
                ("anthropic", "/v1/messages", "claude-haiku-4-5"),
            ]
            batches = [
                await bi.create_batch(
                    provider=name, endpoint=endpoint, model=model, requests=requests(name)
                )
                for name, endpoint, model in runs
            ]
            for batch in batches:
                await bi.submit_batch(batch)
            done = await asyncio.gather(*(bi.wait(b) for b in batches))
            for batch in done:
                print(f"{batch.provider}: {batch.status.value}, cost ${batch.total_cost}")
                async for c in bi.completions(batch):
                    print(f"  {c.custom_id}: {c.output_text} ({c.total_tokens} tokens)")


if __name__ == "__main__":
    with database_or_embedded(os.environ.get("BATCHINFER_DATABASE_URL")) as url:
        asyncio.run(main(url))
