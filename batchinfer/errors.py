"""Every error batchinfer raises, in one tree.

::

    BatchInferError
    ├── InvalidRequestError      a request given to create_batch is unusable
    ├── InvalidBatchError        the verb does not apply to the batch in its current status
    │   └── BatchBusyError       another caller holds the batch's claim right now: try later
    ├── BatchNotFoundError       no batch with that id in the database
    ├── ClosedError              the BatchInfer (or its worker) was closed; make a new one
    ├── ResultsNotReadyError     transient: the provider says done but its files are not there yet
    ├── BatchStalledError        wait() gave up: the steps driving the batch keep failing
    ├── JsonlError               a line of a provider file could not be read (carries line_no)
    ├── StorageError             the database failed (cause chained)
    │   ├── TransientStorageError  connection lost, server restarting, timeout: run it again
    │   ├── SchemaNotReadyError  the tables are missing or older than this version: run migrate()
    │   └── DataRejectedError    the database refused a value (out of range, invalid text)
    └── ProviderError            the provider answered with an error, or could not be reached
        ├── TransientProviderError     worth retrying later
        │   ├── RateLimitedError       429, with retry_after in seconds when the provider said
        │   └── ProviderUnavailableError  5xx, timeouts, dropped or refused connections
        └── PermanentProviderError     retrying the same call will not help
            ├── AuthenticationError    401 / 403
            └── ProviderRejectedError  any other 4xx

aiohttp and SQLAlchemy exceptions never escape the public API: they are translated at the
boundary with the original chained as ``__cause__``. Messages never contain an API key.
"""

from __future__ import annotations


class BatchInferError(Exception):
    """Base class of every batchinfer error."""


class InvalidRequestError(BatchInferError, ValueError):
    """A request passed to create_batch is invalid; nothing was written."""

    def __init__(self, message: str, *, position: int | None = None, custom_id: str | None = None):
        where = []
        if position is not None:
            where.append(f"requests[{position}]")
        if custom_id is not None:
            where.append(f"custom_id {custom_id!r}")
        prefix = f"{', '.join(where)}: " if where else ""
        super().__init__(f"{prefix}{message}")
        self.position = position
        self.custom_id = custom_id


class InvalidBatchError(BatchInferError):
    """The operation does not apply to the batch in its current status."""


class BatchBusyError(InvalidBatchError):
    """Another caller (a worker, or a submit elsewhere) is working on the batch right now."""


class BatchNotFoundError(BatchInferError, LookupError):
    """No batch with this id exists in the database."""


class ClosedError(BatchInferError, RuntimeError):
    """The BatchInfer was closed with ``aclose()``; it opens no new connection or session."""


class ResultsNotReadyError(BatchInferError):
    """The provider reports the batch finished but its result files are not available yet.

    Transient: poll the status again and fetch later.
    """


class BatchStalledError(BatchInferError):
    """The steps driving a batch (submit, poll, apply) failed again and again: a wait gives
    up instead of waiting for ever. ``last_error`` says what failed; the batch itself goes on
    (a worker keeps retrying it), so a wait called again after the fix ends normally."""

    def __init__(self, message: str, *, last_error: str | None = None) -> None:
        super().__init__(message)
        self.last_error = last_error


class JsonlError(BatchInferError, ValueError):
    """A line of a JSONL file could not be decoded."""

    def __init__(self, message: str, *, line_no: int):
        super().__init__(f"line {line_no}: {message}")
        self.line_no = line_no


class StorageError(BatchInferError):
    """The database could not complete the operation."""


class TransientStorageError(StorageError):
    """The database could not be reached or dropped the connection, or a statement timed out.

    Nothing was half-written (each write is one transaction); the same call may succeed later.
    """


class SchemaNotReadyError(StorageError):
    """The batchinfer tables are missing or out of date; call ``await bi.migrate()``."""


class DataRejectedError(StorageError):
    """The database refused a value as invalid for its column (SQLSTATE class 22)."""


class ProviderError(BatchInferError):
    """The provider returned an error or could not be reached."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.request_id = request_id


class TransientProviderError(ProviderError):
    """A provider failure that may succeed if the same call is made again later."""


class RateLimitedError(TransientProviderError):
    """HTTP 429. ``retry_after`` is the wait in seconds the provider asked for, if any."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        status: int | None = 429,
        code: str | None = None,
        request_id: str | None = None,
    ):
        super().__init__(message, status=status, code=code, request_id=request_id)
        self.retry_after = retry_after


class ProviderUnavailableError(TransientProviderError):
    """5xx, a timeout, or a connection that was refused or dropped."""


class PermanentProviderError(ProviderError):
    """A provider failure that the same call will hit again."""


class AuthenticationError(PermanentProviderError):
    """HTTP 401 or 403: the API key is missing, wrong or lacks access."""


class ProviderRejectedError(PermanentProviderError):
    """Any other 4xx: the provider refused the request as sent."""
