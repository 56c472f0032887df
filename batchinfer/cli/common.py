"""What the commands share: flags, the database choice, the BatchInfer they open, the output file.

The library never reads the environment; these helpers are where the command line does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import orjson

from batchinfer.client import BatchInfer, redacted_url
from batchinfer.domain import Batch, Completion, CompletionStatus
from batchinfer.errors import SchemaNotReadyError
from batchinfer.providers import provider_named
from batchinfer.providers.base import Provider

DATABASE_ENV = "BATCHINFER_DATABASE_URL"
#: Where each provider's key and base URL are read from, and its default URL.
PROVIDERS: dict[str, tuple[str, str, str]] = {
    "openai": ("OPENAI_API_KEY", "OPENAI_BASE_URL", "https://api.openai.com/v1"),
    "anthropic": ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "https://api.anthropic.com"),
    # Azure's base URL is the resource's endpoint (https://<resource>.openai.azure.com).
    "azure": ("AZURE_OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT", ""),
    "xai": ("XAI_API_KEY", "XAI_BASE_URL", "https://api.x.ai/v1"),
    "gemini": ("GEMINI_API_KEY", "GEMINI_BASE_URL", "https://generativelanguage.googleapis.com"),
}


class CliError(Exception):
    """One line for the user and the exit code; 2 is bad input or a missing setting."""

    def __init__(self, message: str, *, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def whole_number(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def positive_number(text: str) -> float:
    """An argparse type: a number more than 0 (seconds, hours)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"{text} is not more than 0")
    return value


def say(text: str) -> None:
    """Progress and reports go to stderr, so stdout stays clean for what a command outputs."""
    print(text, file=sys.stderr, flush=True)


def add_database_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("database")
    group.add_argument(
        "--database",
        metavar="URL",
        help=f"Postgres URL (default ${DATABASE_ENV}; without either, an embedded Postgres "
        "kept in --data-dir)",
    )
    group.add_argument(
        "--schema", default="batchinfer", help="schema of the tables (default batchinfer)"
    )
    group.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="where the embedded Postgres keeps its data (default: the user data directory, "
        "e.g. ~/.local/share/batchinfer)",
    )


def add_provider_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("provider")
    group.add_argument(
        "--provider", choices=list(PROVIDERS), default="openai", help="batch API (default openai)"
    )
    group.add_argument(
        "--api-key",
        metavar="KEY",
        help="API key (default $OPENAI_API_KEY; $ANTHROPIC_API_KEY, $AZURE_OPENAI_API_KEY, "
        "$XAI_API_KEY or $GEMINI_API_KEY with the other providers)",
    )
    group.add_argument(
        "--base-url",
        metavar="URL",
        help="API base URL (default $OPENAI_BASE_URL, $ANTHROPIC_BASE_URL, $XAI_BASE_URL or "
        "$GEMINI_BASE_URL, "
        "else the provider's own; for azure the resource's endpoint, default "
        "$AZURE_OPENAI_ENDPOINT, with $OPENAI_API_VERSION for the classic API)",
    )


def provider_from(args: argparse.Namespace) -> Provider:
    name = getattr(args, "provider", "openai")
    key_env, url_env, default_url = PROVIDERS[name]
    api_key = args.api_key or os.environ.get(key_env)
    if not api_key:
        raise CliError(f"no API key: give --api-key or set ${key_env}", code=2)
    base_url = args.base_url or os.environ.get(url_env) or default_url
    if name == "azure" and not base_url:
        raise CliError(
            f"no Azure endpoint: give --base-url https://<resource>.openai.azure.com or set "
            f"${url_env}",
            code=2,
        )
    return provider_named(
        name, api_key=api_key, base_url=base_url, api_version=os.environ.get("OPENAI_API_VERSION")
    )


def batch_id_from(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise CliError(
            f"{text!r} is not a batch id (a UUID, as `batchinfer ls` shows)", code=2
        ) from None


@contextlib.asynccontextmanager
async def database_url(args: argparse.Namespace) -> AsyncIterator[str]:
    """The URL to use, starting (and afterwards stopping) the embedded Postgres if none is set."""
    url = args.database or os.environ.get(DATABASE_ENV)
    if url:
        say(f"Database: {redacted_url(url)} (schema {args.schema})")
        yield url
        return
    pgdata = _data_dir(args.data_dir) / "pgdata"
    say(
        f"Database: embedded Postgres in {pgdata} (schema {args.schema}); set ${DATABASE_ENV} "
        "or --database to use your own"
    )
    try:
        from batchinfer.testing.postgres import start_embedded_postgres

        # "stop" keeps the data, so a later run finds its batches and can re-attach.
        server = await asyncio.to_thread(start_embedded_postgres, pgdata, cleanup="stop")
    except RuntimeError as exc:  # the extra is not installed; the message says what to do
        raise CliError(str(exc), code=2) from None
    except Exception as exc:
        # embedded-postgres fails in many ways (initdb, pg_ctl, permissions); one line for all.
        raise CliError(
            f"cannot start the embedded Postgres in {pgdata}: {type(exc).__name__}: {exc}; "
            f"set ${DATABASE_ENV} or --database to use your own"
        ) from None
    try:
        yield server.url
    finally:
        await asyncio.shield(asyncio.to_thread(server.stop))


def _data_dir(given: Path | None) -> Path:
    if given is not None:
        path = given
    else:
        try:
            import platformdirs
        except ImportError:
            raise CliError(
                f"no database given and the embedded Postgres is not installed: pip install "
                f"'batchinfer[embedded]', or set ${DATABASE_ENV} to a postgresql:// URL",
                code=2,
            ) from None
        path = Path(platformdirs.user_data_dir("batchinfer"))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot use {path} as the data directory: {exc.strerror}", code=2) from None
    return path


@contextlib.asynccontextmanager
async def open_batchinfer(
    args: argparse.Namespace, *, provider: Provider | None = None, migrate: bool = False
) -> AsyncIterator[BatchInfer]:
    """A BatchInfer on the chosen database; read-only commands do not create the tables."""
    async with database_url(args) as url:
        providers = [provider] if provider is not None else []
        try:
            async with BatchInfer(url, providers=providers, schema=args.schema) as bi:
                if migrate:
                    await bi.migrate()
                yield bi
        except SchemaNotReadyError:
            raise CliError(
                f"schema {args.schema!r} of this database has no batchinfer tables yet: nothing "
                "has run here (`batchinfer run` or `batchinfer migrate` creates them)"
            ) from None
        finally:
            if provider is not None:
                await provider.aclose()


def check_writable(path: Path) -> None:
    """Fail before any work is done rather than after a day-long batch."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CliError(f"cannot write {path}: directory {parent} does not exist", code=2)
    if path.is_dir():
        raise CliError(f"cannot write {path}: it is a directory", code=2)


def output_record(completion: Completion) -> dict[str, Any]:
    """One line of OpenAI's batch output/error file format, so tools that read those read ours."""
    line: dict[str, Any] = {
        "id": f"batchinfer_{completion.id}",
        "custom_id": completion.custom_id,
        "response": None,
        "error": None,
    }
    if completion.status is CompletionStatus.COMPLETED:
        line["response"] = {
            "status_code": completion.status_code or 200,
            "request_id": completion.provider_request_id,
            "body": completion.response_body,
        }
        return line
    if completion.status is CompletionStatus.FAILED:
        if completion.status_code is not None:
            # The provider's error body is not kept; its message is, in OpenAI's error envelope.
            body = completion.response_body or {
                "error": {"message": completion.failure_reason, "code": None}
            }
            line["response"] = {
                "status_code": completion.status_code,
                "request_id": completion.provider_request_id,
                "body": body,
            }
        line["error"] = {"code": completion.failure_error, "message": completion.failure_reason}
        return line
    line["error"] = {
        "code": "batchinfer_no_result",
        "message": f"no result yet (the request is {completion.status.value})",
    }
    return line


@dataclass
class Written:
    lines: int = 0
    by_status: dict[str, int] = field(default_factory=dict)


async def write_results(bi: BatchInfer, batch: Batch, path: Path) -> Written:
    """Every completion in request order, to a temp file beside ``path`` renamed over it at the
    end: a reader never sees half a file, and an interruption leaves the old one in place."""
    written = Written()
    with _atomic_file(path) as out:
        async for completion in bi.completions(batch):
            out.write(orjson.dumps(output_record(completion)) + b"\n")
            written.lines += 1
            status = completion.status.value
            written.by_status[status] = written.by_status.get(status, 0) + 1
    return written


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[IO[bytes]]:
    directory = path.parent if str(path.parent) else Path(".")
    # Not mkstemp: its 0600 would outlive the rename; open(..., "xb") honours the umask.
    tmp = directory / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        raw = open(tmp, "xb", buffering=1 << 20)  # noqa: SIM115 - closed in the block below
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with raw as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def usd(value: Decimal | None) -> str:
    return "-" if value is None else f"${value.quantize(Decimal('0.000001'))}"


def counts_text(by_status: dict[str, int]) -> str:
    order = [s.value for s in CompletionStatus]
    items = sorted(by_status.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99)
    return ", ".join(f"{count:,} {status}" for status, count in items) or "no requests"
