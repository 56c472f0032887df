"""The bulk result statements: one chunk of outcomes in one ``UPDATE ... FROM``, and the sweep
that fails what came back in neither file and totals the costs."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from batchinfer.domain import Batch, CompletionStatus, ResultOutcome, ResultSources
from batchinfer.errors import BatchNotFoundError
from batchinfer.storage.database import Database
from batchinfer.storage.rows import batch_from_row, outcome_rows
from batchinfer.storage.tables import batches, completions

_TERMINAL = (CompletionStatus.COMPLETED.value, CompletionStatus.FAILED.value)


@dataclass(frozen=True, slots=True)
class ApplyResult:
    applied: int
    already_applied: list[str]
    unknown: list[str]


class ResultStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def apply_outcomes(
        self,
        batch_id: uuid.UUID | None,
        outcomes: Sequence[ResultOutcome],
        *,
        completion_id: int | None = None,
    ) -> ApplyResult:
        """Write a chunk of outcomes in one statement; rows already terminal are left alone.

        ``outcomes`` must hold each custom_id once. With ``completion_id`` the single outcome
        targets that row (the realtime path) instead of matching on custom_id.
        """
        return await self.apply_rows(
            batch_id,
            outcome_rows(outcomes),
            [o.custom_id for o in outcomes],
            completion_id=completion_id,
        )

    async def apply_rows(
        self,
        batch_id: uuid.UUID | None,
        document: bytes | bytearray,
        custom_ids: Sequence[str],
        *,
        completion_id: int | None = None,
    ) -> ApplyResult:
        """The same, for outcomes already encoded (``rows.encode_outcome``) into one JSON array
        ``document`` whose rows are for ``custom_ids``, in order.

        A batch's rows keep ``started_at`` empty: they started with their batch, which says
        when (see ``completions.py``)."""
        target = (
            "c.id = :completion_id"
            if completion_id is not None
            else "c.batch_id = :batch_id AND c.custom_id = v.custom_id"
        )
        # One jsonb document per chunk: the driver sends one parameter instead of 18 arrays
        # checked element by element, and the server parses it once (json_to_recordset would
        # parse each response body a second time to make it jsonb: twice the server time).
        # It travels as UTF-8 bytes (bytea): no decode to str and encode back on the client.
        sql = sa.text(f"""
            UPDATE {self.db.q}.completions AS c SET
                status = v.status,
                response_body = v.response_body,
                output_text = v.output_text,
                tool_calls = v.tool_calls,
                finish_reason = v.finish_reason,
                status_code = v.status_code,
                provider_request_id = v.provider_request_id,
                prompt_tokens = v.prompt_tokens,
                completion_tokens = v.completion_tokens,
                total_tokens = v.total_tokens,
                cached_tokens = v.cached_tokens,
                reasoning_tokens = v.reasoning_tokens,
                input_cost = v.input_cost,
                output_cost = v.output_cost,
                total_cost = v.input_cost + v.output_cost,
                failure_error = v.failure_error,
                failure_reason = v.failure_reason,
                completed_at = now()
            FROM jsonb_to_recordset(CAST(convert_from(:rows, 'UTF8') AS jsonb)) AS v(
                custom_id text, status text, response_body jsonb, output_text text,
                tool_calls jsonb, finish_reason text, status_code int,
                provider_request_id text, prompt_tokens int, completion_tokens int,
                total_tokens int, cached_tokens int, reasoning_tokens int,
                input_cost numeric, output_cost numeric, failure_error text,
                failure_reason text)
            WHERE {target} AND c.status NOT IN ('completed', 'failed')
            RETURNING c.custom_id
        """)
        params = {"rows": document, "batch_id": batch_id, "completion_id": completion_id}
        async with self.db.tx(f"applying results to batch {batch_id}") as conn:
            done = {r[0] for r in await conn.execute(sql, params)}
            missed = [c for c in custom_ids if c not in done]
            known: set[str] = set()
            if missed and completion_id is None:
                known = set(
                    (
                        await conn.execute(
                            sa.select(completions.c.custom_id).where(
                                completions.c.batch_id == batch_id,
                                completions.c.custom_id.in_(missed),
                            )
                        )
                    ).scalars()
                )
        return ApplyResult(
            applied=len(done),
            already_applied=[c for c in missed if c in known],
            unknown=[c for c in missed if c not in known],
        )

    async def finish_results(
        self,
        batch_id: uuid.UUID,
        *,
        applied_sources: ResultSources,
        failure_error: str,
        failure_reason: str,
        line_reasons: dict[int, str] | None = None,
    ) -> tuple[Batch, int] | None:
        """Fail every completion still open, sum the costs, stamp results_applied_at.

        Returns the batch and how many completions the sweep failed, or None, changing nothing,
        when the batch's result sources are no longer ``applied_sources``: results in a source
        that was not applied must not be swept as missing.
        """
        async with self.db.tx(f"finishing the results of batch {batch_id}") as conn:
            locked = (
                await conn.execute(
                    sa.select(batches.c.result_sources)
                    .where(batches.c.id == batch_id)
                    .with_for_update()
                )
            ).one_or_none()
            if locked is None:
                raise BatchNotFoundError(f"no batch {batch_id} in schema {self.db.schema!r}")
            stored = ResultSources.from_json(locked.result_sources or {})
            if stored.sources != applied_sources.sources:
                return None
            swept = 0
            if line_reasons:
                result = await conn.execute(
                    sa.text(f"""
                        UPDATE {self.db.q}.completions AS c
                        SET status = 'failed', failure_error = :error,
                            failure_reason = v.reason, completed_at = now()
                        FROM unnest(CAST(:lines AS int[]), CAST(:reasons AS text[]))
                            AS v(line_no, reason)
                        WHERE c.batch_id = :b AND c.line_no = v.line_no
                          AND c.status NOT IN ('completed', 'failed')
                    """),
                    {
                        "b": batch_id,
                        "error": failure_error,
                        "lines": list(line_reasons),
                        "reasons": [r[:255] for r in line_reasons.values()],
                    },
                )
                swept += result.rowcount
            result = await conn.execute(
                completions.update()
                .where(
                    completions.c.batch_id == batch_id,
                    completions.c.status.not_in(_TERMINAL),
                )
                .values(
                    status=CompletionStatus.FAILED.value,
                    failure_error=failure_error,
                    failure_reason=failure_reason[:255],
                    completed_at=sa.func.now(),
                )
            )
            swept += result.rowcount
            # One scan of the batch's rows for all three sums.
            row = (
                await conn.execute(
                    sa.text(f"""
                        UPDATE {self.db.q}.batches AS b SET
                            (input_cost, output_cost, total_cost) = (
                                SELECT sum(input_cost), sum(output_cost), sum(total_cost)
                                FROM {self.db.q}.completions WHERE batch_id = :b
                            ),
                            results_applied_at = coalesce(b.results_applied_at, now()),
                            step_failures = 0, last_error = NULL,
                            updated_at = now()
                        WHERE b.id = :b
                        RETURNING b.*
                    """).columns(*batches.c),
                    {"b": batch_id},
                )
            ).one()
            await self.db.notify(conn, f"results {batch_id}")
        return batch_from_row(row), swept
