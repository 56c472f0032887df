from __future__ import annotations

from batchinfer import BatchInfer, BatchStatus, CompletionStatus
from batchinfer.testing import Emulator
from tests.helpers import chat_requests


async def test_happy_path(bi: BatchInfer, emulator: Emulator) -> None:
    batch = await bi.create_batch(
        provider="openai",
        endpoint="/v1/chat/completions",
        model="gpt-4o-mini",
        requests=chat_requests(20),
    )
    assert batch.status is BatchStatus.PENDING
    batch = await bi.submit_batch(batch)
    assert batch.provider_batch_id
    await emulator.finish(batch.provider_batch_id)
    batch = await bi.wait(batch)
    assert batch.status is BatchStatus.COMPLETED
    comps = [c async for c in bi.completions(batch)]
    assert all(c.status is CompletionStatus.COMPLETED for c in comps)
    print(batch.total_cost, comps[0].output_text, comps[0].prompt_tokens)
