"""``batchinfer demo``: a whole batch's life on this machine, with nothing to set up.

A Postgres (embedded, unless a URL is given) and the local emulator stand in for a production
database and OpenAI; everything else is the code an app would run.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from decimal import Decimal
from pathlib import Path
from typing import TextIO

from batchinfer.client import BatchInfer
from batchinfer.domain import Batch
from batchinfer.providers import provider_named
from batchinfer.testing import Emulator
from batchinfer.testing.postgres import start_embedded_postgres

TOPICS = ("tides", "volcanoes", "bread", "comets", "bees", "glaciers", "jazz", "maps")


#: What the demo runs on each provider: its endpoint and default model.
DEMO_PROVIDERS = {
    "openai": ("/v1/chat/completions", "gpt-4o-mini"),
    "anthropic": ("/v1/messages", "claude-haiku-4-5"),
    "azure": ("/v1/chat/completions", "gpt-4o-mini"),
    "xai": ("/v1/chat/completions", "grok-4"),
    "gemini": ("generateContent", "gemini-2.5-flash"),
}
_SYSTEM = "You write one-sentence summaries."


def demo_requests(n: int, provider: str = "openai") -> list[dict[str, object]]:
    """Requests in the provider's own format (Anthropic's system prompt is a field)."""
    requests: list[dict[str, object]] = []
    for i in range(n):
        ask = {
            "role": "user",
            "content": f"Summarise article {i} about {TOPICS[i % len(TOPICS)]} for a "
            "newsletter, in plain words.",
        }
        body: dict[str, object]
        if provider == "anthropic":
            body = {"system": _SYSTEM, "messages": [ask], "max_tokens": 60}
        elif provider == "gemini":
            body = {
                "systemInstruction": {"parts": [{"text": _SYSTEM}]},
                "contents": [{"role": "user", "parts": [{"text": ask["content"]}]}],
                "generationConfig": {"maxOutputTokens": 60},
            }
        else:
            body = {"messages": [{"role": "system", "content": _SYSTEM}, ask]}
            body["max_completion_tokens"] = 60
        requests.append(
            {"custom_id": f"summary-{i:05d}", "body": body, "metadata": {"article_id": i}}
        )
    return requests


async def run_demo(
    *,
    requests: int = 1_000,
    database_url: str | None = None,
    step_seconds: float = 1.0,
    model: str | None = None,
    provider: str = "openai",
    schema: str = "batchinfer",
    out: TextIO = sys.stdout,
) -> Batch:
    """Create, submit, follow and collect one batch; print what a user wants to see."""
    started = time.monotonic()

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    async with AsyncExitStack() as stack:
        if database_url is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="batchinfer-demo-"))
            say("Starting an embedded Postgres (set BATCHINFER_DATABASE_URL to use your own)...")
            server = await asyncio.to_thread(start_embedded_postgres, Path(tmp) / "pgdata")
            stack.callback(server.stop)
            database_url = server.url
        emulator = await stack.enter_async_context(Emulator(step_seconds=step_seconds))
        if provider not in DEMO_PROVIDERS:
            raise ValueError(f"no demo for provider {provider!r}: {', '.join(DEMO_PROVIDERS)}")
        endpoint, default_model = DEMO_PROVIDERS[provider]
        model = model or default_model
        url = emulator.base_url_for(provider)
        adapter = provider_named(provider, api_key=emulator.api_key, base_url=url)
        say(f"Emulator of the {provider} batch API listening at {url}")
        # A few requests fail at the provider and two never come back, as in real batches.
        for i in range(7, requests, 97):
            emulator.fail_request(f"summary-{i:05d}", status=400, message="Invalid 'messages'.")
        for i in (3, requests - 2):
            if 0 <= i < requests:
                emulator.drop_request(f"summary-{i:05d}")

        bi = await stack.enter_async_context(
            BatchInfer(database_url, providers=[adapter], schema=schema, poll_interval=0.5)
        )
        await bi.migrate()

        batch = await bi.create_batch(
            provider=provider,
            endpoint=endpoint,
            model=model,
            requests=demo_requests(requests, provider),
            metadata={"purpose": "demo"},
        )
        say(f"Created batch {batch.id}: {batch.request_total:,} requests, {batch.input_bytes:,} B")
        batch = await bi.submit_batch(batch)
        uploaded = f" (input file {batch.input_file_id})" if batch.input_file_id else ""
        say(f"Submitted as {batch.provider_batch_id}{uploaded}")

        async def progress(current: Batch) -> None:
            counts = current.request_counts
            done = counts.completed + counts.failed
            say(
                f"  {time.monotonic() - started:5.1f}s  {current.status.value:<11} "
                f"{done:>6,}/{counts.total or current.request_total:,} done "
                f"({counts.failed:,} failed)"
            )

        batch = await bi.wait(batch, on_poll=progress)
        elapsed = time.monotonic() - started
        summary = await bi.summary(batch)
        report = bi.last_apply_report
        failures = []
        async for completion in bi.completions(batch, status="failed"):
            failures.append(completion)

    say("")
    say(f"Batch {batch.id} ended {batch.status.value} in {elapsed:.1f}s")
    for status, count in sorted(summary["by_status"].items()):
        say(f"  {status:<10} {count:>7,}")
    if report is not None:
        say(
            f"  results applied {report.applied:,}, missing from the results {report.swept:,}, "
            f"malformed lines {report.malformed:,}"
        )
    for completion in failures[:3]:
        say(
            f"  e.g. {completion.custom_id}: {completion.failure_error}: "
            f"{completion.failure_reason}"
        )
    say(
        f"Tokens: {summary['prompt_tokens']:,} prompt ({summary['cached_tokens']:,} cached), "
        f"{summary['completion_tokens']:,} completion"
    )
    if batch.total_cost is not None:
        live = batch.total_cost / adapter.batch_discount
        say(
            f"Cost: ${_usd(batch.total_cost)} as a batch; the same work live would cost "
            f"${_usd(live)} (saved ${_usd(live - batch.total_cost)})"
        )
    else:
        say(f"Cost: no price known for model {model!r}")
    return batch


def _usd(value: Decimal) -> str:
    return f"{value.quantize(Decimal('0.000001'))}"
