"""The lifecycle scenarios every provider passes, the same test for each: a new provider is
added by adding its case here (and to the emulator) and passing them.

Each case says how to reach the provider at the emulator, which endpoint and model a batch uses,
requests in the provider's own body format, and which paths its API calls take (for scripting
faults). The assertions are about batchinfer's behaviour only, never the provider's wire.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from batchinfer import (
    AnthropicProvider,
    AzureOpenAIProvider,
    BatchInfer,
    BatchStatus,
    CompletionStatus,
    GeminiProvider,
    OpenAIProvider,
    Provider,
    XAIProvider,
)
from batchinfer.testing import Emulator
from tests.helpers import chat_requests


@dataclass(frozen=True)
class Case:
    name: str
    endpoint: str
    model: str
    #: Makes the provider for this emulator (and sets the emulator up for it).
    make: Callable[[Emulator], Provider]
    requests: Callable[[int], list[dict[str, Any]]]
    #: The call that creates the batch at the provider, as (method, path) for fault scripts.
    create: tuple[str, str]
    #: The path a poll of this provider batch id GETs.
    poll: Callable[[str], str]
    #: The path the results download of an ended provider batch GETs.
    results: Callable[[Emulator, str], str]
    #: Results come as one body, resumed with Range when cut (rather than JSON pages).
    ranged: bool = True
    #: A cancel takes effect at once (nothing pending runs), rather than after a while.
    cancels_at_once: bool = False
    #: The test id, when one provider is tested in two ways.
    label: str = ""

    def __str__(self) -> str:
        return self.label or self.name


def _messages(n: int) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"q{i}",
            "body": {"max_tokens": 32, "messages": [{"role": "user", "content": f"question {i}"}]},
        }
        for i in range(n)
    ]


def _azure(emulator: Emulator) -> Provider:
    emulator.azure_deployment("gpt-4o-mini-batch", "gpt-4o-mini-2024-07-18")
    return AzureOpenAIProvider(endpoint=emulator.azure_endpoint, api_key=emulator.api_key)


def _xai_results(emulator: Emulator, provider_batch_id: str) -> str:
    return f"/xai/v1/batches/{provider_batch_id}/results"


def _contents(n: int) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"q{i}",
            "body": {"contents": [{"role": "user", "parts": [{"text": f"question {i}"}]}]},
        }
        for i in range(n)
    ]


def _gemini(inline: bool) -> Case:
    def results(emulator: Emulator, provider_batch_id: str) -> str:
        if inline:
            return f"/v1beta/{provider_batch_id}"
        return f"/v1beta/files/batch-{provider_batch_id.removeprefix('batches/')}:download"

    return Case(
        name="gemini",
        endpoint="generateContent",
        model="gemini-2.5-flash",
        make=lambda e: GeminiProvider(
            api_key=e.api_key,
            base_url=e.gemini_base_url,
            inline_max_bytes=1 << 20 if inline else 0,
        ),
        requests=_contents,
        create=("POST", "/v1beta/models/gemini-2.5-flash:batchGenerateContent"),
        poll=lambda pb: f"/v1beta/{pb}",
        results=results,
        ranged=not inline,
        cancels_at_once=True,
        label="gemini-inline" if inline else "gemini-file",
    )


CASES = [
    Case(
        name="openai",
        endpoint="/v1/chat/completions",
        model="gpt-4o-mini",
        make=lambda e: OpenAIProvider(api_key=e.api_key, base_url=e.base_url),
        requests=chat_requests,
        create=("POST", "/v1/batches"),
        poll=lambda pb: f"/v1/batches/{pb}",
        results=lambda e, pb: f"/v1/files/{e.batches[pb]['output_file_id']}/content",
    ),
    Case(
        name="azure",
        endpoint="/v1/chat/completions",
        model="gpt-4o-mini-batch",  # a deployment's name; responses name the model
        make=lambda e: _azure(e),
        requests=chat_requests,
        create=("POST", "/openai/v1/batches"),
        poll=lambda pb: f"/openai/v1/batches/{pb}",
        results=lambda e, pb: f"/openai/v1/files/{e.batches[pb]['output_file_id']}/content",
    ),
    Case(
        name="xai",
        endpoint="/v1/chat/completions",
        model="grok-4",
        make=lambda e: XAIProvider(api_key=e.api_key, base_url=e.xai_base_url),
        requests=chat_requests,
        create=("POST", "/xai/v1/batches"),
        poll=lambda pb: f"/xai/v1/batches/{pb}",
        results=_xai_results,
        ranged=False,
        cancels_at_once=True,
    ),
    Case(
        name="anthropic",
        endpoint="/v1/messages",
        model="claude-3-5-haiku-20241022",
        make=lambda e: AnthropicProvider(api_key=e.api_key, base_url=e.anthropic_base_url),
        requests=_messages,
        create=("POST", "/v1/messages/batches"),
        poll=lambda pb: f"/v1/messages/batches/{pb}",
        results=lambda e, pb: f"/v1/messages/batches/{pb}/results",
    ),
    _gemini(inline=True),
    _gemini(inline=False),
]


@pytest.fixture(params=CASES, ids=str)
def case(request: pytest.FixtureRequest) -> Case:
    chosen: Case = request.param
    return chosen


@pytest.fixture
async def bi(
    engine: AsyncEngine, schema: str, emulator: Emulator, case: Case
) -> AsyncIterator[BatchInfer]:
    async with BatchInfer(
        engine, providers=[case.make(emulator)], schema=schema, poll_interval=0
    ) as client:
        await client.migrate()
        yield client


async def submitted(bi: BatchInfer, case: Case, n: int, **kwargs: Any) -> Any:
    batch = await bi.create_batch(
        provider=case.name,
        endpoint=case.endpoint,
        model=case.model,
        requests=case.requests(n),
        **kwargs,
    )
    batch = await bi.submit_batch(batch)
    assert batch.provider_batch_id is not None
    return batch


async def running(emulator: Emulator, provider_batch_id: str) -> None:
    """Past validation, where a provider has that step, so requests can run one by one."""
    while emulator.batches.get(provider_batch_id, {}).get("status") == "validating":
        await emulator.advance(provider_batch_id)


async def test_results_errors_and_missing_entries(
    bi: BatchInfer, emulator: Emulator, case: Case
) -> None:
    emulator.fail_request("q2", status=400, message="scripted refusal")
    emulator.drop_request("q4")
    batch = await submitted(bi, case, 6)
    await emulator.finish(batch.provider_batch_id)
    done = await bi.wait(batch)
    assert done.status is BatchStatus.COMPLETED
    rows = {c.custom_id: c async for c in bi.completions(done)}
    assert [rows[f"q{i}"].status for i in range(6)] == [
        CompletionStatus.COMPLETED,
        CompletionStatus.COMPLETED,
        CompletionStatus.FAILED,
        CompletionStatus.COMPLETED,
        CompletionStatus.FAILED,
        CompletionStatus.COMPLETED,
    ]
    assert rows["q2"].failure_reason == "scripted refusal"
    assert rows["q4"].failure_reason is not None
    assert "not present in" in rows["q4"].failure_reason
    answered = rows["q0"]
    assert answered.output_text is not None
    assert answered.output_text.startswith("Echo: question 0")
    assert answered.prompt_tokens
    assert answered.completion_tokens
    assert answered.total_cost is not None
    assert answered.total_cost > 0
    assert done.total_cost == sum(c.total_cost or 0 for c in rows.values())
    report = bi.last_apply_report
    assert report is not None
    assert (report.applied, report.swept, report.malformed) == (5, 1, 0)


async def test_expiry_keeps_what_ran(bi: BatchInfer, emulator: Emulator, case: Case) -> None:
    batch = await submitted(bi, case, 5)
    await running(emulator, batch.provider_batch_id)
    await emulator.process(batch.provider_batch_id, 2)
    await emulator.expire(batch.provider_batch_id)
    done = await bi.wait(batch)
    assert done.status is BatchStatus.EXPIRED
    assert (await bi.summary(done))["by_status"] == {"completed": 2, "failed": 3}


async def test_cancellation_keeps_what_ran(bi: BatchInfer, emulator: Emulator, case: Case) -> None:
    batch = await submitted(bi, case, 5)
    await running(emulator, batch.provider_batch_id)
    await emulator.process(batch.provider_batch_id, 3)
    expected = BatchStatus.CANCELLED if case.cancels_at_once else BatchStatus.CANCELLING
    assert await bi.cancel_batch(batch) is expected
    await emulator.finish(batch.provider_batch_id)
    done = await bi.wait(batch)
    assert done.status is BatchStatus.CANCELLED
    assert (await bi.summary(done))["by_status"] == {"completed": 3, "failed": 2}


async def test_a_refused_submission_ends_the_batch_failed(
    bi: BatchInfer, emulator: Emulator, case: Case
) -> None:
    emulator.fail_http(*case.create, 400, times=None)
    batch = await bi.create_batch(
        provider=case.name,
        endpoint=case.endpoint,
        model=case.model,
        requests=case.requests(3),
        submit=True,
    )
    assert await bi.worker().run_once() == 1
    done = await bi.get_batch(batch)
    assert done.status is BatchStatus.FAILED
    assert done.failure_reason is not None
    assert "refused the submission" in done.failure_reason
    assert done.results_applied_at is not None
    assert (await bi.summary(done))["by_status"] == {"failed": 3}


async def test_rate_limits_and_server_errors_are_ridden_through(
    bi: BatchInfer, emulator: Emulator, case: Case
) -> None:
    emulator.fail_http(*case.create, 503)
    emulator.fail_http(*case.create, 429, headers={"retry-after": "0"})
    batch = await submitted(bi, case, 3)
    emulator.fail_http("GET", case.poll(batch.provider_batch_id), 500)
    emulator.fail_http("GET", case.poll(batch.provider_batch_id), 429)
    await emulator.finish(batch.provider_batch_id)
    done = await bi.wait(batch)
    assert (await bi.summary(done))["by_status"] == {"completed": 3}


async def test_a_download_cut_mid_way_is_resumed(
    bi: BatchInfer, emulator: Emulator, case: Case
) -> None:
    batch = await submitted(bi, case, 40)
    await emulator.finish(batch.provider_batch_id)
    results = case.results(emulator, batch.provider_batch_id)
    emulator.drop_connection("GET", results, after_bytes=1_500)
    done = await bi.wait(batch)
    assert (await bi.summary(done))["by_status"] == {"completed": 40}
    if case.ranged:
        resumed = [r for r in emulator.received if r.headers.get("Range") == "bytes=1500-"]
        assert len(resumed) == 1
    else:  # a page is asked for again
        assert sum(1 for r in emulator.received if r.path == results) >= 2


async def test_a_second_pass_changes_nothing(
    bi: BatchInfer, emulator: Emulator, case: Case
) -> None:
    batch = await submitted(bi, case, 4)
    await emulator.finish(batch.provider_batch_id)
    done = await bi.wait(batch)
    before = [c async for c in bi.completions(done)]
    again = await bi.fetch_batch_results(done, force=True)
    assert again.results_applied_at == done.results_applied_at
    assert [c async for c in bi.completions(done)] == before
