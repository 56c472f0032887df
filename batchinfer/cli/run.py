"""``batchinfer run FILE.jsonl -o results.jsonl``: a batch input file in, its output file out.

The file is read twice as a stream, never held: once to check every line and fingerprint it
before the database is touched, once to feed ``create_batch``. The fingerprint (the run key)
is stored in the batch metadata, so running the same command again after Ctrl-C or a crash
re-attaches to the batch it started instead of paying for a second one.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from batchinfer.cli.common import (
    CliError,
    add_database_flags,
    add_provider_flags,
    check_writable,
    counts_text,
    open_batchinfer,
    positive_number,
    provider_from,
    say,
    usd,
    write_results,
)
from batchinfer.client import BatchInfer
from batchinfer.domain import Batch, BatchStatus
from batchinfer.errors import InvalidRequestError
from batchinfer.providers.base import Provider

RUN_KEY = "batchinfer_run_key"


def add_parser(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser(
        "run",
        help="run a batch input file (OpenAI's JSONL format) and write its output file",
        description="Create a batch from FILE (one request per line: custom_id, method, url, "
        "body, as for OpenAI's Batches API; with --provider anthropic, Anthropic's "
        "{custom_id, params} lines too; with --provider gemini, Gemini's {key, request} lines, "
        "each request naming its model), submit it, show its progress, then write one "
        "result per request, in request order, in OpenAI's output file format. Running the "
        "same command again (after Ctrl-C or a crash) re-attaches to the batch it started "
        "instead of submitting it twice. Exits 0 when the batch completed (failed requests "
        "are in the output), 1 when it ended otherwise, 2 on bad input, 130 on Ctrl-C.",
    )
    parser.add_argument("file", type=Path, metavar="FILE", help="batch input file (.jsonl)")
    parser.add_argument(
        "-o", "--output", type=Path, required=True, metavar="PATH", help="output file to write"
    )
    add_provider_flags(parser)
    add_database_flags(parser)
    parser.add_argument(
        "--poll-interval",
        type=positive_number,
        default=30.0,
        metavar="SECONDS",
        help="how often to ask the provider (default 30)",
    )
    parser.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="stored with the batch; repeatable",
    )
    parser.add_argument(
        "--new",
        action="store_true",
        help="start a new batch even if an earlier run of the same file exists",
    )
    parser.set_defaults(handler=run_command)


@dataclass(frozen=True)
class InputFile:
    """What the checking pass learned about a batch input file."""

    path: Path
    endpoint: str
    model: str
    requests: int
    digest: bytes
    #: Line numbers of blank lines, which are skipped: request N is not always line N+1.
    blank_lines: tuple[int, ...]

    def run_key(self, provider: str) -> str:
        scope = f"{provider}\0{self.endpoint}\0{self.model}\0".encode()
        return hashlib.sha256(scope + self.digest).hexdigest()

    def line_of(self, position: int) -> int:
        line = position + 1
        for blank in self.blank_lines:
            if blank <= line:
                line += 1
        return line


def scan_input(path: Path) -> InputFile:
    """Check every line's shape and that all share one endpoint and model; hash the bytes."""
    digest = hashlib.sha256()
    endpoint = model = ""
    requests = 0
    blanks: list[int] = []
    try:
        with path.open("rb") as lines:
            for line_no, raw in enumerate(lines, start=1):
                digest.update(raw)
                if not raw.strip():
                    blanks.append(line_no)
                    continue
                _, body, url = _parse_line(raw, path, line_no)
                if not requests:
                    endpoint, model = url, body["model"]
                elif url != endpoint:
                    raise _bad(
                        path,
                        line_no,
                        f"url {url!r} differs from {endpoint!r} above; a batch has one endpoint",
                    )
                elif body["model"] != model:
                    raise _bad(
                        path,
                        line_no,
                        f"body.model {body['model']!r} differs from "
                        f"{model!r} above; a batch has one model",
                    )
                requests += 1
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}", code=2) from None
    if not requests:
        raise CliError(f"{path} holds no requests", code=2)
    return InputFile(
        path=path,
        endpoint=endpoint,
        model=model,
        requests=requests,
        digest=digest.digest(),
        blank_lines=tuple(blanks),
    )


def iter_requests(source: InputFile) -> Iterator[dict[str, Any]]:
    """The second pass, for create_batch; a file changed since the first pass rolls it back."""
    digest = hashlib.sha256()
    with source.path.open("rb") as lines:
        for line_no, raw in enumerate(lines, start=1):
            digest.update(raw)
            if raw.strip():
                custom_id, body, _ = _parse_line(raw, source.path, line_no)
                yield {"custom_id": custom_id, "body": body}
    if digest.digest() != source.digest:
        raise CliError(f"{source.path} changed while it was read; run again", code=2)


def _parse_line(raw: bytes, path: Path, line_no: int) -> tuple[str, dict[str, Any], str]:
    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _bad(path, line_no, f"not valid JSON ({exc})") from None
    if not isinstance(item, dict):
        raise _bad(path, line_no, f"expected a JSON object, got {type(item).__name__}")
    if "params" in item and "body" not in item:
        # Anthropic's shape of a batch request: {custom_id, params}, params being Messages params.
        item = {"custom_id": item.get("custom_id"), "url": "/v1/messages", "body": item["params"]}
    elif "request" in item and "key" in item and "body" not in item:
        # Gemini's line of a batch file: {key, request}, a GenerateContentRequest naming its model.
        item = {"custom_id": item["key"], "url": "generateContent", "body": item["request"]}
    for key in ("custom_id", "body", "url"):
        if key not in item:
            raise _bad(path, line_no, f"no {key!r}; a line has custom_id, method, url and body")
    custom_id, body, url = item["custom_id"], item["body"], item["url"]
    if not isinstance(custom_id, str) or not custom_id:
        raise _bad(path, line_no, "custom_id must be a non-empty string")
    if not isinstance(url, str):
        raise _bad(path, line_no, "url must be a string such as '/v1/chat/completions'")
    if item.get("method", "POST") != "POST":
        raise _bad(path, line_no, f"method {item['method']!r}: the batch API takes only POST")
    if not isinstance(body, dict):
        raise _bad(path, line_no, "body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _bad(path, line_no, "body.model is missing; every line names its model")
    return custom_id, body, url


def _bad(path: Path, line_no: int, message: str) -> CliError:
    return CliError(f"{path} line {line_no}: {message}", code=2)


def _metadata(pairs: list[str]) -> dict[str, str]:
    metadata = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--metadata {pair!r}: expected KEY=VALUE", code=2)
        if key == RUN_KEY:
            raise CliError(f"--metadata: {RUN_KEY} is set by batchinfer itself", code=2)
        metadata[key] = value
    return metadata


@dataclass
class _Progress:
    """What was reached before an interruption, for the line that says what happens next."""

    batch: Batch | None = None


def run_command(args: argparse.Namespace) -> int:
    metadata = _metadata(args.metadata)
    check_writable(args.output)
    provider = provider_from(args)
    state = _Progress()
    try:
        source = scan_input(args.file)
        return asyncio.run(_run(args, source, provider, metadata, state))
    except KeyboardInterrupt:
        say(_interrupted(state.batch))
        return 130


def _interrupted(batch: Batch | None) -> str:
    if batch is None:
        return "Interrupted before a batch was created; nothing was sent to the provider."
    if batch.status is BatchStatus.PENDING:
        return (
            f"Interrupted. Batch {batch.id} is stored and may not be submitted yet; run the same "
            "command again to submit it (a submit cut short is re-attached, not paid twice)."
        )
    if batch.results_applied_at is not None:
        return (
            f"Interrupted before the output was written. Batch {batch.id} is {batch.status.value}; "
            "run the same command again to write it."
        )
    return (
        f"Interrupted. Batch {batch.id} ({batch.provider_batch_id}) goes on at the provider; "
        "run the same command again to re-attach to it and write the results."
    )


async def _run(
    args: argparse.Namespace,
    source: InputFile,
    provider: Provider,
    metadata: dict[str, str],
    state: _Progress,
) -> int:
    run_key = source.run_key(provider.name)
    async with open_batchinfer(args, provider=provider, migrate=True) as bi:
        found = [] if args.new else await bi.list_batches(metadata={RUN_KEY: run_key}, limit=1)
        if found:
            batch = state.batch = found[0]
            say(f"Re-attaching to batch {batch.id} ({batch.status.value}) from an earlier run")
        else:
            batch = state.batch = await _create(bi, source, provider.name, metadata, run_key)
            say(
                f"Created batch {batch.id}: {batch.request_total:,} requests of {source.model} "
                f"({batch.input_bytes:,} bytes)"
            )
        if batch.results_applied_at is None:
            if batch.status is BatchStatus.PENDING:
                batch = state.batch = await bi.submit_batch(batch)
                say(f"Submitted as {batch.provider_batch_id}")
            batch = state.batch = await _follow(bi, batch, args.poll_interval)
        written = await write_results(bi, batch, args.output)
    say(
        f"Batch {batch.id} {batch.status.value}: {counts_text(written.by_status)}; "
        f"cost {usd(batch.total_cost)}"
    )
    if batch.failure_reason:
        say(f"The provider said: {batch.failure_reason}")
    say(f"Wrote {written.lines:,} results to {args.output}")
    return 0 if batch.status is BatchStatus.COMPLETED else 1


async def _create(
    bi: BatchInfer,
    source: InputFile,
    provider: str,
    metadata: dict[str, str],
    run_key: str,
) -> Batch:
    try:
        return await bi.create_batch(
            provider=provider,
            endpoint=source.endpoint,
            model=source.model,
            requests=iter_requests(source),
            metadata={**metadata, RUN_KEY: run_key},
        )
    except InvalidRequestError as exc:
        if exc.position is None:
            raise CliError(f"{source.path}: {exc}", code=2) from None
        # The library counts requests from 0; the user counts lines of the file from 1.
        message = re.sub(r"^requests\[\d+\](, )?", "", str(exc))
        raise _bad(source.path, source.line_of(exc.position), message) from None


async def _follow(bi: BatchInfer, batch: Batch, poll_interval: float) -> Batch:
    """Wait for the batch with a live progress bar on stderr; returns it with results applied."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (
        SpinnerColumn(),
        TextColumn("{task.fields[status]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]:,} failed"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task("batch", total=batch.request_total, status="", failed=0)

        def show(current: Batch) -> None:
            counts = current.request_counts
            status = current.status.value
            if current.is_terminal and current.results_applied_at is None:
                status += ", fetching results"
            progress.update(
                task,
                total=counts.total or current.request_total,
                completed=counts.completed + counts.failed,
                status=status,
                failed=counts.failed,
            )

        show(batch)
        batch = await bi.wait(batch, poll_interval=poll_interval, on_poll=show)
        show(batch)
    return batch
