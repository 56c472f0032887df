"""The two yardsticks apply is compared with, measured in the same run on the same rows.

FLOOR: what the database alone needs to write the results. The applied values of a batch are
copied into a temp table of the same shape, the batch's completions are reset to ``submitted``
and one server-side ``UPDATE ... FROM`` writes them back, matched on (batch_id, custom_id) as
apply matches them. No download, no parsing, no round trips: apply is not expected to beat
it (with writers in parallel it could, a little).

BASELINE: the reference design's shape. The whole output and error files are read into memory
first, then per result a load (SELECT), an update and a commit. It is run on a sample of the
lines (``rows``, in file order); its rate for the whole batch is projected as
``lines / (read time + lines x per-line time)`` so that reading the whole file is not charged
to the sample alone. The sample touches few rows, so at 500,000 lines the projection misses
the cache and WAL pressure of updating them all: it flatters the baseline, not apply.

The floor leaves the batch's completions reset to ``submitted`` for the baseline; the batch
is discarded afterwards.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any

import aiohttp
import asyncpg
import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from benchmarks.phases import API_KEY, Meter, Params, Result, client, connect, database_url

#: The columns a results pass writes. Those the table lacks are skipped.
RESULT_COLUMNS = (
    "status",
    "response_body",
    "output_text",
    "tool_calls",
    "finish_reason",
    "status_code",
    "provider_request_id",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "input_cost",
    "output_cost",
    "total_cost",
    "failure_error",
    "failure_reason",
    "started_at",
    "completed_at",
)
#: Set at submission (or by the reset itself), so left as they are by the reset.
_KEPT_BY_RESET = ("status", "started_at")


def asyncpg_url(url: str) -> str:
    """A SQLAlchemy URL on the asyncpg driver."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url


async def settle(conn: asyncpg.Connection, schema: str) -> None:
    """Vacuum the completions and checkpoint, as the hours a batch runs would have: apply (and
    the floor) then start from the same quiet table, not from the writes just before them."""
    await conn.execute(f'VACUUM (ANALYZE) "{schema}".completions')
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
        await conn.execute("CHECKPOINT")


async def _result_columns(conn: asyncpg.Connection, schema: str) -> list[str]:
    names = {
        r[0]
        for r in await conn.fetch(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = $1 AND table_name = 'completions'",
            schema,
        )
    }
    return [c for c in RESULT_COLUMNS if c in names]


async def reset(conn: asyncpg.Connection, schema: str, batch_id: uuid.UUID) -> None:
    """Back to the state apply starts from: submitted, no result; then settled."""
    columns = await _result_columns(conn, schema)
    cleared = [f"{c} = NULL" for c in columns if c not in _KEPT_BY_RESET]
    await conn.execute(
        f"UPDATE \"{schema}\".completions SET status = 'submitted', {', '.join(cleared)} "
        "WHERE batch_id = $1",
        batch_id,
    )
    await settle(conn, schema)


async def floor(p: Params) -> Result:
    schema, batch_id = p["schema"], uuid.UUID(p["batch"])
    meter = Meter()
    async with connect(database_url()) as conn:
        columns = await _result_columns(conn, schema)
        listed = ", ".join(columns)
        # A utility statement takes no parameters; the id is a parsed UUID.
        await conn.execute(
            f"CREATE TEMP TABLE staged AS SELECT custom_id, {listed} "
            f"FROM \"{schema}\".completions WHERE batch_id = '{batch_id}'"
        )
        await conn.execute("ANALYZE staged")
        staged = await conn.fetchval("SELECT count(*) FROM staged")
        await reset(conn, schema, batch_id)
        assignments = ", ".join(f"{c} = s.{c}" for c in columns)
        update = (
            f'UPDATE "{schema}".completions AS c SET {assignments} FROM staged AS s '
            "WHERE c.batch_id = $1 AND c.custom_id = s.custom_id "
            "AND c.status NOT IN ('completed', 'failed')"
        )
        plan = [r[0].strip() for r in await conn.fetch(f"EXPLAIN {update}", batch_id)]
        async with meter.measure():
            status = await conn.execute(update, batch_id)
        written = int(status.split()[-1])
        if written != staged:
            raise RuntimeError(f"the floor wrote {written} rows of {staged}")
        await reset(conn, schema, batch_id)  # for the baseline, which follows
    return meter.result(written, "rows/s", columns=len(columns), plan=plan[1:4])


def _sample(output: list[bytes], errors: list[bytes], rows: int) -> list[bytes]:
    """``rows`` lines, from each file in proportion to its share of the lines."""
    total = len(output) + len(errors)
    from_errors = round(rows * len(errors) / total) if total else 0
    return output[: rows - from_errors] + errors[:from_errors]


async def _read_whole(base_url: str, file_id: str | None) -> list[bytes]:
    if file_id is None:
        return []
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session,
        session.get(f"{base_url}/files/{file_id}/content") as resp,
    ):
        resp.raise_for_status()
        body = await resp.read()
    return body.splitlines()


def _update_params(record: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    response = record.get("response") or {}
    body = response.get("body") or {}
    if response.get("status_code") == 200:
        usage = body.get("usage") or {}
        choices = body.get("choices") or [{}]
        return "completed", {
            "body": orjson.dumps(body).decode(),
            "text": (choices[0].get("message") or {}).get("content"),
            "p": usage.get("prompt_tokens"),
            "o": usage.get("completion_tokens"),
            "code": 200,
            "err": None,
            "reason": None,
        }
    error = body.get("error") or record.get("error") or {}
    return "failed", {
        "body": orjson.dumps(body).decode() if body else None,
        "text": None,
        "p": None,
        "o": None,
        "code": response.get("status_code"),
        "err": error.get("code"),
        "reason": error.get("message"),
    }


async def baseline(p: Params) -> Result:
    """The reference design: read everything, then load + update + commit per result."""
    schema, batch_id = p["schema"], uuid.UUID(p["batch"])
    async with client(p) as bi:
        batch = await bi.get_batch(batch_id)
    engine = create_async_engine(asyncpg_url(database_url()))
    load = sa.text(
        f'SELECT id, status FROM "{schema}".completions WHERE batch_id = :b AND custom_id = :c'
    )
    update = sa.text(
        f'UPDATE "{schema}".completions SET status = :status, '
        "response_body = CAST(:body AS jsonb), output_text = :text, prompt_tokens = :p, "
        "completion_tokens = :o, status_code = :code, failure_error = :err, "
        "failure_reason = :reason, completed_at = now() WHERE id = :id"
    )
    meter = Meter()
    async with engine.connect() as conn:
        await conn.execute(sa.text("SELECT 1"))
        async with meter.measure():
            started = time.perf_counter()
            output = await _read_whole(p["base_url"], batch.output_file_id)
            errors = await _read_whole(p["base_url"], batch.error_file_id)
            lines = len(output) + len(errors)
            sample = _sample(output, errors, min(int(p["rows"]), lines))
            read_seconds = time.perf_counter() - started
            for line in sample:
                record = orjson.loads(line)
                row = (await conn.execute(load, {"b": batch_id, "c": record["custom_id"]})).one()
                status, params = _update_params(record)
                await conn.execute(update, {**params, "status": status, "id": row.id})
                await conn.commit()
            loop_seconds = time.perf_counter() - started - read_seconds
    await engine.dispose()
    projected = read_seconds + loop_seconds * lines / len(sample)
    result = meter.result(lines, "results/s", sample=len(sample), read_seconds=read_seconds)
    result.update(rate=lines / projected, projected_seconds=projected)
    return result
