"""Files and batches held by the emulator, and the batch state machine.

All mutation happens on the event loop thread, so no locking is needed; the HTTP layer and the
test-facing driving methods both call into :class:`Store`.
"""

from __future__ import annotations

import random
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import fake_model
from ._validation import Task, batch_error, validate_input

__all__ = [
    "CANCELLABLE",
    "TERMINAL",
    "BatchRecord",
    "CancelConflict",
    "FileRecord",
    "ScriptedFailure",
    "StateError",
    "Store",
    "page",
]

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
CANCELLABLE = frozenset({"validating", "in_progress", "finalizing"})
COMPLETION_WINDOW_SECONDS = 24 * 3600
# OpenAI keeps batch input and output files for 30 days unless told otherwise.
DEFAULT_FILE_TTL = 30 * 24 * 3600

EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
CANCELLED_MESSAGE = "This request was not executed because the batch was cancelled."


class StateError(ValueError):
    """An operation that the batch's current status does not allow."""


class CancelConflict(StateError):
    def __init__(self, status: str) -> None:
        super().__init__(f"Cannot cancel a batch with status '{status}'.")
        self.status = status


@dataclass(frozen=True, slots=True)
class FileRecord:
    id: str
    filename: str
    purpose: str
    created_at: int
    expires_at: int | None

    def to_object(self, size: int) -> dict[str, object]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": size,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


@dataclass(frozen=True, slots=True)
class ScriptedFailure:
    status: int
    message: str
    code: str | None
    type: str


@dataclass(eq=False, slots=True)
class BatchRecord:
    obj: dict[str, Any]
    forced_errors: list[dict[str, object]] | None
    output_ttl: int | None
    last_step_at: float
    input: bytes = b""
    tasks: list[Task] = field(default_factory=list)
    cursor: int = 0
    output_lines: list[bytes] = field(default_factory=list)
    error_lines: list[bytes] = field(default_factory=list)
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def id(self) -> str:
        return str(self.obj["id"])

    @property
    def status(self) -> str:
        return str(self.obj["status"])

    @property
    def endpoint(self) -> str:
        return str(self.obj["endpoint"])


def page(ids: list[str], after: str | None, limit: int) -> tuple[list[str], bool]:
    """Cursor pagination the way OpenAI does it: items strictly after ``after``."""
    start = 0
    if after:
        try:
            start = ids.index(after) + 1
        except ValueError:
            return [], False
    chunk = ids[start : start + limit]
    return chunk, start + limit < len(ids)


class Store:
    def __init__(
        self, *, clock: Callable[[], float], seed: int, step_seconds: float | None
    ) -> None:
        self.clock = clock
        self.seed = seed
        self.step_seconds = step_seconds
        self._rng = random.Random(seed)
        self.files: dict[str, bytes] = {}
        self.file_records: dict[str, FileRecord] = {}
        self.batches: dict[str, dict[str, object]] = {}
        self.records: dict[str, BatchRecord] = {}
        # When each file and batch came to be, by clock(): eventual-consistency faults need it.
        self.born: dict[str, float] = {}
        self.failures: dict[str, ScriptedFailure] = {}
        self.dropped: set[str] = set()
        self.validation_failures: deque[list[dict[str, object]]] = deque()
        #: Azure deployments by name, and the model each runs: its answers name the model.
        self.deployments: dict[str, str] = {}

    def answer(self, endpoint: str, body: dict[str, Any], created: int) -> dict[str, Any]:
        """The fake model's answer, naming the model a deployment runs, as Azure's do."""
        result = fake_model.respond(endpoint, body, created)
        model = result.get("model")
        if isinstance(model, str) and model in self.deployments:
            result["model"] = self.deployments[model]
        return result

    def now(self) -> int:
        return int(self.clock())

    def new_id(self, prefix: str) -> str:
        # Unique across emulator instances: ids end up in databases that outlive one server.
        return f"{prefix}{uuid.uuid4().hex[:24]}"

    # ---- files

    def add_file(
        self, content: bytes, *, filename: str, purpose: str, ttl: int | None = None
    ) -> FileRecord:
        created = self.now()
        if ttl is None and purpose in ("batch", "batch_output"):
            ttl = DEFAULT_FILE_TTL
        record = FileRecord(
            id=self.new_id("file-"),
            filename=filename,
            purpose=purpose,
            created_at=created,
            expires_at=None if ttl is None else created + ttl,
        )
        self.files[record.id] = content
        self.file_records[record.id] = record
        self.born[record.id] = self.clock()
        return record

    def file_object(self, file_id: str) -> dict[str, object] | None:
        """The File object, with `files` as the source of truth.

        Tests rewrite ``Emulator.files`` directly (to serve a hand-made result file, or to corrupt
        one), so size comes from the current content and unknown ids get plausible metadata.
        """
        content = self.files.get(file_id)
        if content is None:
            return None
        record = self.file_records.get(file_id)
        if record is None:
            record = FileRecord(file_id, f"{file_id}.jsonl", "batch_output", self.now(), None)
        return record.to_object(len(content))

    def delete_file(self, file_id: str) -> bool:
        self.file_records.pop(file_id, None)
        self.born.pop(file_id, None)
        return self.files.pop(file_id, None) is not None

    # ---- batches

    def create_batch(
        self,
        *,
        input_file_id: str,
        endpoint: str,
        metadata: dict[str, str] | None,
        output_ttl: int | None,
    ) -> BatchRecord:
        created = self.now()
        batch_id = self.new_id("batch_")
        obj: dict[str, Any] = {
            "id": batch_id,
            "object": "batch",
            "endpoint": endpoint,
            "model": None,
            "errors": None,
            "input_file_id": input_file_id,
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": created,
            "in_progress_at": None,
            "expires_at": created + COMPLETION_WINDOW_SECONDS,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "usage": _usage_object(0, 0, 0, 0),
            "metadata": metadata,
        }
        forced = self.validation_failures.popleft() if self.validation_failures else None
        record = BatchRecord(
            obj=obj, forced_errors=forced, output_ttl=output_ttl, last_step_at=self.clock()
        )
        self.batches[batch_id] = obj
        self.records[batch_id] = record
        self.born[batch_id] = self.clock()
        return record

    def record(self, batch_id: str) -> BatchRecord:
        try:
            return self.records[batch_id]
        except KeyError:
            raise KeyError(f"no batch {batch_id!r}") from None

    def advance(self, batch_id: str) -> str:
        record = self.record(batch_id)
        if record.status not in TERMINAL:
            self._step(record, self.now())
            record.last_step_at = self.clock()
        return record.status

    def finish(self, batch_id: str) -> None:
        while self.record(batch_id).status not in TERMINAL:
            self.advance(batch_id)

    def process(self, batch_id: str, n: int | None) -> None:
        record = self.record(batch_id)
        if record.status not in ("in_progress", "cancelling"):
            raise StateError(f"batch {batch_id} is {record.status}; only in_progress runs requests")
        target = len(record.tasks) if n is None else min(len(record.tasks), record.cursor + n)
        self._run_until(record, target)

    def expire(self, batch_id: str) -> None:
        record = self.record(batch_id)
        if record.status in TERMINAL:
            raise StateError(f"batch {batch_id} is already {record.status}")
        self._abandon(record, "batch_expired", EXPIRED_MESSAGE)
        self._close(record, "expired", self.now())

    def cancel(self, batch_id: str) -> BatchRecord:
        record = self.record(batch_id)
        self.tick(record)
        status = record.status
        if status in CANCELLABLE:
            record.obj["status"] = "cancelling"
            record.obj["cancelling_at"] = self.now()
            record.last_step_at = self.clock()
        elif status not in ("cancelling", "cancelled"):
            raise CancelConflict(status)
        return record

    def tick(self, record: BatchRecord) -> None:
        """Apply the steps that ``step_seconds`` says have elapsed since the last one."""
        step = self.step_seconds
        if step is None or record.status in TERMINAL:
            return
        now = self.clock()
        while record.status not in TERMINAL and now - record.last_step_at >= step:
            record.last_step_at += step
            self._step(record, int(record.last_step_at))
        if record.status == "in_progress" and record.tasks:
            # Spread the work over the step so pollers see request_counts grow.
            fraction = min(1.0, (now - record.last_step_at) / step)
            self._run_until(record, int(len(record.tasks) * fraction))

    def tick_all(self) -> None:
        for record in self.records.values():
            self.tick(record)

    # ---- transitions

    def _step(self, record: BatchRecord, at: int) -> None:
        status = record.status
        if status == "validating":
            self._validate(record, at)
        elif status == "in_progress":
            self._run_until(record, len(record.tasks))
            record.obj["status"] = "finalizing"
            record.obj["finalizing_at"] = at
        elif status == "finalizing":
            self._close(record, "completed", at)
        elif status == "cancelling":
            self._abandon(record, "batch_cancelled", CANCELLED_MESSAGE)
            self._close(record, "cancelled", at)

    def _validate(self, record: BatchRecord, at: int) -> None:
        obj = record.obj
        input_id = str(obj["input_file_id"])
        content = self.files.get(input_id)
        if record.forced_errors is not None:
            errors = record.forced_errors
        elif content is None:
            errors = [
                batch_error(
                    "invalid_request",
                    f"Cannot find file {input_id}, or organization does not have access to it.",
                    param="file_id",
                )
            ]
        else:
            validated = validate_input(content, record.endpoint)
            errors = validated.errors
            if not errors:
                record.input = content
                record.tasks = validated.tasks
                obj["model"] = validated.model
        if errors:
            obj["errors"] = {"object": "list", "data": errors}
            obj["status"] = "failed"
            obj["failed_at"] = at
            return
        obj["request_counts"]["total"] = len(record.tasks)
        obj["status"] = "in_progress"
        obj["in_progress_at"] = at

    def _run_until(self, record: BatchRecord, target: int) -> None:
        if record.cursor >= target:
            return
        created = self.now()
        endpoint = record.endpoint
        while record.cursor < target:
            task = record.tasks[record.cursor]
            record.cursor += 1
            self._run(record, task, endpoint, created)
        self._refresh_counts(record)

    def _run(self, record: BatchRecord, task: Task, endpoint: str, created: int) -> None:
        custom_id = task.custom_id
        if custom_id in self.dropped:
            return
        failure = self.failures.get(custom_id)
        if failure is not None:
            error = fake_model.ModelError(
                failure.message, status=failure.status, code=failure.code, type=failure.type
            )
            record.error_lines.append(self._http_error_line(custom_id, error))
            return
        body = orjson.loads(record.input[task.start : task.end])["body"]
        try:
            result = self.answer(endpoint, body, created)
        except fake_model.ModelError as exc:
            record.error_lines.append(self._http_error_line(custom_id, exc))
            return
        usage = fake_model.batch_usage(endpoint, result)
        record.input_tokens += usage.input_tokens
        record.cached_tokens += usage.cached_tokens
        record.output_tokens += usage.output_tokens
        record.reasoning_tokens += usage.reasoning_tokens
        record.output_lines.append(
            orjson.dumps(
                {
                    "id": self.new_id("batch_req_"),
                    "custom_id": custom_id,
                    "response": {
                        "status_code": 200,
                        "request_id": self.new_id("req_"),
                        "body": result,
                    },
                    "error": None,
                }
            )
        )

    def _http_error_line(self, custom_id: str, error: fake_model.ModelError) -> bytes:
        return orjson.dumps(
            {
                "id": self.new_id("batch_req_"),
                "custom_id": custom_id,
                "response": {
                    "status_code": error.status,
                    "request_id": self.new_id("req_"),
                    "body": error.envelope(),
                },
                "error": None,
            }
        )

    def _abandon(self, record: BatchRecord, code: str, message: str) -> None:
        """Report every request that never ran, the way an expired or cancelled batch does."""
        for task in record.tasks[record.cursor :]:
            if task.custom_id in self.dropped:
                continue
            record.error_lines.append(
                orjson.dumps(
                    {
                        "id": self.new_id("batch_req_"),
                        "custom_id": task.custom_id,
                        "response": None,
                        "error": {"code": code, "message": message},
                    }
                )
            )
        record.cursor = len(record.tasks)
        self._refresh_counts(record)

    def _close(self, record: BatchRecord, status: str, at: int) -> None:
        obj = record.obj
        # Real output files come back in completion order, not input order.
        random.Random(f"{self.seed}:{record.id}").shuffle(record.output_lines)
        if record.output_lines:
            obj["output_file_id"] = self._result_file(record, "output", record.output_lines)
        if record.error_lines:
            obj["error_file_id"] = self._result_file(record, "error", record.error_lines)
        obj["status"] = status
        obj[f"{status}_at"] = at
        # Terminal batches never run again; dropping the input keeps 200 MB batches from piling up.
        record.input = b""
        record.tasks = []
        record.output_lines = []
        record.error_lines = []

    def _result_file(self, record: BatchRecord, kind: str, lines: list[bytes]) -> str:
        content = b"\n".join(lines) + b"\n"
        filename = f"{record.id}_{kind}.jsonl"
        return self.add_file(
            content, filename=filename, purpose="batch_output", ttl=record.output_ttl
        ).id

    def _refresh_counts(self, record: BatchRecord) -> None:
        counts = record.obj["request_counts"]
        counts["completed"] = len(record.output_lines)
        counts["failed"] = len(record.error_lines)
        record.obj["usage"] = _usage_object(
            record.input_tokens,
            record.cached_tokens,
            record.output_tokens,
            record.reasoning_tokens,
        )


def _usage_object(
    input_tokens: int, cached_tokens: int, output_tokens: int, reasoning_tokens: int
) -> dict[str, object]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": input_tokens + output_tokens,
    }
