"""Odd answers, odd values, races and interruptions: none loses a paid result or hangs."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from batchinfer import (
    Batch,
    BatchInfer,
    BatchStatus,
    CompletionStatus,
    InvalidRequestError,
    OpenAIProvider,
    PermanentProviderError,
    Price,
    ProviderError,
    ResultsNotReadyError,
    StorageError,
)
from batchinfer.client import _asyncpg_url
from batchinfer.domain import ResultSources
from batchinfer.testing import Emulator
from tests.helpers import chat_requests

CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"


async def submitted(bi: BatchInfer, n: int = 3, **kwargs: Any) -> Batch:
    batch = await bi.create_batch(
        provider="openai", endpoint=CHAT, model=MODEL, requests=chat_requests(n), **kwargs
    )
    batch = await bi.submit_batch(batch)
    assert batch.provider_batch_id is not None
    return batch


def serve_output(emulator: Emulator, batch: Batch, *records: dict[str, Any]) -> None:
    """Replace the finished batch's output with these lines; no error file."""
    assert batch.provider_batch_id is not None
    emulator.files["file-hand-made"] = b"".join(orjson.dumps(r) + b"\n" for r in records)
    obj = emulator.batches[batch.provider_batch_id]
    obj.update(
        output_file_id="file-hand-made",
        error_file_id=None,
        request_counts={"total": len(records), "completed": len(records), "failed": 0},
    )


def chat_line(custom_id: str, *, model: str = MODEL, **usage: Any) -> dict[str, Any]:
    body = {
        "id": f"chatcmpl-{custom_id}",
        "object": "chat.completion",
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 10, "total_tokens": 1010, **usage},
    }
    return {"custom_id": custom_id, "response": {"status_code": 200, "body": body}}


async def statuses(bi: BatchInfer, batch: Batch) -> dict[str, CompletionStatus]:
    return {c.custom_id: c.status async for c in bi.completions(batch)}


# -- values the columns cannot hold ------------------------------------------------------------


async def test_out_of_range_numbers_do_not_stop_the_pass(
    bi: BatchInfer, emulator: Emulator
) -> None:
    batch = await submitted(bi, 3)
    await emulator.finish(batch.provider_batch_id or "")
    huge = chat_line("q0", prompt_tokens=3_000_000_000)
    odd_code = chat_line("q1")
    odd_code["response"]["status_code"] = True
    floaty = chat_line("q2", completion_tokens=10.0)
    serve_output(emulator, batch, huge, odd_code, floaty)

    done = await bi.wait(batch)

    comps = {c.custom_id: c async for c in bi.completions(done)}
    assert comps["q0"].status is CompletionStatus.COMPLETED
    assert comps["q0"].prompt_tokens is None  # not storable, not invented
    assert comps["q1"].status is CompletionStatus.FAILED  # a status code of `true` is no 2xx
    assert comps["q2"].completion_tokens == 10


async def test_a_row_the_database_refuses_fails_alone(
    engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    # A price so high that one row's cost overflows numeric(20, 12): that row cannot be stored.
    provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    absurd = {"absurd-model": Price(input_per_mtok=Decimal("1e16"), output_per_mtok=Decimal(1))}
    async with BatchInfer(
        engine, providers=[provider], schema=schema, prices=absurd, poll_interval=0
    ) as bi:
        await bi.migrate()
        batch = await bi.create_batch(
            provider="openai", endpoint=CHAT, model=MODEL, requests=chat_requests(3)
        )
        batch = await bi.submit_batch(batch)
        await emulator.finish(batch.provider_batch_id or "")
        serve_output(
            emulator, batch, chat_line("q0"), chat_line("q1", model="absurd-model"), chat_line("q2")
        )
        # The batch model has no override, so each line is priced by the model it names.
        done = await bi.wait(batch)
        comps = {c.custom_id: c async for c in bi.completions(done)}
    assert comps["q0"].status is CompletionStatus.COMPLETED
    assert comps["q2"].status is CompletionStatus.COMPLETED
    assert comps["q1"].status is CompletionStatus.FAILED
    assert comps["q1"].failure_error == "batchinfer could not store this result"
    assert "line 2" in (comps["q1"].failure_reason or "")


# -- pricing -----------------------------------------------------------------------------------


def test_prices_given_as_floats_become_decimals() -> None:
    price = Price(input_per_mtok=0.15, output_per_mtok="0.6")  # type: ignore[arg-type]
    assert price.input_per_mtok == Decimal("0.15")
    assert price.output_per_mtok == Decimal("0.6")
    with pytest.raises(ValueError, match="input_per_mtok"):
        Price(input_per_mtok="cheap", output_per_mtok=1)  # type: ignore[arg-type]


async def test_the_callers_price_for_the_batch_model_wins_over_a_dated_name(
    engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    mine = {MODEL: Price(input_per_mtok=Decimal(100), output_per_mtok=Decimal(0))}
    async with BatchInfer(
        engine, providers=[provider], schema=schema, prices=mine, poll_interval=0
    ) as bi:
        await bi.migrate()
        batch = await submitted(bi, 1)
        await emulator.finish(batch.provider_batch_id or "")
        serve_output(emulator, batch, chat_line("q0", model="gpt-4o-mini-2024-07-18"))
        done = await bi.wait(batch)
    # 1,000 prompt tokens at $100 per million, half price.
    assert done.input_cost == Decimal("0.05")


# -- the provider's batch object ---------------------------------------------------------------


async def test_odd_batch_objects_are_read_safely(bi: BatchInfer, emulator: Emulator) -> None:
    batch = await submitted(bi, 2)
    obj = emulator.batches[batch.provider_batch_id or ""]
    obj["request_counts"] = ["not", "a", "dict"]
    assert await bi.fetch_batch_status(batch) is BatchStatus.VALIDATING
    stored = await bi.get_batch(batch)
    assert (stored.request_counts.total, stored.request_counts.completed) == (0, 0)

    obj.update(
        status="failed",
        errors={"object": "list", "data": ["plain text\x00error", {"line": 2**40, "message": "x"}]},
    )
    assert await bi.fetch_batch_status(batch) is BatchStatus.FAILED
    stored = await bi.get_batch(batch)
    assert stored.failure_reason is not None
    assert "plain text\ufffderror" in stored.failure_reason
    assert [e["line"] for e in stored.provider_errors] == [None, None]


async def test_a_file_id_that_is_not_a_string_is_a_clear_error(
    bi: BatchInfer, emulator: Emulator
) -> None:
    batch = await submitted(bi, 1)
    emulator.batches[batch.provider_batch_id or ""]["output_file_id"] = 12345
    with pytest.raises(PermanentProviderError, match="output_file_id"):
        await bi.fetch_batch_status(batch)


async def test_a_stale_poll_does_not_undo_cancelling(bi: BatchInfer, emulator: Emulator) -> None:
    batch = await submitted(bi, 2)
    await emulator.advance(batch.provider_batch_id or "")  # in_progress
    assert await bi.cancel_batch(batch) is BatchStatus.CANCELLING
    # An answer from before the cancel, arriving after it.
    emulator.batches[batch.provider_batch_id or ""]["status"] = "in_progress"
    assert await bi.fetch_batch_status(batch) is BatchStatus.CANCELLING
    assert (await bi.get_batch(batch)).status is BatchStatus.CANCELLING


# -- finishing only when the files are there ---------------------------------------------------


async def test_counts_that_promise_an_error_file_wait_for_it_unless_forced(
    bi: BatchInfer, emulator: Emulator
) -> None:
    emulator.fail_request("q1")
    batch = await submitted(bi, 2)
    await emulator.finish(batch.provider_batch_id or "")
    obj = emulator.batches[batch.provider_batch_id or ""]
    lagging_error_file = obj["error_file_id"]
    obj["error_file_id"] = None
    await bi.fetch_batch_status(batch)
    with pytest.raises(ResultsNotReadyError, match="no error file yet"):
        await bi.fetch_batch_results(batch)
    assert (await bi.get_batch(batch)).results_applied_at is None

    obj["error_file_id"] = lagging_error_file  # it arrives; the next poll records it
    done = await bi.wait(batch)
    comps = {c.custom_id: c async for c in bi.completions(done)}
    assert comps["q1"].failure_reason == "The request was invalid."  # from the file, not a sweep


async def test_force_applies_what_is_there_and_fails_the_rest(
    bi: BatchInfer, emulator: Emulator
) -> None:
    emulator.fail_request("q1")
    batch = await submitted(bi, 2)
    await emulator.finish(batch.provider_batch_id or "")
    emulator.batches[batch.provider_batch_id or ""]["error_file_id"] = None
    await bi.fetch_batch_status(batch)
    done = await bi.fetch_batch_results(batch, force=True)
    assert done.results_applied_at is not None
    assert await statuses(bi, done) == {
        "q0": CompletionStatus.COMPLETED,
        "q1": CompletionStatus.FAILED,
    }


async def test_the_sweep_refuses_when_the_result_sources_changed(
    bi: BatchInfer, emulator: Emulator
) -> None:
    batch = await submitted(bi, 1)
    await emulator.finish(batch.provider_batch_id or "")
    batch = await bi.get_batch(batch)
    await bi.fetch_batch_status(batch)
    current = await bi.get_batch(batch)
    # Finishing against sources other than the batch's now is refused, changing nothing.
    assert current.result_sources is not None
    assert [s.key for s in current.result_sources.sources] == ["output"]
    outcome = await bi._store.results.finish_results(
        batch.id,
        applied_sources=ResultSources(),
        failure_error="x",
        failure_reason="y",
    )
    assert outcome is None
    assert await statuses(bi, current) == {"q0": CompletionStatus.SUBMITTED}


# -- interruptions and races -------------------------------------------------------------------


async def test_a_timeout_during_results_leaves_no_writes_running(
    engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    async with BatchInfer(
        engine, providers=[provider], schema=schema, apply_chunk_size=50, poll_interval=0
    ) as bi:
        await bi.migrate()
        batch = await submitted(bi, 2_000)
        await emulator.finish(batch.provider_batch_id or "")
        await bi.fetch_batch_status(batch)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await bi.fetch_batch_results(batch)
        # Every write the pass started has finished; nothing of it runs on.
        running = [t for t in asyncio.all_tasks() if t.get_name().startswith("batchinfer-")]
        assert running == []
        before = await statuses(bi, batch)
        assert before == await statuses(bi, batch)
        done = await bi.fetch_batch_results(batch)
        assert set((await statuses(bi, done)).values()) == {CompletionStatus.COMPLETED}


async def test_a_failed_migrate_releases_its_lock(
    engine: AsyncEngine, database_url: str, schema: str
) -> None:
    # Roles belong to the whole server: a name of this test's own.
    role = f"bi_no_create_{schema}"
    async with engine.begin() as conn:
        await conn.execute(sa.text(f'CREATE ROLE "{role}" LOGIN'))
    weak_url = make_url(_asyncpg_url(database_url)).set(username=role, password=None)
    weak = create_async_engine(weak_url)
    try:
        async with BatchInfer(weak, providers=[], schema=schema) as bi:
            with pytest.raises(StorageError, match="permission denied"):
                await bi.migrate()
        # The lock went with the failed connection: a capable caller migrates at once.
        async with BatchInfer(engine, providers=[], schema=schema) as bi, asyncio.timeout(20):
            await bi.migrate()
    finally:
        await weak.dispose()
        async with engine.begin() as conn:
            await conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            await conn.execute(sa.text(f'DROP ROLE IF EXISTS "{role}"'))


async def test_a_database_failure_during_upload_is_reported_as_one(
    bi: BatchInfer, engine: AsyncEngine, schema: str
) -> None:
    batch = await bi.create_batch(
        provider="openai", endpoint=CHAT, model=MODEL, requests=chat_requests(3)
    )
    async with engine.begin() as conn:
        await conn.execute(sa.text(f'ALTER TABLE "{schema}".completions RENAME TO gone'))
    with pytest.raises(StorageError) as info:
        await bi.submit_batch(batch)
    assert not isinstance(info.value, ProviderError)
    # The claim was released, so a retry is not locked out.
    async with engine.begin() as conn:
        await conn.execute(sa.text(f'ALTER TABLE "{schema}".gone RENAME TO completions'))
    assert (await bi.submit_batch(batch)).status is BatchStatus.VALIDATING


async def test_an_unreadable_live_answer_is_kept(bi: BatchInfer, emulator: Emulator) -> None:
    emulator.fail_http("POST", "/chat/completions", 200, body={"choices": 5, "model": MODEL})
    live = await bi.complete(
        provider="openai",
        endpoint=CHAT,
        model=MODEL,
        body={"messages": [{"role": "user", "content": "hi"}]},
    )
    assert live.status is CompletionStatus.COMPLETED
    assert live.response_body == {"choices": 5, "model": MODEL}
    assert live.output_text is None


# -- bad arguments -----------------------------------------------------------------------------


async def test_retry_after_that_is_not_a_number_is_ignored(
    bi: BatchInfer, emulator: Emulator
) -> None:
    emulator.fail_http("POST", "/batches", 429, headers={"Retry-After": "soon"})
    batch = await submitted(bi, 1)
    assert batch.status is BatchStatus.VALIDATING


async def test_api_key_with_a_trailing_newline_works(emulator: Emulator) -> None:
    provider = OpenAIProvider(api_key=emulator.api_key + "\n", base_url=emulator.base_url)
    parsed = await provider.complete(CHAT, {"model": MODEL, "messages": [{"role": "user"}]})
    assert parsed.output_text is not None
    await provider.aclose()
    with pytest.raises(ValueError, match="control character"):
        OpenAIProvider(api_key="sk-abc\x07def")


@pytest.mark.parametrize("metadata", [["a"], {"k": {1, 2}}, {"k": "nul\x00"}])
async def test_bad_batch_metadata_is_rejected(bi: BatchInfer, metadata: Any) -> None:
    with pytest.raises(InvalidRequestError, match="metadata"):
        await bi.create_batch(
            provider="openai",
            endpoint=CHAT,
            model=MODEL,
            requests=chat_requests(1),
            metadata=metadata,
        )


def test_bad_arguments_are_clear() -> None:
    with pytest.raises(ValueError, match="apply_writers"):
        BatchInfer("postgresql+asyncpg://u@h/db", providers=[], apply_writers=0)
    with pytest.raises(ValueError, match=r"u:\*\*\*@") as info:
        BatchInfer("nosuchdialect://u:secret@h/db", providers=[])
    assert "secret" not in str(info.value)
