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
    Usage,
)
from batchinfer.errors import (
    AuthenticationError,
    BatchInferError,
    BatchNotFoundError,
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
)
from batchinfer.pricing import Price
from batchinfer.providers import OpenAIProvider, Provider

__all__ = [
    "ApplyReport",
    "AuthenticationError",
    "Batch",
    "BatchInfer",
    "BatchInferError",
    "BatchNotFoundError",
    "BatchStatus",
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
    "StorageError",
    "TransientProviderError",
    "Usage",
]
