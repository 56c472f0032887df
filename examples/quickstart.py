"""Create a batch, submit it, wait for it, read the results.

Runs as is against the local emulator; point OpenAIProvider at api.openai.com with a real key and
the same code runs against OpenAI. The database is $BATCHINFER_DATABASE_URL, or an embedded
Postgres when that is unset.
"""

from __future__ import annotations

import asyncio
import os

from batchinfer import BatchInfer, OpenAIProvider
from batchinfer.testing import Emulator
from batchinfer.testing.postgres import database_or_embedded


async def main(database_url: str) -> None:
    async with Emulator(step_seconds=0.2) as emulator:
        provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
        async with BatchInfer(database_url, providers=[provider], poll_interval=0.2) as bi:
            await bi.migrate()
            batch = await bi.create_batch(
                provider="openai",
                endpoint="/v1/chat/completions",
                model="gpt-4o-mini",
                requests=[
                    {
                        "custom_id": f"ticket-{n}",
                        "body": {"messages": [{"role": "user", "content": f"Classify ticket {n}"}]},
                        "metadata": {"ticket_id": n},
                    }
                    for n in range(10)
                ],
                metadata={"purpose": "ticket-triage"},
            )
            await bi.submit_batch(batch)
            batch = await bi.wait(batch)
            print(f"batch {batch.id}: {batch.status.value}, cost ${batch.total_cost}")
            async for completion in bi.completions(batch):
                ticket = completion.metadata["ticket_id"]
                print(f"  ticket {ticket}: {completion.status.value}: {completion.output_text}")


if __name__ == "__main__":
    with database_or_embedded(os.environ.get("BATCHINFER_DATABASE_URL")) as url:
        asyncio.run(main(url))
