"""``batchinfer ls``, ``status``, ``cancel`` and ``results``: look at and act on stored batches.

Only ``cancel`` talks to the provider; the others read the database, so they work offline and
never change a batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from batchinfer.cli.common import (
    CliError,
    add_database_flags,
    add_provider_flags,
    batch_id_from,
    check_writable,
    counts_text,
    open_batchinfer,
    provider_from,
    say,
    usd,
    whole_number,
    write_results,
)
from batchinfer.domain import Batch, BatchStatus
from batchinfer.errors import SchemaNotReadyError
from batchinfer.providers.base import Provider


def add_parsers(commands: Any) -> None:
    ls = commands.add_parser(
        "ls",
        help="list the newest batches",
        description="A table of the newest batches: id, status, provider batch id, requests, "
        "done and failed counts (the provider's), when created, and cost.",
    )
    ls.add_argument(
        "--status", choices=[s.value for s in BatchStatus], help="only batches in this status"
    )
    ls.add_argument(
        "--limit", type=whole_number, default=20, metavar="N", help="how many (default 20)"
    )
    add_database_flags(ls)
    ls.set_defaults(handler=ls_command)

    status = commands.add_parser(
        "status",
        help="show one batch in detail",
        description="Everything stored about one batch: status, provider ids and files, "
        "counts, timestamps, the provider's failure reason, costs, and its requests by "
        "status. Reads the database only; `batchinfer run` keeps it up to date.",
    )
    status.add_argument("batch", metavar="BATCH", help="batch id, as `batchinfer ls` shows")
    add_database_flags(status)
    status.set_defaults(handler=status_command)

    cancel = commands.add_parser(
        "cancel",
        help="ask the provider to cancel a batch",
        description="Ask the provider to cancel a submitted batch and print its new status "
        "(usually cancelling). Requests that already ran are paid for: re-run the same "
        "`batchinfer run` command to collect them once the batch is cancelled.",
    )
    cancel.add_argument("batch", metavar="BATCH", help="batch id, as `batchinfer ls` shows")
    add_provider_flags(cancel)
    add_database_flags(cancel)
    cancel.set_defaults(handler=cancel_command)

    results = commands.add_parser(
        "results",
        help="write the output file of a finished batch",
        description="Write one line per request, in request order, in OpenAI's batch output "
        "file format, for a batch whose results have been applied.",
    )
    results.add_argument("batch", metavar="BATCH", help="batch id, as `batchinfer ls` shows")
    results.add_argument(
        "-o", "--output", type=Path, required=True, metavar="PATH", help="output file to write"
    )
    add_database_flags(results)
    results.set_defaults(handler=results_command)


# -- ls ----------------------------------------------------------------------------------------


def ls_command(args: argparse.Namespace) -> int:
    batches = asyncio.run(_ls(args))
    if not batches:
        say("No batches" + (f" with status {args.status}." if args.status else " yet."))
        return 0
    print(batch_table(batches))
    return 0


async def _ls(args: argparse.Namespace) -> list[Batch]:
    async with open_batchinfer(args) as bi:
        try:
            return await bi.list_batches(status=args.status, limit=args.limit)
        except SchemaNotReadyError:
            # A fresh database (the embedded one, at first) simply has no batches yet.
            return []


def batch_table(batches: Sequence[Batch]) -> str:
    # Plain aligned text rather than a rich Table: a pipe or a narrow terminal must not wrap ids.
    header = ("ID", "STATUS", "PROVIDER BATCH", "REQUESTS", "DONE", "FAILED", "CREATED", "COST")
    rows = [header]
    for b in batches:
        counts = b.request_counts
        rows.append(
            (
                str(b.id),
                b.status.value,
                b.provider_batch_id or "-",
                f"{b.request_total:,}",
                f"{counts.completed:,}",
                f"{counts.failed:,}",
                _when(b.created_at),
                usd(b.total_cost),
            )
        )
    numeric = {3, 4, 5, 7}
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in rows
    ]
    return "\n".join(lines)


# -- status ------------------------------------------------------------------------------------


def status_command(args: argparse.Namespace) -> int:
    batch_id = batch_id_from(args.batch)
    batch, summary = asyncio.run(_status(args, batch_id))
    print(status_text(batch, summary))
    return 0


async def _status(args: argparse.Namespace, batch_id: uuid.UUID) -> tuple[Batch, dict[str, Any]]:
    async with open_batchinfer(args) as bi:
        batch = await bi.get_batch(batch_id)
        return batch, await bi.summary(batch)


def _sources(batch: Batch) -> str:
    """Where the provider keeps the results, as it last said."""
    sources = batch.result_sources
    if sources is None:
        return "- (not reported yet)"
    listed = ", ".join(f"{s.key} {s.ref}" for s in sources.sources) or "none"
    return listed + (f" (still to come: {sources.waiting_for})" if sources.waiting_for else "")


def status_text(batch: Batch, summary: dict[str, Any]) -> str:
    counts = batch.request_counts
    fields: list[tuple[str, str]] = [
        ("Batch", str(batch.id)),
        (
            "Status",
            batch.status.value
            + (f" (the provider says {batch.provider_status})" if batch.provider_status else ""),
        ),
        ("Provider", f"{batch.provider}, batch {batch.provider_batch_id or '- (not submitted)'}"),
        ("Endpoint", batch.endpoint),
        ("Model", batch.model),
        ("Requests", f"{batch.request_total:,} ({batch.input_bytes:,} bytes of JSONL)"),
        (
            "Provider counts",
            f"{counts.completed:,} completed, {counts.failed:,} failed of {counts.total:,}",
        ),
        ("Input file", batch.input_file_id or "-"),
        ("Results", _sources(batch)),
        ("Created", _when(batch.created_at)),
        ("Submitted", _when(batch.submitted_at)),
        ("Ended", _when(batch.ended_at)),
        ("Results applied", _when(batch.results_applied_at)),
    ]
    if batch.failure_reason:
        fields.append(("Failure", batch.failure_reason))
    fields += [
        (
            "Cost",
            f"{usd(batch.total_cost)} (input {usd(batch.input_cost)}, "
            f"output {usd(batch.output_cost)})",
        ),
        ("Completions", counts_text(summary.get("by_status", {}))),
        (
            "Tokens",
            f"{summary.get('prompt_tokens', 0):,} prompt "
            f"({summary.get('cached_tokens', 0):,} cached), "
            f"{summary.get('completion_tokens', 0):,} completion "
            f"({summary.get('reasoning_tokens', 0):,} reasoning)",
        ),
    ]
    if batch.metadata:
        fields.append(("Metadata", json.dumps(batch.metadata, sort_keys=True)))
    width = max(len(name) for name, _ in fields)
    return "\n".join(f"{name + ':':<{width + 1}} {value}" for name, value in fields)


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


# -- cancel ------------------------------------------------------------------------------------


def cancel_command(args: argparse.Namespace) -> int:
    batch_id = batch_id_from(args.batch)
    provider = provider_from(args)
    status = asyncio.run(_cancel(args, batch_id, provider))
    print(f"Batch {batch_id}: {status.value}")
    if not status.is_terminal:
        say(
            "The provider stops the batch shortly; what already ran is paid for: re-run the "
            "same `batchinfer run` command to collect it."
        )
    return 0


async def _cancel(args: argparse.Namespace, batch_id: uuid.UUID, provider: Provider) -> BatchStatus:
    async with open_batchinfer(args, provider=provider) as bi:
        return await bi.cancel_batch(batch_id)


# -- results -----------------------------------------------------------------------------------


def results_command(args: argparse.Namespace) -> int:
    batch_id = batch_id_from(args.batch)
    check_writable(args.output)
    return asyncio.run(_results(args, batch_id))


async def _results(args: argparse.Namespace, batch_id: uuid.UUID) -> int:
    async with open_batchinfer(args) as bi:
        batch = await bi.get_batch(batch_id)
        if batch.results_applied_at is None:
            raise CliError(
                f"batch {batch.id} is {batch.status.value} and its results are not applied yet; "
                f"see `batchinfer status {batch.id}`, or re-run the `batchinfer run` command "
                "that started it to wait for them"
            )
        written = await write_results(bi, batch, args.output)
    say(f"Wrote {written.lines:,} results to {args.output} ({counts_text(written.by_status)})")
    return 0
