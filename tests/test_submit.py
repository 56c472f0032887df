from __future__ import annotations

import asyncio
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from batchinfer import (
    AuthenticationError,
    Batch,
    BatchInfer,
    BatchNotFoundError,
    BatchStatus,
    CompletionStatus,
    InvalidBatchError,
    InvalidRequestError,
    OpenAIProvider,
    ProviderError,
    ProviderRejectedError,
    ProviderUnavailableError,
    RequestCounts,
)
from batchinfer.testing import Emulator
from tests.helpers import chat_requests

CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
SECRET_KEY = "sk-proj-UNIQUESECRET-7f3a9c2e1d"


async def new_batch(bi: BatchInfer, n: int = 3) -> Batch:
    return await bi.create_batch(
        provider="openai", endpoint=CHAT, model=MODEL, requests=chat_requests(n)
    )


def calls(emulator: Emulator, method: str, path: str) -> int:
    return sum(1 for m, p in emulator.requests if m == method and p == path)


def assert_no_secret(exc: BaseException, *extra: object) -> None:
    texts = ["".join(traceback.format_exception(exc)), repr(exc), str(exc.args)]
    chained: BaseException | None = exc
    while chained is not None:
        texts += [str(chained), repr(chained)]
        chained = chained.__cause__ or chained.__context__
    texts += [repr(x) for x in extra]
    for text in texts:
        assert SECRET_KEY not in text
        assert SECRET_KEY[8:] not in text


async def assert_still_pending(bi: BatchInfer, batch: Batch) -> None:
    current = await bi.get_batch(batch)
    assert current.status is BatchStatus.PENDING
    assert current.provider_batch_id is None
    assert current.submitted_at is None
    assert {c.status async for c in bi.completions(batch)} == {CompletionStatus.PENDING}


@pytest.fixture
async def secret_emulator() -> AsyncIterator[Emulator]:
    async with Emulator(api_key=SECRET_KEY) as emu:
        yield emu


@pytest.fixture
def secret_provider(secret_emulator: Emulator) -> OpenAIProvider:
    return OpenAIProvider(api_key=SECRET_KEY, base_url=secret_emulator.base_url)


@pytest.fixture
async def secret_bi(
    bi: BatchInfer, engine: AsyncEngine, schema: str, secret_provider: OpenAIProvider
) -> AsyncIterator[BatchInfer]:
    """A client whose API key is distinctive, on the schema ``bi`` migrated."""
    async with BatchInfer(
        engine, providers=[secret_provider], schema=schema, poll_interval=0
    ) as client:
        yield client


# -- what submit refuses, before any network call ---------------------------------------------


async def test_already_submitted_batch_is_refused_without_network(
    bi: BatchInfer, emulator: Emulator
) -> None:
    batch = await bi.submit_batch(await new_batch(bi))
    seen = len(emulator.requests)
    with pytest.raises(InvalidBatchError, match="only a pending batch can be submitted"):
        await bi.submit_batch(batch)
    assert len(emulator.requests) == seen
    assert len(emulator.batches) == 1
    assert (await bi.get_batch(batch)).provider_batch_id == batch.provider_batch_id


async def test_unknown_batch_id_is_refused_without_network(
    bi: BatchInfer, emulator: Emulator
) -> None:
    missing = uuid.uuid4()
    with pytest.raises(BatchNotFoundError, match=str(missing)):
        await bi.submit_batch(missing)
    with pytest.raises(BatchNotFoundError):
        await bi.submit_batch(str(missing))
    assert emulator.requests == []


async def test_non_uuid_string_is_refused_without_network(
    bi: BatchInfer, emulator: Emulator
) -> None:
    with pytest.raises(InvalidRequestError, match="'batch-42' is not a batch id"):
        await bi.submit_batch("batch-42")
    assert emulator.requests == []


@pytest.mark.parametrize(
    "ref",
    [
        pytest.param(lambda b: b, id="Batch"),
        pytest.param(lambda b: b.id, id="UUID"),
        pytest.param(lambda b: str(b.id), id="str"),
    ],
)
async def test_submit_accepts_every_batch_reference(
    bi: BatchInfer, emulator: Emulator, ref: Callable[[Batch], Any]
) -> None:
    batch = await new_batch(bi)
    submitted = await bi.submit_batch(ref(batch))
    assert submitted.id == batch.id
    assert submitted.status is BatchStatus.VALIDATING
    assert list(emulator.batches) == [submitted.provider_batch_id]


async def test_concurrent_submits_record_exactly_one_provider_batch(
    bi: BatchInfer, emulator: Emulator
) -> None:
    batch = await new_batch(bi)
    results = await asyncio.gather(
        bi.submit_batch(batch), bi.submit_batch(batch), return_exceptions=True
    )
    winners = [r for r in results if isinstance(r, Batch)]
    losers = [r for r in results if not isinstance(r, Batch)]
    assert len(winners) == 1
    assert len(losers) == 1
    assert isinstance(losers[0], InvalidBatchError)
    # Refused while the winner holds the claim, or as already submitted once it is done.
    assert "being submitted by another caller" in str(losers[0]) or "only a pending" in str(
        losers[0]
    )
    # The loser stopped before the network: one upload, one provider batch, nothing to cancel.
    assert calls(emulator, "POST", "/v1/files") == 1
    assert len(emulator.batches) == 1
    stored = await bi.get_batch(batch)
    assert stored.provider_batch_id == winners[0].provider_batch_id
    assert stored.provider_batch_id in emulator.batches
    assert emulator.batches[stored.provider_batch_id]["input_file_id"] == stored.input_file_id


# -- what is sent -----------------------------------------------------------------------------


async def test_upload_is_a_batch_purpose_file(bi: BatchInfer, emulator: Emulator) -> None:
    batch = await bi.submit_batch(await new_batch(bi))
    assert batch.input_file_id is not None
    assert calls(emulator, "POST", "/v1/files") == 1
    # Read the file object back over the emulator's public HTTP API.
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{emulator.base_url}/files/{batch.input_file_id}",
            headers={"Authorization": f"Bearer {emulator.api_key}"},
        ) as resp,
    ):
        assert resp.status == 200
        file_object = await resp.json()
    assert file_object["purpose"] == "batch"
    assert file_object["bytes"] == batch.input_bytes
    assert file_object["filename"] == f"batchinfer-{batch.id}.jsonl"


async def test_uploaded_lines_are_the_stored_requests_in_order(
    bi: BatchInfer, emulator: Emulator
) -> None:
    requests = chat_requests(5)
    requests.reverse()  # line order, not custom_id order
    batch = await bi.create_batch(provider="openai", endpoint=CHAT, model=MODEL, requests=requests)
    batch = await bi.submit_batch(batch)
    assert batch.input_file_id is not None
    content = emulator.file_content(batch.input_file_id)
    assert content.endswith(b"\n")
    lines = [orjson.loads(line) for line in content.splitlines()]
    stored = [c async for c in bi.completions(batch)]
    assert [line["custom_id"] for line in lines] == [c.custom_id for c in stored]
    assert [line["custom_id"] for line in lines] == [r["custom_id"] for r in requests]
    assert [line["body"] for line in lines] == [c.request_body for c in stored]
    assert all(line["method"] == "POST" and line["url"] == CHAT for line in lines)
    assert all(line["body"]["model"] == MODEL for line in lines)


async def test_upload_streams_more_than_one_page(bi: BatchInfer, emulator: Emulator) -> None:
    # More lines than one page read from the database, so the upload is assembled from pages.
    requests = [{"custom_id": f"r{i}", "body": {"messages": []}} for i in range(4_500)]
    batch = await bi.create_batch(provider="openai", endpoint=CHAT, model=MODEL, requests=requests)
    batch = await bi.submit_batch(batch)
    assert batch.input_file_id is not None
    content = emulator.file_content(batch.input_file_id)
    ids = [orjson.loads(line)["custom_id"] for line in content.splitlines()]
    assert ids == [f"r{i}" for i in range(4_500)]
    assert len(content) == batch.input_bytes


async def test_provider_batch_carries_our_id_and_a_24h_window(
    bi: BatchInfer, emulator: Emulator
) -> None:
    batch = await bi.submit_batch(await new_batch(bi))
    assert batch.provider_batch_id is not None
    obj = emulator.batches[batch.provider_batch_id]
    assert obj["completion_window"] == "24h"
    assert obj["metadata"] == {"batchinfer_batch_id": str(batch.id)}
    assert obj["endpoint"] == CHAT
    assert obj["input_file_id"] == batch.input_file_id


# -- what is recorded -------------------------------------------------------------------------


async def test_submission_is_recorded(bi: BatchInfer, emulator: Emulator) -> None:
    created = await new_batch(bi, 4)
    returned = await bi.submit_batch(created)
    batch = await bi.get_batch(created)
    assert batch == returned
    assert batch.provider_batch_id is not None
    assert batch.provider_batch_id in emulator.batches
    assert batch.input_file_id is not None
    assert batch.input_file_id in emulator.files
    assert batch.status is BatchStatus.VALIDATING
    assert batch.submitted_at is not None
    assert batch.submitted_at >= batch.created_at
    assert batch.ended_at is None
    counts = emulator.batches[batch.provider_batch_id]["request_counts"]
    assert isinstance(counts, dict)
    assert batch.request_counts == RequestCounts(**counts)
    comps = [c async for c in bi.completions(batch)]
    assert len(comps) == 4
    assert {c.status for c in comps} == {CompletionStatus.SUBMITTED}
    assert all(c.started_at is not None for c in comps)


async def test_existing_started_at_is_kept(
    bi: BatchInfer, engine: AsyncEngine, schema: str
) -> None:
    batch = await new_batch(bi)
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                f"UPDATE \"{schema}\".completions SET started_at = '2001-02-03T04:05:06Z' "
                "WHERE batch_id = :b AND custom_id = 'q1'"
            ),
            {"b": batch.id},
        )
    await bi.submit_batch(batch)
    started = {c.custom_id: c.started_at async for c in bi.completions(batch)}
    assert started["q1"] is not None
    assert started["q1"].isoformat() == "2001-02-03T04:05:06+00:00"
    assert started["q0"] is not None
    assert started["q0"].year > 2001
    assert started["q2"] is not None
    assert started["q2"].year > 2001


# -- provider errors --------------------------------------------------------------------------


async def test_wrong_api_key_raises_authentication_error_and_records_nothing(
    bi: BatchInfer, engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    batch = await new_batch(bi)
    provider = OpenAIProvider(api_key=SECRET_KEY, base_url=emulator.base_url)
    async with BatchInfer(engine, providers=[provider], schema=schema) as wrong:
        with pytest.raises(AuthenticationError) as info:
            await wrong.submit_batch(batch)
    assert info.value.status == 401
    assert "API key" in str(info.value)
    assert_no_secret(info.value, provider)
    # The first call (looking for an earlier upload) failed, and was not retried.
    assert calls(emulator, "GET", "/v1/files") == 1
    assert calls(emulator, "POST", "/v1/files") == 0
    assert emulator.files == {}
    assert emulator.batches == {}
    await assert_still_pending(bi, batch)
    assert (await bi.get_batch(batch)).input_file_id is None


async def test_upload_500_once_is_retried(bi: BatchInfer, emulator: Emulator) -> None:
    emulator.fail_http("POST", "/files", 500, times=1)
    batch = await bi.submit_batch(await new_batch(bi))
    assert batch.status is BatchStatus.VALIDATING
    assert calls(emulator, "POST", "/v1/files") == 2
    assert len(emulator.files) == 1
    assert batch.input_file_id in emulator.files


async def test_upload_dropped_once_is_retried_with_the_whole_file(
    bi: BatchInfer, emulator: Emulator
) -> None:
    emulator.drop_connection("POST", "/files", times=1)
    batch = await bi.submit_batch(await new_batch(bi, 10))
    assert calls(emulator, "POST", "/v1/files") == 2
    assert batch.input_file_id is not None
    assert len(emulator.file_content(batch.input_file_id)) == batch.input_bytes


async def test_upload_500_that_persists_raises_unavailable_and_stays_pending(
    bi: BatchInfer, emulator: Emulator
) -> None:
    emulator.fail_http("POST", "/files", 500, times=10)
    batch = await new_batch(bi)
    with pytest.raises(ProviderUnavailableError, match="HTTP 500") as info:
        await bi.submit_batch(batch)
    assert info.value.status == 500
    assert calls(emulator, "POST", "/v1/files") > 1
    assert calls(emulator, "POST", "/v1/batches") == 0
    await assert_still_pending(bi, batch)
    assert (await bi.get_batch(batch)).input_file_id is None


async def test_upload_dropped_connection_raises_unavailable(
    bi: BatchInfer, emulator: Emulator
) -> None:
    emulator.drop_connection("POST", "/files", times=10)
    batch = await new_batch(bi)
    with pytest.raises(ProviderUnavailableError, match="uploading the batch input file"):
        await bi.submit_batch(batch)
    assert emulator.files == {}
    await assert_still_pending(bi, batch)


async def test_create_429_with_retry_after_is_retried(bi: BatchInfer, emulator: Emulator) -> None:
    emulator.fail_http("POST", "/batches", 429, times=1, headers={"Retry-After": "7"})
    batch = await bi.submit_batch(await new_batch(bi))
    assert batch.status is BatchStatus.VALIDATING
    assert calls(emulator, "POST", "/v1/batches") == 2
    assert calls(emulator, "POST", "/v1/files") == 1
    assert list(emulator.batches) == [batch.provider_batch_id]


async def test_a_create_that_fails_is_retried_after_looking_for_what_it_may_have_made(
    bi: BatchInfer, emulator: Emulator
) -> None:
    emulator.fail_http("POST", "/batches", 500, times=1)
    batch = await new_batch(bi)
    submitted = await bi.submit_batch(batch)
    assert submitted.status is BatchStatus.VALIDATING
    assert calls(emulator, "POST", "/v1/files") == 1
    assert calls(emulator, "POST", "/v1/batches") == 2
    # Before creating again it looked for a batch the first attempt might have made.
    assert calls(emulator, "GET", "/v1/batches") == 1
    assert submitted.provider_batch_id is not None
    assert emulator.batches[submitted.provider_batch_id]["input_file_id"] == (
        submitted.input_file_id
    )


async def test_a_create_that_keeps_failing_leaves_the_upload_for_the_next_submit(
    bi: BatchInfer, emulator: Emulator
) -> None:
    emulator.fail_http("POST", "/batches", 500, times=3)  # every attempt (3 in tests)
    batch = await new_batch(bi)
    with pytest.raises(ProviderUnavailableError, match="creating the batch failed with HTTP 500"):
        await bi.submit_batch(batch)
    assert calls(emulator, "POST", "/v1/batches") == 3
    assert calls(emulator, "POST", "/v1/files") == 1
    after_failure = await bi.get_batch(batch)
    assert after_failure.status is BatchStatus.PENDING
    assert after_failure.provider_batch_id is None
    assert after_failure.input_file_id in emulator.files

    submitted = await bi.submit_batch(batch)
    assert submitted.status is BatchStatus.VALIDATING
    assert calls(emulator, "POST", "/v1/files") == 1
    assert calls(emulator, "POST", "/v1/batches") == 4
    assert submitted.input_file_id == after_failure.input_file_id


async def test_create_400_raises_rejected_with_the_providers_message(
    bi: BatchInfer, emulator: Emulator
) -> None:
    emulator.fail_http(
        "POST",
        "/batches",
        400,
        body={
            "error": {
                "message": "Enqueued token limit reached for gpt-4o-mini.",
                "type": "invalid_request_error",
                "code": "token_limit_exceeded",
            }
        },
    )
    batch = await new_batch(bi)
    with pytest.raises(ProviderRejectedError) as info:
        await bi.submit_batch(batch)
    assert "Enqueued token limit reached for gpt-4o-mini." in str(info.value)
    assert info.value.status == 400
    assert info.value.code == "token_limit_exceeded"
    assert calls(emulator, "POST", "/v1/batches") == 1
    await assert_still_pending(bi, batch)


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(lambda e: e.fail_http("POST", "/files", 500, times=10), id="upload-500"),
        pytest.param(lambda e: e.drop_connection("POST", "/files", times=10), id="upload-dropped"),
        pytest.param(lambda e: e.fail_http("POST", "/batches", 500, times=10), id="create-500"),
        pytest.param(lambda e: e.fail_http("POST", "/batches", 400), id="create-400"),
        pytest.param(lambda e: e.fail_http("POST", "/batches", 429, times=10), id="create-429"),
        pytest.param(lambda e: e.fail_http("POST", "/files", 403), id="upload-403"),
    ],
)
async def test_no_error_contains_the_api_key(
    secret_bi: BatchInfer,
    secret_emulator: Emulator,
    secret_provider: OpenAIProvider,
    fault: Callable[[Emulator], None],
) -> None:
    batch = await new_batch(secret_bi)
    fault(secret_emulator)
    with pytest.raises(ProviderError) as info:
        await secret_bi.submit_batch(batch)
    assert_no_secret(info.value, secret_bi, secret_provider)


async def test_resubmit_reattaches_to_a_batch_created_by_a_lost_attempt(
    bi: BatchInfer, emulator: Emulator
) -> None:
    # First submit: uploaded, then no create answer ever arrived (3 attempts in tests).
    emulator.fail_http("POST", "/batches", 500, times=3)
    batch = await new_batch(bi)
    with pytest.raises(ProviderUnavailableError):
        await bi.submit_batch(batch)
    uploaded = await bi.get_batch(batch)
    assert uploaded.input_file_id is not None
    # What the lost attempt did at the provider (a crash after the create call has this
    # effect): a batch over our file, tagged with our id. Another app's batch sits beside it.
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {emulator.api_key}"}
    ) as http:
        for tag in (str(batch.id), str(uuid.uuid4())):
            async with http.post(
                f"{emulator.base_url}/batches",
                json={
                    "input_file_id": uploaded.input_file_id,
                    "endpoint": CHAT,
                    "completion_window": "24h",
                    "metadata": {"batchinfer_batch_id": tag},
                },
            ) as resp:
                assert resp.status == 200
    ours = next(
        bid
        for bid, b in emulator.batches.items()
        if b["metadata"] == {"batchinfer_batch_id": str(batch.id)}
    )

    submitted = await bi.submit_batch(batch)
    assert submitted.provider_batch_id == ours
    assert submitted.status is BatchStatus.VALIDATING
    assert calls(emulator, "POST", "/v1/batches") == 5  # the 3 failed ones and the 2 above
    assert calls(emulator, "POST", "/v1/files") == 1
    assert {c.status async for c in bi.completions(batch)} == {CompletionStatus.SUBMITTED}


class _NotingProvider(OpenAIProvider):
    """Notes each step in the checkpoint, and fails once right after the first note: the way
    a provider whose submit has several steps (create, then add pages) resumes."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen_notes: list[dict[str, str]] = []
        self.failed = False

    async def submit(self, requests: Any, *, key: Any, checkpoint: Any) -> Any:
        self.seen_notes.append(dict(checkpoint.notes))
        if "began" not in checkpoint.notes:
            await checkpoint.note(began="yes", pages="0")
        if not self.failed:
            self.failed = True
            raise ProviderUnavailableError("the connection dropped after the first step")
        await checkpoint.note(pages="1")
        return await super().submit(requests, key=key, checkpoint=checkpoint)


async def test_a_retried_submit_reads_the_notes_an_earlier_one_left(
    engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    provider = _NotingProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    async with BatchInfer(engine, providers=[provider], schema=schema) as bi:
        await bi.migrate()
        batch = await new_batch(bi)
        with pytest.raises(ProviderUnavailableError):
            await bi.submit_batch(batch)
        assert (await bi.get_batch(batch)).submit_state == {"began": "yes", "pages": "0"}
        submitted = await bi.submit_batch(batch)
    assert provider.seen_notes == [{}, {"began": "yes", "pages": "0"}]
    assert submitted.submit_state == {"began": "yes", "pages": "1"}
    assert submitted.status is BatchStatus.VALIDATING
    assert calls(emulator, "POST", "/v1/batches") == 1
