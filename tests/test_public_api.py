from __future__ import annotations

import dataclasses
import importlib
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal

import pytest

import batchinfer
import batchinfer.testing
from batchinfer import Batch, BatchStatus, Completion, CompletionStatus, RequestCounts

EXPECTED_ALL = [
    "AnthropicProvider",
    "ApplyReport",
    "AuthenticationError",
    "AzureOpenAIProvider",
    "Batch",
    "BatchBusyError",
    "BatchInfer",
    "BatchInferError",
    "BatchLimits",
    "BatchNotFoundError",
    "BatchStalledError",
    "BatchStatus",
    "ClosedError",
    "Completion",
    "CompletionStatus",
    "DataRejectedError",
    "GeminiProvider",
    "InvalidBatchError",
    "InvalidRequestError",
    "JsonlError",
    "LiveProvider",
    "OpenAIProvider",
    "PermanentProviderError",
    "Price",
    "Provider",
    "ProviderBatch",
    "ProviderError",
    "ProviderRejectedError",
    "ProviderUnavailableError",
    "RateLimitedError",
    "RequestCounts",
    "ResultOutcome",
    "ResultSource",
    "ResultSources",
    "ResultsNotReadyError",
    "SchemaNotReadyError",
    "Stats",
    "StepFailure",
    "StorageError",
    "SubmitCheckpoint",
    "SubmitKey",
    "TransientProviderError",
    "TransientStorageError",
    "Usage",
    "Worker",
    "XAIProvider",
]

BATCH_FIELDS = {
    "id",
    "provider",
    "endpoint",
    "model",
    "status",
    "provider_batch_id",
    "input_file_id",
    "output_file_id",
    "error_file_id",
    "request_counts",
    "provider_errors",
    "metadata",
    "created_at",
    "submitted_at",
    "ended_at",
    "results_applied_at",
    "failure_reason",
    "input_cost",
    "output_cost",
    "total_cost",
}

COMPLETION_FIELDS = {
    "id",
    "batch_id",
    "custom_id",
    "status",
    "request_body",
    "response_body",
    "output_text",
    "tool_calls",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "input_cost",
    "output_cost",
    "total_cost",
    "failure_error",
    "failure_reason",
    "started_at",
    "completed_at",
    "metadata",
}


def test_all_is_the_contract() -> None:
    assert sorted(EXPECTED_ALL) == EXPECTED_ALL
    assert batchinfer.__all__ == EXPECTED_ALL


@pytest.mark.parametrize("name", EXPECTED_ALL)
def test_every_name_is_importable(name: str) -> None:
    module = importlib.import_module("batchinfer")
    assert getattr(module, name) is not None
    assert getattr(module, name).__module__.startswith("batchinfer.")


def test_errors_form_one_tree() -> None:
    errors = [
        getattr(batchinfer, n)
        for n in EXPECTED_ALL
        if n.endswith("Error") and n != "BatchInferError"
    ]
    assert errors
    for error in errors:
        assert issubclass(error, batchinfer.BatchInferError), error


def test_testing_exports_emulator() -> None:
    assert "Emulator" in batchinfer.testing.__all__
    from batchinfer.testing import Emulator

    assert Emulator is batchinfer.testing.Emulator


def test_statuses_use_openai_vocabulary() -> None:
    assert {s.value for s in BatchStatus} == {
        "pending",
        "validating",
        "in_progress",
        "finalizing",
        "cancelling",
        "completed",
        "failed",
        "expired",
        "cancelled",
    }
    terminal = {s.value for s in BatchStatus if s.is_terminal}
    assert terminal == {"completed", "failed", "expired", "cancelled"}
    assert {s.value for s in CompletionStatus} == {"pending", "submitted", "completed", "failed"}


def test_batch_has_the_issue_fields() -> None:
    names = {f.name for f in dataclasses.fields(Batch)}
    assert names >= BATCH_FIELDS, BATCH_FIELDS - names
    assert {f.name for f in dataclasses.fields(RequestCounts)} >= {"total", "completed", "failed"}


def test_completion_has_the_issue_fields() -> None:
    names = {f.name for f in dataclasses.fields(Completion)}
    assert names >= COMPLETION_FIELDS, COMPLETION_FIELDS - names


def _batch() -> Batch:
    return Batch(
        id=uuid.uuid4(),
        provider="openai",
        endpoint="/v1/chat/completions",
        model="gpt-4o-mini",
        status=BatchStatus.PENDING,
        provider_batch_id=None,
        input_file_id=None,
        output_file_id=None,
        error_file_id=None,
        request_counts=RequestCounts(),
        provider_errors=[],
        metadata={},
        request_total=1,
        input_bytes=10,
        created_at=datetime.now(UTC),
        submitted_at=None,
        ended_at=None,
        results_applied_at=None,
        failure_reason=None,
        input_cost=None,
        output_cost=None,
        total_cost=Decimal("0"),
    )


def _completion() -> Completion:
    return Completion(
        id=1,
        batch_id=None,
        custom_id="q1",
        line_no=1,
        status=CompletionStatus.PENDING,
        request_body={},
        response_body=None,
        output_text=None,
        tool_calls=None,
        finish_reason=None,
        status_code=None,
        provider_request_id=None,
        prompt_tokens=None,
        completion_tokens=None,
        total_tokens=None,
        cached_tokens=None,
        reasoning_tokens=None,
        input_cost=None,
        output_cost=None,
        total_cost=None,
        failure_error=None,
        failure_reason=None,
        started_at=None,
        completed_at=None,
        metadata={},
    )


@pytest.mark.parametrize(("make", "field"), [(_batch, "status"), (_completion, "output_text")])
def test_dataclasses_are_frozen(make: Callable[[], object], field: str) -> None:
    obj = make()
    assert dataclasses.is_dataclass(obj)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, field, "changed")
    with pytest.raises((dataclasses.FrozenInstanceError, AttributeError, TypeError)):
        setattr(obj, "extra_attribute", 1)  # noqa: B010


def test_request_counts_frozen() -> None:
    counts = RequestCounts(total=3, completed=2, failed=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        counts.total = 4  # type: ignore[misc]
