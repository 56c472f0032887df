"""batchinfer: asyncio-native LLM batch inference, every request a row in Postgres."""

from __future__ import annotations

from batchinfer.client import BatchInfer
from batchinfer.domain import (
    ApplyReport,
    Batch,
    BatchStatus,
    Completion,
    CompletionStatus,
    RequestCounts,
    Stats,
    Usage,
)
from batchinfer.errors import (
    AuthenticationError,
    BatchBusyError,
    BatchInferError,
    BatchNotFoundError,
    ClosedError,
    DataRejectedError,
    InvalidBatchError,
    InvalidRequestError,
    JsonlError,
    PermanentProviderError,
    ProviderError,
    ProviderRejectedError,
    ProviderUnavailableError,
    RateLimitedError,
    ResultsNotReadyError,
    SchemaNotReadyError,
    StorageError,
    TransientProviderError,
    TransientStorageError,
)
from batchinfer.pricing import Price
from batchinfer.providers import OpenAIProvider, Provider
from batchinfer.worker import Worker

__all__ = [
    "ApplyReport",
    "AuthenticationError",
    "Batch",
    "BatchBusyError",
    "BatchInfer",
    "BatchInferError",
    "BatchNotFoundError",
    "BatchStatus",
    "ClosedError",
    "Completion",
    "CompletionStatus",
    "DataRejectedError",
    "InvalidBatchError",
    "InvalidRequestError",
    "JsonlError",
    "OpenAIProvider",
    "PermanentProviderError",
    "Price",
    "Provider",
    "ProviderError",
    "ProviderRejectedError",
    "ProviderUnavailableError",
    "RateLimitedError",
    "RequestCounts",
    "ResultsNotReadyError",
    "SchemaNotReadyError",
    "Stats",
    "StorageError",
    "TransientProviderError",
    "TransientStorageError",
    "Usage",
    "Worker",
]
