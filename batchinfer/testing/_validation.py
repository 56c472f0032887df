"""Validation of a batch input file, as OpenAI does while a batch is `validating`.

Error codes and params follow what the real service reports (see the wire-protocol reference,
section A1.6); Azure's extra codes (`duplicate_custom_id`, `model_mismatch`, `too_many_tasks`,
`empty_file`) cover the checks OpenAI documents without a recorded code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

__all__ = ["MAX_REPORTED_ERRORS", "MAX_TASKS", "Task", "Validated", "validate_input"]

MAX_TASKS = 50_000
# A file of 50,000 bad lines would otherwise put 50,000 errors into every Batch object served.
MAX_REPORTED_ERRORS = 100

REQUIRED_FIELDS = ("custom_id", "method", "url", "body")

# Which body field each endpoint cannot do without; the param names match OpenAI's reports.
_REQUIRED_BODY_FIELD = {
    "/v1/chat/completions": ("messages", "Messages parameter is required."),
    "/v1/responses": ("input", "Input parameter is required."),
    "/v1/embeddings": ("input", "Input parameter is required."),
}


@dataclass(frozen=True, slots=True)
class Task:
    """One request of a validated batch.

    The line is kept as offsets into the input file rather than as a parsed body: a 200 MB input
    parsed up front would cost several times its size in Python objects.
    """

    custom_id: str
    start: int
    end: int


@dataclass(slots=True)
class Validated:
    tasks: list[Task] = field(default_factory=list)
    model: str | None = None
    errors: list[dict[str, object]] = field(default_factory=list)


def batch_error(
    code: str, message: str, *, line: int | None = None, param: str | None = None
) -> dict[str, object]:
    return {"code": code, "message": message, "param": param, "line": line}


def _check_line(
    raw: bytes, line_no: int, endpoint: str, seen: set[str], result: Validated
) -> str | dict[str, object]:
    """The line's custom_id when it is a valid request, else its error."""
    try:
        entry = orjson.loads(raw)
    except orjson.JSONDecodeError:
        entry = None
    if not isinstance(entry, dict):
        return batch_error(
            "invalid_json_line", "This line is not parseable as valid JSON.", line=line_no
        )
    for name in REQUIRED_FIELDS:
        if entry.get(name) is None:
            return batch_error(
                "missing_required_parameter",
                f"Missing required parameter: '{name}'.",
                line=line_no,
                param=name,
            )
    custom_id, method, url, body = (entry[name] for name in REQUIRED_FIELDS)
    if not isinstance(custom_id, str) or not custom_id:
        return batch_error(
            "invalid_type", "custom_id must be a non-empty string.", line=line_no, param="custom_id"
        )
    if method != "POST":
        return batch_error(
            "invalid_method", "Only POST requests are supported.", line=line_no, param="method"
        )
    if url != endpoint:
        return batch_error(
            "invalid_url",
            "The URL provided for this request does not match the batch endpoint.",
            line=line_no,
            param="url",
        )
    if not isinstance(body, dict):
        return batch_error("invalid_type", "body must be an object.", line=line_no, param="body")
    if body.get("stream") is True:
        return batch_error(
            "streaming_unsupported",
            "Streaming is not supported in the Batch API.",
            line=line_no,
            param="body.stream",
        )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return batch_error(
            "invalid_request", "Model parameter is required.", line=line_no, param="body.model"
        )
    required = _REQUIRED_BODY_FIELD.get(endpoint)
    if required is not None and body.get(required[0]) is None:
        return batch_error(
            "invalid_request", required[1], line=line_no, param=f"body.{required[0]}"
        )
    if result.model is None:
        result.model = model
    elif model != result.model:
        return batch_error(
            "model_mismatch",
            f"All requests in a batch must use the same model; expected '{result.model}', "
            f"got '{model}'.",
            line=line_no,
            param="body.model",
        )
    if custom_id in seen:
        return batch_error(
            "duplicate_custom_id",
            f"The custom_id '{custom_id}' appears more than once in this batch.",
            line=line_no,
            param="custom_id",
        )
    seen.add(custom_id)
    return custom_id


def validate_input(content: bytes, endpoint: str) -> Validated:
    """Parse ``content`` line by line; ``errors`` is empty exactly when the batch may run."""
    result = Validated()
    seen: set[str] = set()
    lines = 0
    line_no = 0
    pos = 0
    size = len(content)
    while pos < size:
        nl = content.find(b"\n", pos)
        end = size if nl < 0 else nl
        line_no += 1
        raw = content[pos:end]
        start, pos = pos, end + 1
        if not raw.strip():
            continue
        lines += 1
        checked = _check_line(raw, line_no, endpoint, seen, result)
        if isinstance(checked, str):
            result.tasks.append(Task(checked, start, end))
        elif len(result.errors) < MAX_REPORTED_ERRORS:
            result.errors.append(checked)
    if lines == 0:
        result.errors.append(batch_error("empty_file", "The batch input file is empty."))
    elif lines > MAX_TASKS:
        result.errors.append(
            batch_error(
                "too_many_tasks",
                f"The batch input file contains {lines} requests; the limit is {MAX_TASKS}.",
            )
        )
    if result.errors:
        result.tasks.clear()
    return result
