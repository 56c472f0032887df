from __future__ import annotations

import asyncio

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from batchinfer import (
    Batch,
    BatchInfer,
    BatchStatus,
    CompletionStatus,
    InvalidBatchError,
    OpenAIProvider,
    ProviderRejectedError,
    RequestCounts,
)
from batchinfer.testing import Emulator
from tests.helpers import chat_requests

CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"


async def submitted(bi: BatchInfer, n: int = 4) -> tuple[Batch, str]:
    batch = await bi.create_batch(
        provider="openai", endpoint=CHAT, model=MODEL, requests=chat_requests(n)
    )
    batch = await bi.submit_batch(batch)
    assert batch.provider_batch_id is not None
    return batch, batch.provider_batch_id


def calls(emulator: Emulator, method: str, path: str) -> int:
    return sum(1 for m, p in emulator.requests if m == method and p == path)


# -- fetch_batch_status -----------------------------------------------------------------------


async def test_status_follows_the_provider_through_its_lifecycle(
    bi: BatchInfer, emulator: Emulator
) -> None:
    emulator.fail_request("q3", status=400, message="Bad message list.")
    batch, pbid = await submitted(bi, 4)

    assert await bi.fetch_batch_status(batch) is BatchStatus.VALIDATING

    await emulator.advance(pbid)
    assert await bi.fetch_batch_status(batch) is BatchStatus.IN_PROGRESS
    current = await bi.get_batch(batch)
    assert current.request_counts == RequestCounts(total=4, completed=0, failed=0)
    assert current.ended_at is None

    await emulator.process(pbid, 2)
    await bi.fetch_batch_status(batch)
    assert (await bi.get_batch(batch)).request_counts == RequestCounts(
        total=4, completed=2, failed=0
    )

    await emulator.advance(pbid)
    assert await bi.fetch_batch_status(batch) is BatchStatus.FINALIZING
    current = await bi.get_batch(batch)
    assert current.request_counts == RequestCounts(total=4, completed=3, failed=1)
    assert current.output_file_id is None
    assert current.ended_at is None

    await emulator.advance(pbid)
    assert await bi.fetch_batch_status(batch) is BatchStatus.COMPLETED
    current = await bi.get_batch(batch)
    provider = emulator.batches[pbid]
    assert current.status is BatchStatus.COMPLETED
    assert current.output_file_id is not None
    assert current.output_file_id == provider["output_file_id"]
    assert current.error_file_id is not None
    assert current.error_file_id == provider["error_file_id"]
    assert current.request_counts == RequestCounts(total=4, completed=3, failed=1)
    assert current.ended_at is not None
    assert current.submitted_at is not None
    assert current.ended_at >= current.submitted_at
    assert current.failure_reason is None
    assert current.provider_errors == []


async def test_first_terminal_status_stamps_ended_at_once(
    bi: BatchInfer, emulator: Emulator
) -> None:
    batch, pbid = await submitted(bi)
    await emulator.finish(pbid)
    assert await bi.fetch_batch_status(batch) is BatchStatus.COMPLETED
    first = await bi.get_batch(batch)
    assert first.ended_at is not None

    assert await bi.fetch_batch_status(batch) is BatchStatus.COMPLETED
    assert await bi.fetch_batch_status(batch.id) is BatchStatus.COMPLETED
    assert calls(emulator, "GET", f"/v1/batches/{pbid}") == 3
    again = await bi.get_batch(batch)
    assert again.ended_at == first.ended_at
    assert again.status is BatchStatus.COMPLETED


@pytest.mark.parametrize("terminal", ["expired", "cancelled"])
async def test_terminal_status_is_never_overwritten_by_a_stale_poll(
    bi: BatchInfer, emulator: Emulator, terminal: str
) -> None:
    batch, pbid = await submitted(bi)
    await emulator.advance(pbid)
    if terminal == "expired":
        await emulator.expire(pbid)
    else:
        assert await bi.cancel_batch(batch) is BatchStatus.CANCELLING
        await emulator.advance(pbid)
    assert await bi.fetch_batch_status(batch) == terminal
    recorded = await bi.get_batch(batch)
    assert recorded.ended_at is not None

    emulator.batches[pbid]["status"] = "in_progress"
    assert await bi.fetch_batch_status(batch) == terminal
    after = await bi.get_batch(batch)
    assert after.status == terminal
    assert after.ended_at == recorded.ended_at
    assert calls(emulator, "GET", f"/v1/batches/{pbid}") == 2


async def test_polling_an_unsubmitted_batch_is_refused_without_network(
    bi: BatchInfer, emulator: Emulator
) -> None:
    batch = await bi.create_batch(
        provider="openai", endpoint=CHAT, model=MODEL, requests=chat_requests(1)
    )
    with pytest.raises(InvalidBatchError, match="has not been submitted"):
        await bi.fetch_batch_status(batch)
    assert emulator.requests == []
    assert (await bi.get_batch(batch)).status is BatchStatus.PENDING


async def test_validation_failure_is_stored_and_explained(
    bi: BatchInfer, emulator: Emulator
) -> None:
    emulator.fail_validation(
        [
            {
                "code": "invalid_json_line",
                "message": "This line is not parseable as valid JSON.",
                "line": 2,
            },
            {
                "code": "missing_required_parameter",
                "message": "Missing required parameter: 'body'.",
                "line": 5,
                "param": "body",
            },
        ]
    )
    batch, pbid = await submitted(bi)
    await emulator.advance(pbid)
    assert await bi.fetch_batch_status(batch) is BatchStatus.FAILED
    failed = await bi.get_batch(batch)
    assert failed.status is BatchStatus.FAILED
    assert failed.ended_at is not None
    assert failed.provider_errors == [
        {
            "code": "invalid_json_line",
            "message": "This line is not parseable as valid JSON.",
            "param": None,
            "line": 2,
        },
        {
            "code": "missing_required_parameter",
            "message": "Missing required parameter: 'body'.",
            "param": "body",
            "line": 5,
        },
    ]
    assert failed.failure_reason is not None
    assert "line 2: This line is not parseable as valid JSON." in failed.failure_reason
    assert "invalid_json_line" in failed.failure_reason
    assert "line 5: Missing required parameter: 'body'." in failed.failure_reason


async def test_status_5xx_is_retried(bi: BatchInfer, emulator: Emulator) -> None:
    batch, pbid = await submitted(bi)
    await emulator.advance(pbid)
    emulator.fail_http("GET", f"/batches/{pbid}", 503, times=1)
    assert await bi.fetch_batch_status(batch) is BatchStatus.IN_PROGRESS
    assert calls(emulator, "GET", f"/v1/batches/{pbid}") == 2
    assert (await bi.get_batch(batch)).status is BatchStatus.IN_PROGRESS


async def test_a_404_for_a_batch_just_created_is_retried(
    bi: BatchInfer, emulator: Emulator
) -> None:
    batch, pbid = await submitted(bi)
    await emulator.advance(pbid)
    # The provider's eventual consistency: the batch it just created is not visible yet.
    emulator.fail_http("GET", f"/batches/{pbid}", 404, times=2)
    assert await bi.fetch_batch_status(batch) is BatchStatus.IN_PROGRESS
    assert calls(emulator, "GET", f"/v1/batches/{pbid}") == 3


async def test_status_404_raises_rejected_and_changes_nothing(
    bi: BatchInfer, engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    batch, pbid = await submitted(bi)
    await emulator.advance(pbid)
    emulator.fail_http("GET", f"/batches/{pbid}", 404, times=1)
    # Another process, which did not create the batch a moment ago: a 404 is an answer.
    provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    async with BatchInfer(engine, providers=[provider], schema=schema) as other:
        with pytest.raises(ProviderRejectedError) as info:
            await other.fetch_batch_status(batch)
    assert info.value.status == 404
    assert pbid in str(info.value)
    assert calls(emulator, "GET", f"/v1/batches/{pbid}") == 1
    assert (await bi.get_batch(batch)).status is BatchStatus.VALIDATING


# -- cancel_batch -----------------------------------------------------------------------------


async def test_cancel_returns_cancelling_then_polls_to_cancelled(
    bi: BatchInfer, emulator: Emulator
) -> None:
    batch, pbid = await submitted(bi)
    await emulator.advance(pbid)
    await emulator.process(pbid, 1)

    assert await bi.cancel_batch(batch) is BatchStatus.CANCELLING
    assert calls(emulator, "POST", f"/v1/batches/{pbid}/cancel") == 1
    assert emulator.batches[pbid]["status"] == "cancelling"
    cancelling = await bi.get_batch(batch)
    assert cancelling.status is BatchStatus.CANCELLING
    assert cancelling.ended_at is None

    await emulator.advance(pbid)
    assert await bi.fetch_batch_status(batch) is BatchStatus.CANCELLED
    cancelled = await bi.get_batch(batch)
    assert cancelled.ended_at is not None
    assert cancelled.request_counts == RequestCounts(total=4, completed=1, failed=3)


async def test_cancel_of_a_never_submitted_batch_is_refused_without_network(
    bi: BatchInfer, emulator: Emulator
) -> None:
    batch = await bi.create_batch(
        provider="openai", endpoint=CHAT, model=MODEL, requests=chat_requests(1)
    )
    with pytest.raises(InvalidBatchError, match="never submitted"):
        await bi.cancel_batch(batch)
    assert emulator.requests == []
    assert (await bi.get_batch(batch)).status is BatchStatus.PENDING


async def test_cancel_of_a_terminal_batch_is_refused_without_network(
    bi: BatchInfer, emulator: Emulator
) -> None:
    batch, pbid = await submitted(bi)
    await emulator.finish(pbid)
    assert await bi.fetch_batch_status(batch) is BatchStatus.COMPLETED
    seen = len(emulator.requests)
    with pytest.raises(InvalidBatchError, match="already completed"):
        await bi.cancel_batch(batch)
    assert len(emulator.requests) == seen
    assert (await bi.get_batch(batch)).status is BatchStatus.COMPLETED


async def test_cancel_after_the_provider_completed_records_completed(
    bi: BatchInfer, emulator: Emulator
) -> None:
    batch, pbid = await submitted(bi)
    await emulator.finish(pbid)  # finished at the provider; we never polled
    assert (await bi.get_batch(batch)).status is BatchStatus.VALIDATING

    with pytest.raises(InvalidBatchError, match="completed") as info:
        await bi.cancel_batch(batch)
    assert "can no longer be cancelled" in str(info.value)
    assert isinstance(info.value.__cause__, ProviderRejectedError)
    assert info.value.__cause__.status == 409
    assert calls(emulator, "POST", f"/v1/batches/{pbid}/cancel") == 1
    recorded = await bi.get_batch(batch)
    assert recorded.status is BatchStatus.COMPLETED
    assert recorded.ended_at is not None
    assert recorded.output_file_id == emulator.batches[pbid]["output_file_id"]
    assert recorded.request_counts == RequestCounts(total=4, completed=4, failed=0)

    done = await bi.fetch_batch_results(batch)
    assert done.results_applied_at is not None
    statuses = {c.status async for c in bi.completions(batch)}
    assert statuses == {CompletionStatus.COMPLETED}


# -- wait -------------------------------------------------------------------------------------


async def test_wait_polls_until_terminal_and_applies_results(
    bi: BatchInfer, emulator: Emulator
) -> None:
    batch, pbid = await submitted(bi, 3)
    seen: list[BatchStatus] = []

    async def on_poll(current: Batch) -> None:
        seen.append(current.status)
        await emulator.advance(pbid)

    done = await bi.wait(batch, on_poll=on_poll)
    assert seen == [
        BatchStatus.VALIDATING,
        BatchStatus.IN_PROGRESS,
        BatchStatus.FINALIZING,
        BatchStatus.COMPLETED,
    ]
    assert done.status is BatchStatus.COMPLETED
    assert done.results_applied_at is not None
    assert done == await bi.get_batch(batch)
    comps = [c async for c in bi.completions(batch)]
    assert [c.status for c in comps] == [CompletionStatus.COMPLETED] * 3
    assert all(c.output_text for c in comps)

    # Once results are applied there is nothing left to ask the provider.
    seen_requests = len(emulator.requests)
    assert await bi.fetch_batch_status(batch) is BatchStatus.COMPLETED
    assert len(emulator.requests) == seen_requests


async def test_wait_with_a_sync_on_poll_returns_at_once_for_a_finished_batch(
    bi: BatchInfer, emulator: Emulator
) -> None:
    batch, pbid = await submitted(bi, 2)
    await emulator.finish(pbid)
    seen: list[BatchStatus] = []
    done = await bi.wait(batch.id, on_poll=lambda b: seen.append(b.status))
    assert seen == [BatchStatus.COMPLETED]
    assert done.results_applied_at is not None


async def test_wait_is_bounded_by_asyncio_timeout(bi: BatchInfer, emulator: Emulator) -> None:
    batch, pbid = await submitted(bi)
    polls: list[BatchStatus] = []
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await bi.wait(batch, on_poll=lambda b: polls.append(b.status))
    assert len(polls) > 1
    assert set(polls) == {BatchStatus.VALIDATING}
    current = await bi.get_batch(batch)
    assert current.status is BatchStatus.VALIDATING
    assert current.results_applied_at is None
    assert emulator.batches[pbid]["status"] == "validating"


async def test_wait_rides_out_a_poll_that_fails_after_its_retries(
    bi: BatchInfer, emulator: Emulator
) -> None:
    batch = await bi.submit_batch(
        await bi.create_batch(
            provider="openai",
            endpoint="/v1/chat/completions",
            model="gpt-4o-mini",
            requests=chat_requests(3),
        )
    )
    assert batch.provider_batch_id is not None
    await emulator.finish(batch.provider_batch_id)
    # More failures than one poll's retries: the first poll gives up, wait() polls again.
    emulator.fail_http("GET", f"/batches/{batch.provider_batch_id}", 503, times=4)
    polls: list[BatchStatus] = []

    async def on_poll(current: Batch) -> None:
        polls.append(current.status)

    done = await bi.wait(batch, on_poll=on_poll)
    assert done.status is BatchStatus.COMPLETED
    assert done.results_applied_at is not None
    assert polls == [BatchStatus.COMPLETED]
    failed_gets = [
        r for r in emulator.requests if r == ("GET", f"/v1/batches/{batch.provider_batch_id}")
    ]
    assert len(failed_gets) == 5  # 4 failures (3 in the first poll, 1 in the next) + 1 success
