"""Values that cross every layer: statuses, batches, completions, usage and parsed results.

All are frozen, slotted dataclasses: what the store hands back is a snapshot, never a live row,
so no lazy load or expired attribute can surprise an async caller.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

JSONObject = dict[str, Any]


class BatchStatus(enum.StrEnum):
    """A batch's status, in OpenAI's vocabulary (``pending`` is ours: not yet submitted)."""

    PENDING = "pending"
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_BATCH_STATUSES

    @property
    def rank(self) -> int:
        """How far along the lifecycle: a status never moves to a lower rank."""
        return _BATCH_RANK[self]

    @property
    def has_results(self) -> bool:
        """Terminal statuses whose files may hold paid-for results."""
        return self in (BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED)


TERMINAL_BATCH_STATUSES = frozenset(
    {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)


_BATCH_RANK = {
    BatchStatus.PENDING: 0,
    BatchStatus.VALIDATING: 1,
    BatchStatus.IN_PROGRESS: 2,
    BatchStatus.FINALIZING: 3,
    BatchStatus.CANCELLING: 4,
    **dict.fromkeys(TERMINAL_BATCH_STATUSES, 5),
}


class CompletionStatus(enum.StrEnum):
    PENDING = "pending"
    SUBMITTED = "submitted"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self in (CompletionStatus.COMPLETED, CompletionStatus.FAILED)


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestCounts:
    """Request counts normalised across providers."""

    total: int = 0
    completed: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """Token usage of one response, the same for every provider: ``prompt_tokens`` includes
    ``cached_tokens`` (read from the prompt cache) and ``cache_write_tokens`` (written to
    it); ``completion_tokens`` includes ``reasoning_tokens``. Adapters convert their
    provider's counts to this."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    cache_write_tokens: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Costs:
    """Money in USD, as Decimal so sums never drift."""

    input: Decimal
    output: Decimal

    @property
    def total(self) -> Decimal:
        return self.input + self.output


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedResponse:
    """What the realtime path and the batch path both extract from a 2xx response body."""

    body: JSONObject
    output_text: str | None = None
    tool_calls: list[JSONObject] | None = None
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)


#: Prices one response: (the model the response names, its usage) -> costs, or None if unknown.
Pricer = Callable[[str | None, Usage], Costs | None]


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultOutcome:
    """One result envelope, decided: the completion it targets and what it becomes."""

    custom_id: str
    status: CompletionStatus
    response: ParsedResponse | None = None
    status_code: int | None = None
    provider_request_id: str | None = None
    failure_error: str | None = None
    failure_reason: str | None = None
    costs: Costs | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderBatchError:
    code: str | None
    message: str
    param: str | None = None
    line: int | None = None


_RESULTS = "the provider's results"


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultSource:
    """One stream of a batch's results at its provider: a file, a results URL, a result list.

    ``key`` names it within the batch (``"output"``, ``"error"``, ``"results"``); ``ref`` is
    what the provider opens it by (a file id, a URL). A ``deletable`` source is deleted at the
    provider once applied, when the app asks for that (``delete_result_files``).
    """

    key: str
    ref: str
    deletable: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultSources:
    """Where a batch's results are, as its provider last said, and whether all are there.

    ``waiting_for`` says what is still to come (a file the counts promise, say): a results
    pass refuses to sweep what is missing while it is set. ``described_as`` names the sources
    in a swept completion's failure reason ("the output or error file").
    """

    sources: tuple[ResultSource, ...] = ()
    waiting_for: str | None = None
    described_as: str = _RESULTS
    #: The sources can be read while the batch runs (xAI's): what has arrived is applied at
    #: each poll, and the rest once it ends.
    while_running: bool = False

    @property
    def ready(self) -> bool:
        return self.waiting_for is None

    def to_json(self) -> JSONObject:
        return {
            "sources": [
                {"key": s.key, "ref": s.ref, "deletable": s.deletable} for s in self.sources
            ],
            "waiting_for": self.waiting_for,
            "described_as": self.described_as,
            "while_running": self.while_running,
        }

    @classmethod
    def from_json(cls, value: JSONObject) -> ResultSources:
        return cls(
            sources=tuple(
                ResultSource(key=s["key"], ref=s["ref"], deletable=bool(s.get("deletable")))
                for s in value.get("sources") or ()
            ),
            waiting_for=value.get("waiting_for"),
            described_as=value.get("described_as") or _RESULTS,
            while_running=bool(value.get("while_running")),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderBatch:
    """A provider's view of a batch, normalised: what retrieve/create/cancel return."""

    id: str
    status: BatchStatus
    raw_status: str
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    request_counts: RequestCounts = field(default_factory=RequestCounts)
    errors: tuple[ProviderBatchError, ...] = ()
    raw: JSONObject = field(default_factory=dict)
    #: Where its results are; the adapter fills it in wherever it reads a batch.
    results: ResultSources = field(default_factory=ResultSources)

    def failure_reason(self) -> str | None:
        """A readable sentence for a batch the provider failed, or None."""
        if not self.errors:
            return None
        parts = []
        for err in self.errors[:5]:
            where = f"line {err.line}: " if err.line is not None else ""
            code = f" [{err.code}]" if err.code else ""
            parts.append(f"{where}{err.message}{code}")
        more = f" (+{len(self.errors) - 5} more)" if len(self.errors) > 5 else ""
        return "; ".join(parts) + more


@dataclass(frozen=True, slots=True, kw_only=True)
class StepFailure:
    """Why the last step driving a batch failed: the error's type and message, and whether
    retrying could help without someone changing something (a key, a configuration)."""

    kind: str
    message: str
    permanent: bool

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass(frozen=True, slots=True, kw_only=True)
class SubmitKey:
    """What a provider is told of the batch it submits: enough to name what it creates after
    the batch, and to recognise, after a crash or a lost answer, what an earlier try made."""

    batch_id: uuid.UUID
    endpoint: str
    model: str
    request_total: int
    input_bytes: int
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Batch:
    id: uuid.UUID
    provider: str
    endpoint: str
    model: str
    status: BatchStatus
    provider_batch_id: str | None
    input_file_id: str | None
    output_file_id: str | None
    error_file_id: str | None
    request_counts: RequestCounts
    provider_errors: list[JSONObject]
    metadata: JSONObject
    request_total: int
    input_bytes: int
    created_at: datetime
    submitted_at: datetime | None
    ended_at: datetime | None
    results_applied_at: datetime | None
    failure_reason: str | None
    input_cost: Decimal | None
    output_cost: Decimal | None
    total_cost: Decimal | None
    #: Set by ``create_batch(submit=True)``: a worker submits it.
    submit_requested_at: datetime | None = None
    #: When a worker next polls it (or submits it), and how many polls so far.
    next_poll_at: datetime | None = None
    poll_count: int = 0
    #: The named completion handler, run with every unnamed one once results are applied.
    handler: str | None = None
    #: Keys of the handlers that have returned (each runs once).
    handlers_done: tuple[str, ...] = ()
    #: Set once every handler has returned.
    handler_dispatched_at: datetime | None = None
    handler_attempts: int = 0
    #: The last error a handler raised.
    handler_error: str | None = None
    handler_next_at: datetime | None = None
    #: Set when the handlers failed ``handler_attempts`` times in a row: no more retries.
    handler_gave_up_at: datetime | None = None
    #: When the provider's copies of the batch's files were deleted (see ``delete_input_files``).
    files_deleted_at: datetime | None = None
    #: Where the provider keeps its results, as last reported (None: not reported yet).
    result_sources: ResultSources | None = None
    #: What a submit noted at the provider so far, for its own retry (provider's own keys).
    submit_state: dict[str, str] = field(default_factory=dict)
    #: Steps (submit, poll, apply) that failed in a row since the last one that went through,
    #: and the last such failure.
    step_failures: int = 0
    last_error: StepFailure | None = None
    #: The provider's own word for the status, as last polled (Anthropic's ``ended``, Gemini's
    #: ``BATCH_STATE_SUCCEEDED``; for xAI, which has none, what its counters amount to).
    provider_status: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal

    @property
    def is_done(self) -> bool:
        """Ended, with its results applied: nothing more happens to its completions."""
        return self.results_applied_at is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class Completion:
    id: int
    batch_id: uuid.UUID | None
    custom_id: str
    line_no: int
    status: CompletionStatus
    request_body: JSONObject
    response_body: JSONObject | None
    output_text: str | None
    tool_calls: list[JSONObject] | None
    finish_reason: str | None
    status_code: int | None
    provider_request_id: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    cached_tokens: int | None
    reasoning_tokens: int | None
    input_cost: Decimal | None
    output_cost: Decimal | None
    total_cost: Decimal | None
    failure_error: str | None
    failure_reason: str | None
    started_at: datetime | None
    completed_at: datetime | None
    metadata: JSONObject
    #: Prompt tokens written to the provider's prompt cache (priced at its write rate).
    cache_write_tokens: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchLimits:
    """What one provider batch may hold."""

    endpoints: frozenset[str]
    max_requests: int = 50_000
    max_bytes: int = 200 * 1024 * 1024
    max_custom_id_length: int = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class NewRequest:
    """A validated request ready to be stored; ``body_json`` is exactly what will be sent."""

    custom_id: str
    line_no: int
    body_json: bytes
    metadata: JSONObject
    line_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ApplyReport:
    """What one pass over a batch's result files did."""

    applied: int = 0
    already_applied: int = 0
    unknown: int = 0
    duplicates: int = 0
    malformed: int = 0
    swept: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Stats:
    """For an app's metrics: batches by status, and how long the oldest in-flight one has run."""

    batches_by_status: dict[str, int]
    oldest_in_flight_seconds: float | None
    workers_alive: int
