"""Rows to domain objects and back: the values the store reads and writes; no statements."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from batchinfer.domain import (
    Batch,
    BatchStatus,
    Completion,
    CompletionStatus,
    ProviderBatch,
    RequestCounts,
    ResultOutcome,
    ResultSources,
    StepFailure,
)

# jsonb and text cannot hold U+0000, which a model can emit; orjson writes it as \u0000 and a
# backslash as \\, so an escape preceded by an even run of backslashes is a real NUL. Results
# get U+FFFD in its place rather than failing the whole chunk.
_ENCODED_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def _no_nul(text: str | None) -> str | None:
    return text.replace("\x00", "\ufffd") if text and "\x00" in text else text


def dumps(value: Any) -> str | None:
    """A JSON value as the text a jsonb column parses, with any NUL made U+FFFD."""
    if value is None:
        return None
    text = orjson.dumps(value).decode()
    if "\\u0000" in text:
        text = _ENCODED_NUL.sub(r"\1\\ufffd", text)
    return text


#: A step that went through ends a run of failed ones.
STEP_WENT_THROUGH: dict[str, Any] = {"step_failures": 0, "last_error": None}


def provider_values(pb: ProviderBatch) -> dict[str, Any]:
    return {
        "output_file_id": pb.output_file_id,
        "error_file_id": pb.error_file_id,
        "counts_total": pb.request_counts.total,
        "counts_completed": pb.request_counts.completed,
        "counts_failed": pb.request_counts.failed,
        # Through dumps(), so a NUL in the provider's text cannot fail the write.
        "provider_errors": as_jsonb(
            [
                {"code": e.code, "message": e.message, "param": e.param, "line": e.line}
                for e in pb.errors
            ]
        ),
        "provider_response": as_jsonb(pb.raw),
        "result_sources": as_jsonb(pb.results.to_json()),
        "provider_status": _no_nul(pb.raw_status),
        # The provider answered: whatever failed before has passed.
        **STEP_WENT_THROUGH,
        "failure_reason": _no_nul(pb.failure_reason()),
        "updated_at": sa.func.now(),
    }


def as_jsonb(value: Any) -> sa.Cast[Any]:
    """A value bound as jsonb, through dumps(): a NUL in it cannot fail the write."""
    return sa.cast(sa.literal(dumps(value), sa.Text), JSONB)


#: The fields of an applied outcome, after its custom_id: each is written to the completion's
#: column of that name (``results.py`` builds its statement from this list and the table).
RESULT_FIELDS = (
    "status",
    "status_code",
    "provider_request_id",
    "failure_error",
    "failure_reason",
    "response_body",
    "output_text",
    "tool_calls",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "input_cost",
    "output_cost",
)

_EMPTY_RESPONSE = (None,) * 10


def outcome_values(o: ResultOutcome) -> tuple[Any, ...]:
    """One outcome as the values of ``RESULT_FIELDS``, in order: strings, integers and None.
    JSON goes as text (the server parses it into jsonb), money as exact decimal text."""
    r = o.response
    if r is None:
        response: tuple[Any, ...] = _EMPTY_RESPONSE
    else:
        u = r.usage
        response = (
            dumps(r.body),
            _no_nul(r.output_text),
            dumps(r.tool_calls),
            _no_nul(r.finish_reason),
            u.prompt_tokens,
            u.completion_tokens,
            u.total_tokens,
            u.cached_tokens,
            u.cache_write_tokens,
            u.reasoning_tokens,
        )
    costs = (None, None) if o.costs is None else (str(o.costs.input), str(o.costs.output))
    return (
        o.status.value,
        o.status_code,
        _no_nul(o.provider_request_id),
        _no_nul(o.failure_error),
        _no_nul(o.failure_reason),
        *response,
        *costs,
    )


class ResultColumns:
    """A chunk of outcomes as one list per column: the apply statement's array parameters.

    Outcomes are flattened into these lists as soon as they are parsed, so a queued chunk holds
    a few lists of strings and integers, not a graph of objects for the collector to walk. The
    driver sends each list as one binary array, so the server parses no JSON but the bodies
    themselves (a JSON document of the whole chunk cost it more than the update did).
    """

    __slots__ = ("custom_ids", "line_nos", "values")

    def __init__(self) -> None:
        self.custom_ids: list[str] = []
        #: Where each row came from (a line of the provider's results), for logs.
        self.line_nos: list[int] = []
        self.values: tuple[list[Any], ...] = tuple([] for _ in RESULT_FIELDS)

    def __len__(self) -> int:
        return len(self.custom_ids)

    def add(self, outcome: ResultOutcome, line_no: int = 0) -> None:
        self.custom_ids.append(outcome.custom_id)
        self.line_nos.append(line_no)
        for column, value in zip(self.values, outcome_values(outcome), strict=True):
            column.append(value)

    def row(self, index: int) -> ResultColumns:
        """The row at ``index`` alone, to be written by itself."""
        one = ResultColumns()
        one.custom_ids.append(self.custom_ids[index])
        one.line_nos.append(self.line_nos[index])
        for mine, theirs in zip(one.values, self.values, strict=True):
            mine.append(theirs[index])
        return one

    def field(self, name: str, index: int) -> Any:
        return self.values[RESULT_FIELDS.index(name)][index]

    @classmethod
    def of(cls, outcomes: Sequence[ResultOutcome]) -> ResultColumns:
        columns = cls()
        for outcome in outcomes:
            columns.add(outcome)
        return columns


def batch_from_row(row: sa.Row[Any]) -> Batch:
    m = row._mapping
    return Batch(
        id=m["id"],
        provider=m["provider"],
        endpoint=m["endpoint"],
        model=m["model"],
        status=BatchStatus(m["status"]),
        provider_batch_id=m["provider_batch_id"],
        input_file_id=m["input_file_id"],
        output_file_id=m["output_file_id"],
        error_file_id=m["error_file_id"],
        request_counts=RequestCounts(
            total=m["counts_total"], completed=m["counts_completed"], failed=m["counts_failed"]
        ),
        provider_errors=list(m["provider_errors"] or []),
        metadata=dict(m["metadata"] or {}),
        request_total=m["request_total"],
        input_bytes=m["input_bytes"],
        created_at=m["created_at"],
        submitted_at=m["submitted_at"],
        ended_at=m["ended_at"],
        results_applied_at=m["results_applied_at"],
        failure_reason=m["failure_reason"],
        input_cost=m["input_cost"],
        output_cost=m["output_cost"],
        total_cost=m["total_cost"],
        submit_requested_at=m["submit_requested_at"],
        next_poll_at=m["next_poll_at"],
        poll_count=m["poll_count"],
        handler=m["handler"],
        handlers_done=tuple(m["handlers_done"] or ()),
        handler_dispatched_at=m["handler_dispatched_at"],
        handler_attempts=m["handler_attempts"],
        handler_error=m["handler_error"],
        handler_next_at=m["handler_next_at"],
        handler_gave_up_at=m["handler_gave_up_at"],
        files_deleted_at=m["files_deleted_at"],
        result_sources=None
        if m["result_sources"] is None
        else ResultSources.from_json(m["result_sources"]),
        submit_state=dict(m["submit_state"] or {}),
        step_failures=m["step_failures"],
        last_error=None if m["last_error"] is None else StepFailure(**m["last_error"]),
        provider_status=m["provider_status"],
    )


def completion_from_row(row: sa.Row[Any]) -> Completion:
    # The dataclass's fields are the table's columns, by name.
    values = dict(row._mapping)
    values["status"] = CompletionStatus(values["status"])
    values["metadata"] = dict(values["metadata"] or {})
    return Completion(**values)
