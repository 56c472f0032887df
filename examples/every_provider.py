"""One app, five providers: the same questions as a batch on each, one BatchInfer for all.

Runs as is against the local emulator, which speaks every provider's API on one port; give each
provider its real key (and no base_url or endpoint override) and the same code runs against
OpenAI, Azure OpenAI, Anthropic, xAI and Gemini. Each request's body is in its provider's own
format; what comes back (text, tokens, cost) reads the same. The database is
$BATCHINFER_DATABASE_URL, or an embedded Postgres when that is unset.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from batchinfer import (
    AnthropicProvider,
    AzureOpenAIProvider,
    BatchInfer,
    GeminiProvider,
    OpenAIProvider,
    Provider,
    XAIProvider,
)
from batchinfer.testing import Emulator
from batchinfer.testing.postgres import database_or_embedded

QUESTIONS = ["What is a tide?", "Why do bees dance?", "How old is jazz?"]


def body(provider: str, question: str) -> dict[str, Any]:
    """The same question in each provider's own request format."""
    if provider == "gemini":
        return {"contents": [{"role": "user", "parts": [{"text": question}]}]}
    made: dict[str, Any] = {"messages": [{"role": "user", "content": question}]}
    if provider == "anthropic":
        made["max_tokens"] = 200  # Anthropic requires it
    return made


# provider name -> (endpoint, model); Azure's model is a deployment's name.
RUNS = {
    "openai": ("/v1/chat/completions", "gpt-4o-mini"),
    "azure": ("/v1/chat/completions", "gpt-4o-mini-batch"),
    "anthropic": ("/v1/messages", "claude-haiku-4-5"),
    "xai": ("/v1/chat/completions", "grok-4"),
    "gemini": ("generateContent", "gemini-2.5-flash"),
}


async def main(database_url: str) -> None:
    async with Emulator(step_seconds=0.2) as emulator:
        emulator.azure_deployment("gpt-4o-mini-batch", "gpt-4o-mini")
        key = emulator.api_key
        providers: list[Provider] = [
            OpenAIProvider(api_key=key, base_url=emulator.base_url),
            AzureOpenAIProvider(endpoint=emulator.azure_endpoint, api_key=key),
            AnthropicProvider(api_key=key, base_url=emulator.anthropic_base_url),
            XAIProvider(api_key=key, base_url=emulator.xai_base_url),
            GeminiProvider(api_key=key, base_url=emulator.gemini_base_url),
        ]
        async with BatchInfer(database_url, providers=providers, poll_interval=0.2) as bi:
            await bi.migrate()
            batches = []
            for name, (endpoint, model) in RUNS.items():
                requests = [
                    {"custom_id": f"q-{n}", "body": body(name, q)} for n, q in enumerate(QUESTIONS)
                ]
                batch = await bi.create_batch(
                    provider=name, endpoint=endpoint, model=model, requests=requests
                )
                batches.append(await bi.submit_batch(batch))
            for batch in await asyncio.gather(*(bi.wait(b) for b in batches)):
                print(f"{batch.provider}: {batch.status.value}, cost ${batch.total_cost}")
                async for c in bi.completions(batch):
                    print(f"  {c.custom_id}: {c.output_text} ({c.total_tokens} tokens)")


if __name__ == "__main__":
    with database_or_embedded(os.environ.get("BATCHINFER_DATABASE_URL")) as url:
        asyncio.run(main(url))
