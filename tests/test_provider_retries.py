"""The SDKs' retry policy, safe retries of calls that are not idempotent, and provider files
deleted once their results are in."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from batchinfer import (
    Batch,
    BatchInfer,
    BatchStatus,
    OpenAIProvider,
    ProviderRejectedError,
    RateLimitedError,
)
from batchinfer.testing import Emulator
from tests.helpers import chat_requests

CHAT = "/v1/chat/completions"


def calls(emulator: Emulator, method: str, path: str) -> int:
    return sum(1 for m, p in emulator.requests if m == method and p == path)


async def done_batch(bi: BatchInfer, emulator: Emulator, *, fail: str | None = None) -> Batch:
    if fail is not None:
        emulator.fail_request(fail)
    batch = await bi.create_batch(
        provider="openai", endpoint=CHAT, model="gpt-4o-mini", requests=chat_requests(3)
    )
    batch = await bi.submit_batch(batch)
    await emulator.finish(batch.provider_batch_id or "")
    return await bi.wait(batch)


async def test_an_exhausted_quota_is_not_retried(bi: BatchInfer, emulator: Emulator) -> None:
    batch = await bi.create_batch(
        provider="openai", endpoint=CHAT, model="gpt-4o-mini", requests=chat_requests(1)
    )
    emulator.fail_http(
        "POST",
        "/files",
        429,
        times=5,
        body={"error": {"message": "You exceeded your quota.", "code": "insufficient_quota"}},
        headers={"x-request-id": "req_quota_1"},
    )
    with pytest.raises(ProviderRejectedError, match="exceeded your quota") as info:
        await bi.submit_batch(batch)
    assert not isinstance(info.value, RateLimitedError)
    assert info.value.request_id == "req_quota_1"
    assert "req_quota_1" in str(info.value)  # to quote to the provider's support
    assert calls(emulator, "POST", "/v1/files") == 1


async def test_the_server_saying_not_to_retry_is_heeded(bi: BatchInfer, emulator: Emulator) -> None:
    batch = await bi.create_batch(
        provider="openai", endpoint=CHAT, model="gpt-4o-mini", requests=chat_requests(1)
    )
    emulator.fail_http("POST", "/files", 503, times=5, headers={"x-should-retry": "false"})
    with pytest.raises(ProviderRejectedError, match="HTTP 503"):
        await bi.submit_batch(batch)
    assert calls(emulator, "POST", "/v1/files") == 1


async def test_a_failed_upload_is_retried(bi: BatchInfer, emulator: Emulator) -> None:
    emulator.fail_http("POST", "/files", 502, times=1, headers={"retry-after-ms": "10"})
    batch = await bi.create_batch(
        provider="openai", endpoint=CHAT, model="gpt-4o-mini", requests=chat_requests(2)
    )
    submitted = await bi.submit_batch(batch)
    assert submitted.status is BatchStatus.VALIDATING
    assert calls(emulator, "POST", "/v1/files") == 2
    # Before uploading again it looked for a file the failed attempt might have stored.
    assert calls(emulator, "GET", "/v1/files") == 2  # once before the first upload too


async def test_an_upload_stored_by_a_submit_that_died_is_adopted(
    bi: BatchInfer, emulator: Emulator
) -> None:
    batch = await bi.create_batch(
        provider="openai", endpoint=CHAT, model="gpt-4o-mini", requests=chat_requests(2)
    )
    # What a submit killed between uploading and recording the file leaves at the provider.
    provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    try:

        async def body() -> AsyncIterator[bytes]:
            for line in (b'{"custom_id": "x"}\n',):
                yield line

        stranded = await provider.upload_input(body, filename=f"batchinfer-{batch.id}.jsonl")
    finally:
        await provider.aclose()
    submitted = await bi.submit_batch(batch)
    assert submitted.input_file_id == stranded
    assert calls(emulator, "POST", "/v1/files") == 1  # not uploaded a second time


async def test_input_files_are_deleted_once_results_are_applied(
    bi: BatchInfer, emulator: Emulator
) -> None:
    done = await done_batch(bi, emulator, fail="q1")
    assert done.input_file_id not in emulator.files
    assert done.output_file_id in emulator.files  # kept unless asked
    assert done.error_file_id in emulator.files


async def test_files_are_kept_or_all_deleted_as_asked(
    engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    async with BatchInfer(
        engine, providers=[provider], schema=schema, delete_input_files=False, poll_interval=0
    ) as keep:
        await keep.migrate()
        kept = await done_batch(keep, emulator)
        assert kept.input_file_id in emulator.files
    provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    async with BatchInfer(
        engine, providers=[provider], schema=schema, delete_result_files=True, poll_interval=0
    ) as tidy:
        gone = await done_batch(tidy, emulator, fail="q0")
        for file_id in (gone.input_file_id, gone.output_file_id, gone.error_file_id):
            assert file_id is not None
            assert file_id not in emulator.files


async def test_a_failed_delete_costs_nothing(bi: BatchInfer, emulator: Emulator) -> None:
    emulator.fail_http("DELETE", "/files", 500, times=10)
    done = await done_batch(bi, emulator)
    assert done.results_applied_at is not None
    assert done.input_file_id in emulator.files


async def test_a_base_url_without_v1_names_the_url_called(
    engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    root = emulator.base_url.removesuffix("/v1")
    provider = OpenAIProvider(api_key=emulator.api_key, base_url=root)
    async with BatchInfer(engine, providers=[provider], schema=schema) as bi:
        await bi.migrate()
        batch = await bi.create_batch(
            provider="openai", endpoint=CHAT, model="gpt-4o-mini", requests=chat_requests(1)
        )
        with pytest.raises(ProviderRejectedError, match="base_url") as info:
            await bi.submit_batch(batch)
    assert f"{root}/files" in str(info.value)
    assert info.value.status == 404


async def test_files_a_pass_died_before_deleting_are_deleted_by_the_next_look(
    bi: BatchInfer, emulator: Emulator
) -> None:
    emulator.fail_http("DELETE", "/files", 500, times=10)  # as if the process died there
    done = await done_batch(bi, emulator)
    assert done.input_file_id in emulator.files
    assert (await bi.get_batch(done)).files_deleted_at is None
    emulator.clear_faults()
    again = await bi.fetch_batch_results(done)  # nothing to apply; the deletion is due
    assert done.input_file_id not in emulator.files
    assert (await bi.get_batch(again)).files_deleted_at is not None
    assert calls(emulator, "DELETE", f"/v1/files/{done.input_file_id}") >= 2


async def test_a_create_whose_answer_was_lost_is_adopted_not_repeated(
    bi: BatchInfer, emulator: Emulator
) -> None:
    emulator.lose_answer("POST", "/batches")
    batch = await bi.create_batch(
        provider="openai", endpoint=CHAT, model="gpt-4o-mini", requests=chat_requests(2)
    )
    submitted = await bi.submit_batch(batch)
    assert calls(emulator, "POST", "/v1/batches") == 1  # the one that went through
    assert len(emulator.batches) == 1
    assert submitted.provider_batch_id in emulator.batches


async def test_an_upload_whose_answer_was_lost_is_adopted_not_stranded(
    bi: BatchInfer, emulator: Emulator
) -> None:
    emulator.lose_answer("POST", "/files")
    batch = await bi.create_batch(
        provider="openai", endpoint=CHAT, model="gpt-4o-mini", requests=chat_requests(2)
    )
    submitted = await bi.submit_batch(batch)
    assert calls(emulator, "POST", "/v1/files") == 1
    assert list(emulator.files) == [submitted.input_file_id]


async def test_a_result_line_over_the_limit_is_skipped_and_named(
    engine: AsyncEngine, schema: str, emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    async with BatchInfer(
        engine, providers=[provider], schema=schema, max_result_line_bytes=2048
    ) as bi:
        await bi.migrate()
        batch = await bi.create_batch(
            provider="openai", endpoint=CHAT, model="gpt-4o-mini", requests=chat_requests(3)
        )
        batch = await bi.submit_batch(batch)
        await emulator.finish(batch.provider_batch_id or "")
        # The provider's second line is far longer than the limit.
        output = emulator.batches[batch.provider_batch_id or ""]["output_file_id"]
        lines = emulator.files[str(output)].split(b"\n")
        lines[1] = lines[1][:-1] + b', "pad": "' + b"x" * 10_000 + b'"}'
        emulator.files[str(output)] = b"\n".join(lines)
        caplog.set_level(logging.WARNING, logger="batchinfer")
        done = await bi.wait(batch, poll_interval=0)
        report = bi.last_apply_report
    assert report is not None
    assert (report.malformed, report.applied, report.swept) == (1, 2, 1)
    assert any(
        r.getMessage().startswith("batchinfer.result_malformed") and "line_no=" in r.getMessage()
        for r in caplog.records
    )
    assert done.results_applied_at is not None


async def test_result_passes_beyond_the_limit_wait_their_turn(
    engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    async with BatchInfer(
        engine, providers=[provider], schema=schema, max_concurrent_results=1, poll_interval=0
    ) as bi:
        await bi.migrate()
        first, second = [
            await bi.submit_batch(
                await bi.create_batch(
                    provider="openai", endpoint=CHAT, model="gpt-4o-mini", requests=chat_requests(3)
                )
            )
            for _ in range(2)
        ]
        for b in (first, second):
            await emulator.finish(b.provider_batch_id or "")
            await bi.fetch_batch_status(b)
        first = await bi.get_batch(first)
        emulator.slow("GET", f"/files/{first.output_file_id}/content", 0.5)
        one, two = await asyncio.gather(
            bi.fetch_batch_results(first), bi.fetch_batch_results(second)
        )
    assert one.results_applied_at is not None
    assert two.results_applied_at is not None
    assert one.results_applied_at < two.results_applied_at  # one pass at a time


def test_the_limit_of_result_passes_is_checked(engine: AsyncEngine) -> None:
    with pytest.raises(ValueError, match="max_concurrent_results"):
        BatchInfer(engine, providers=[], max_concurrent_results=0)


async def test_a_worker_deletes_files_a_failed_delete_left(
    bi: BatchInfer, emulator: Emulator
) -> None:
    from batchinfer.testing import FakeClock

    clock = FakeClock()
    emulator.fail_http("DELETE", "/files", 500, times=10)
    done = await done_batch(bi, emulator)
    worker = bi.worker(clock=clock)
    await worker.run_once()  # handlers; the deletion is not due yet
    assert done.input_file_id in emulator.files
    emulator.clear_faults()
    clock.advance(601)
    assert await worker.run_once() == 1
    assert done.input_file_id not in emulator.files
    assert (await bi.get_batch(done)).files_deleted_at is not None
    clock.advance(3600)
    assert await worker.run_once() == 0  # nothing left to do for it
