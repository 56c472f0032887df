"""The emulator's transport faults, seen through a raw aiohttp client, the openai SDK and
batchinfer's own calls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from batchinfer import BatchInfer, BatchStatus, CompletionStatus, ResultsNotReadyError
from batchinfer.testing import Emulator, FakeClock
from tests.helpers import chat_requests

CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"


@pytest.fixture
async def http(emulator: Emulator) -> AsyncIterator[aiohttp.ClientSession]:
    headers = {"Authorization": f"Bearer {emulator.api_key}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        yield session


def sdk(emulator: Emulator, *, max_retries: int = 0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key=emulator.api_key,
        base_url=emulator.base_url,
        _strict_response_validation=True,
        max_retries=max_retries,
    )


async def upload(http: aiohttp.ClientSession, emulator: Emulator, content: bytes) -> str:
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", content, filename="input.jsonl")
    async with http.post(f"{emulator.base_url}/files", data=form) as resp:
        assert resp.status == 200
        file_id: str = (await resp.json())["id"]
        return file_id


async def finished_batch(bi: BatchInfer, emulator: Emulator, n: int) -> Any:
    batch = await bi.create_batch(
        provider="openai", endpoint=CHAT, model=MODEL, requests=chat_requests(n)
    )
    batch = await bi.submit_batch(batch)
    assert batch.provider_batch_id is not None
    await emulator.finish(batch.provider_batch_id)
    return batch


CONTENT = bytes(range(256)) * 40  # 10,240 bytes, every offset distinguishable


# ---------------------------------------------------------------- Range


async def test_ranges_are_honoured_with_206_and_416(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    url = f"{emulator.base_url}/files/{await upload(http, emulator, CONTENT)}/content"
    size = len(CONTENT)

    async with http.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["Accept-Ranges"] == "bytes"
        assert await resp.read() == CONTENT
    cases = {
        "bytes=1000-": (1000, size),
        "bytes=10-19": (10, 20),
        "bytes=10-999999": (10, size),
        "bytes=-100": (size - 100, size),
        "bytes=0-0": (0, 1),
    }
    for header, (start, end) in cases.items():
        async with http.get(url, headers={"Range": header}) as resp:
            assert resp.status == 206, header
            assert resp.headers["Content-Range"] == f"bytes {start}-{end - 1}/{size}"
            assert resp.content_length == end - start
            assert await resp.read() == CONTENT[start:end]
    for header in (f"bytes={size}-", "bytes=99999-", "bytes=-0"):
        async with http.get(url, headers={"Range": header}) as resp:
            assert resp.status == 416, header
            assert resp.headers["Content-Range"] == f"bytes */{size}"
            assert (await resp.json())["error"]["message"].startswith("Range not satisfiable")
    # Units, lists and nonsense are ignored, as RFC 9110 allows: the whole file.
    for header in ("bytes=0-1,5-6", "items=0-1", "bytes=9-3", "bytes=x-", "bytes=-"):
        async with http.get(url, headers={"Range": header}) as resp:
            assert resp.status == 200, header
            assert await resp.read() == CONTENT


async def test_ranges_off_serves_whole_files(http: aiohttp.ClientSession) -> None:
    async with Emulator(ranges=False) as emu:
        headers = {"Authorization": f"Bearer {emu.api_key}"}
        url = f"{emu.base_url}/files/{await upload(http, emu, CONTENT)}/content"
        async with http.get(url, headers={**headers, "Range": "bytes=100-"}) as resp:
            assert resp.status == 200
            assert "Accept-Ranges" not in resp.headers
            assert "Content-Range" not in resp.headers
            assert await resp.read() == CONTENT
        emu.ranges = True
        async with http.get(url, headers={**headers, "Range": "bytes=100-"}) as resp:
            assert resp.status == 206
            assert await resp.read() == CONTENT[100:]


async def test_a_dropped_download_resumes_with_range(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    file_id = await upload(http, emulator, CONTENT)
    url = f"{emulator.base_url}/files/{file_id}/content"
    # after_bytes counts from the range's start, so each resumed request is cut again.
    emulator.drop_connection("GET", f"/files/{file_id}/content", times=2, after_bytes=3000)
    received = bytearray()
    for _ in range(2):
        headers = {"Range": f"bytes={len(received)}-"} if received else {}
        async with http.get(url, headers=headers) as resp:
            assert resp.content_length == len(CONTENT) - len(received)
            with pytest.raises(aiohttp.ClientPayloadError):  # noqa: PT012
                async for chunk in resp.content.iter_any():
                    received += chunk
    assert len(received) == 6000
    async with http.get(url, headers={"Range": "bytes=6000-"}) as resp:
        assert resp.status == 206
        received += await resp.read()
    assert received == CONTENT
    ranges = [r.headers.get("Range") for r in emulator.received if r.path.endswith("/content")]
    assert ranges == [None, "bytes=3000-", "bytes=6000-"]


async def test_the_sdk_downloads_files_as_before(emulator: Emulator) -> None:
    async with sdk(emulator) as client:
        created = await client.files.create(file=("in.jsonl", CONTENT), purpose="batch")
        content = await client.files.content(created.id)
        assert content.read() == CONTENT
        assert content.response.headers["accept-ranges"] == "bytes"


# ---------------------------------------------------------------- fault_rates


async def statuses(http: aiohttp.ClientSession, url: str, n: int) -> list[int]:
    seen = []
    for _ in range(n):
        async with http.get(url) as resp:
            seen.append(resp.status)
            if resp.status == 429:
                assert resp.headers["Retry-After"] == "1"
                assert resp.headers["retry-after-ms"] == "250"
                assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"
            elif resp.status >= 500:
                assert resp.headers["x-should-retry"] == "true"
                assert (await resp.json())["error"]["type"] == "server_error"
                assert ("Retry-After" in resp.headers) == (resp.status == 503)
    return seen


async def test_fault_rates_are_seeded_and_limited_to_their_paths(
    http: aiohttp.ClientSession,
) -> None:
    runs = []
    for seed in (7, 7, 8):
        async with Emulator(seed=seed, api_key="sk-emulator") as emu:
            emu.fault_rates(rate_limited=0.2, server_errors=0.3, retry_after=0.25, paths=["/v1/b"])
            runs.append(await statuses(http, f"{emu.base_url}/batches", 300))
            async with http.get(f"{emu.base_url}/files") as resp:
                assert resp.status == 200  # a path not listed is always served
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    share = {code: runs[0].count(code) / 300 for code in (200, 429, 500, 502, 503)}
    assert 0.12 < share[429] < 0.28
    assert 0.2 < share[500] + share[502] + share[503] < 0.4
    assert min(share[500], share[502], share[503]) > 0


async def test_fault_rates_turn_off_and_the_sdk_rides_through_them(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    emulator.fault_rates(rate_limited=0.25, server_errors=0.25, retry_after=0.01)
    async with sdk(emulator, max_retries=10) as client:
        for i in range(10):
            created = await client.files.create(file=(f"{i}.jsonl", b"{}\n"), purpose="batch")
            assert (await client.files.retrieve(created.id)).bytes == 3
    assert len(emulator.requests) > 20  # some answers were faults, and retried
    emulator.fault_rates()
    assert set(await statuses(http, f"{emulator.base_url}/batches", 50)) == {200}
    with pytest.raises(ValueError, match="at most 1"):
        emulator.fault_rates(rate_limited=0.6, server_errors=0.6)


async def test_a_status_poll_rides_through_a_503_with_retry_after(
    bi: BatchInfer, emulator: Emulator
) -> None:
    batch = await finished_batch(bi, emulator, 3)
    path = f"/batches/{batch.provider_batch_id}"
    emulator.fail_http("GET", path, 503, times=1, headers={"Retry-After": "1"})
    emulator.fail_http("GET", path, 429, times=1, headers={"retry-after-ms": "5"})
    assert await bi.fetch_batch_status(batch) is BatchStatus.COMPLETED
    assert emulator.requests[-3:] == [("GET", f"/v1{path}")] * 3


async def test_a_whole_batch_rides_through_random_faults(
    bi: BatchInfer, emulator: Emulator
) -> None:
    # Reads of ids only: retried whatever the answer. (POSTs that create are not.)
    emulator.fault_rates(
        rate_limited=0.15, server_errors=0.15, retry_after=0, paths=["/batches/", "/files/"]
    )
    batch = await bi.create_batch(
        provider="openai", endpoint=CHAT, model=MODEL, requests=chat_requests(50)
    )
    batch = await bi.submit_batch(batch)
    assert batch.provider_batch_id is not None
    await emulator.finish(batch.provider_batch_id)
    async with asyncio.timeout(30):
        done = await bi.wait(batch)
    assert done.results_applied_at is not None
    assert {c.status async for c in bi.completions(done)} == {CompletionStatus.COMPLETED}


# ---------------------------------------------------------------- slow and lost answers


async def test_slow_answers_come_late_and_are_served_even_after_a_timeout(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    emulator.slow("GET", "/files", 0.2, times=1)
    started = time.monotonic()
    async with http.get(f"{emulator.base_url}/files") as resp:
        assert resp.status == 200
    assert time.monotonic() - started >= 0.2
    started = time.monotonic()
    async with http.get(f"{emulator.base_url}/files") as resp:
        assert resp.status == 200
    assert time.monotonic() - started < 0.2

    emulator.slow("POST", "/files", 0.3)
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", b"{}\n", filename="late.jsonl")
    with pytest.raises(TimeoutError):
        await http.post(
            f"{emulator.base_url}/files", data=form, timeout=aiohttp.ClientTimeout(total=0.05)
        )
    await asyncio.sleep(0.4)
    assert list(emulator.files.values()) == [b"{}\n"]
    with pytest.raises(ValueError, match="between 0 and 60"):
        emulator.slow("GET", "/files", 61)


async def test_a_lost_answer_still_does_the_work(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    emulator.lose_answer("POST", "/files")
    async with sdk(emulator) as client:
        with pytest.raises(openai.APIConnectionError):
            await client.files.create(file=("in.jsonl", b'{"a": 1}\n'), purpose="batch")
        assert list(emulator.files.values()) == [b'{"a": 1}\n']
        file_id = next(iter(emulator.files))

        emulator.lose_answer("POST", "/batches")
        payload = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.post(f"{emulator.base_url}/batches", json=payload)
        assert len(emulator.batches) == 1
        batch_id = next(iter(emulator.batches))

        emulator.lose_answer("POST", f"/batches/{batch_id}/cancel")
        with pytest.raises(openai.APIConnectionError):
            await client.batches.cancel(batch_id)
        assert emulator.batches[batch_id]["status"] == "cancelling"
        assert (await client.batches.retrieve(batch_id)).status == "cancelling"

        emulator.lose_answer("GET", f"/files/{file_id}/content")
        with pytest.raises(openai.APIConnectionError):
            await client.files.content(file_id)
        assert (await client.files.content(file_id)).read() == b'{"a": 1}\n'


async def test_a_submit_whose_answers_are_lost_creates_one_file_and_one_batch(
    bi: BatchInfer, emulator: Emulator
) -> None:
    emulator.lose_answer("POST", "/files")
    emulator.lose_answer("POST", "/batches")
    batch = await bi.create_batch(
        provider="openai", endpoint=CHAT, model=MODEL, requests=chat_requests(3)
    )
    batch = await bi.submit_batch(batch)
    assert len(emulator.files) == 1
    assert list(emulator.batches) == [batch.provider_batch_id]


# ---------------------------------------------------------------- eventual consistency


async def test_new_objects_are_not_found_for_a_while(http: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    async with Emulator(clock=clock.time, api_key="sk-emulator") as emu:
        emu.early_not_found(5)
        file_id = await upload(http, emu, b'{"a": 1}\n')
        payload = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}
        async with http.post(f"{emu.base_url}/batches", json=payload) as resp:
            batch_id = (await resp.json())["id"]
        for path in (f"/files/{file_id}", f"/files/{file_id}/content", f"/batches/{batch_id}"):
            async with http.get(f"{emu.base_url}{path}") as resp:
                assert resp.status == 404, path
                assert (await resp.json())["error"]["message"].startswith("No such")
        async with http.get(f"{emu.base_url}/batches") as resp:
            assert [b["id"] for b in (await resp.json())["data"]] == [batch_id]
        clock.advance(5)
        for path in (f"/files/{file_id}", f"/files/{file_id}/content", f"/batches/{batch_id}"):
            async with http.get(f"{emu.base_url}{path}") as resp:
                assert resp.status == 200, path
        emu.early_not_found(0)
        fresh = await upload(http, emu, b"{}\n")
        async with http.get(f"{emu.base_url}/files/{fresh}") as resp:
            assert resp.status == 200


# ---------------------------------------------------------------- late output files


async def test_result_file_ids_are_withheld_for_some_polls(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    async with sdk(emulator) as client:
        created = await client.files.create(
            file=(
                "in.jsonl",
                b'{"custom_id": "a", "method": "POST", "url": "'
                + CHAT.encode()
                + b'", "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", '
                b'"content": "hi"}]}}\n',
            ),
            purpose="batch",
        )
        batch = await client.batches.create(
            input_file_id=created.id, endpoint=CHAT, completion_window="24h"
        )
        emulator.delay_output_file(batch.id, polls=2)
        assert (await client.batches.retrieve(batch.id)).output_file_id is None  # not ended
        await emulator.finish(batch.id)
        for _ in range(2):
            late = await client.batches.retrieve(batch.id)
            assert (late.status, late.output_file_id, late.error_file_id) == (
                "completed",
                None,
                None,
            )
            assert late.request_counts is not None
            assert late.request_counts.completed == 1
        listed = await client.batches.list()
        assert listed.data[0].output_file_id is not None  # lists are not delayed
        assert (await client.batches.retrieve(batch.id)).output_file_id == emulator.batches[
            batch.id
        ]["output_file_id"]


async def test_wait_rides_through_late_output_files(bi: BatchInfer, emulator: Emulator) -> None:
    emulator.delay_output_file(polls=3)
    batch = await finished_batch(bi, emulator, 5)
    assert await bi.fetch_batch_status(batch) is BatchStatus.COMPLETED
    with pytest.raises(ResultsNotReadyError):
        await bi.fetch_batch_results(batch)
    async with asyncio.timeout(30):
        done = await bi.wait(batch)
    assert done.output_file_id == emulator.batches[str(batch.provider_batch_id)]["output_file_id"]
    assert {c.status async for c in bi.completions(done)} == {CompletionStatus.COMPLETED}


# ---------------------------------------------------------------- bookkeeping


async def test_received_headers_and_clear_faults(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    emulator.fail_http("*", "/files", 500, times=None)
    emulator.drop_connection("POST", "/batches", times=None)
    emulator.slow("GET", "/batches", 30, times=None)
    emulator.lose_answer("*", "/", times=None)
    emulator.fault_rates(server_errors=1.0)
    emulator.early_not_found(60)
    emulator.delay_output_file(polls=5)
    emulator.clear_faults()
    async with http.get(f"{emulator.base_url}/files", headers={"X-Probe": "yes"}) as resp:
        assert resp.status == 200
    seen = emulator.received[-1]
    assert (seen.method, seen.path, seen.headers["x-probe"]) == ("GET", "/v1/files", "yes")
    assert emulator.requests[-1] == ("GET", "/v1/files")
    with pytest.raises(ValueError, match="times"):
        emulator.lose_answer("GET", "/files", times=0)
