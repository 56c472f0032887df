"""The benchmark's data: requests, and result files shaped like the provider's.

Everything is a pure function of (tag, line index), so the process creating the requests and the
emulator process writing their results agree without passing data around. A batch's tag makes
its custom_ids unique across the emulator (``c50000-000123``).

The mix, per batch: ~10% error lines (HTTP 400 in the error file), one very long line every
10,000 (a 200 KB prompt and a 200 KB answer) and the rest ~1.5 KB output lines with usage. The
emulator's fake model echoes at most 200 characters, so answers are lengthened to a realistic
~700 characters (``pad``) after the model has run; the rest of each line is the model's own.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from typing import Any

import orjson

from batchinfer.testing import fake_model

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
EMBEDDINGS = "/v1/embeddings"
MODELS = {CHAT: "gpt-4o-mini", RESPONSES: "gpt-4o-mini", EMBEDDINGS: "text-embedding-3-small"}

PROMPT_CHARS = 1_100
ANSWER_CHARS = 700
LONG_CHARS = 200_000
LONG_EVERY = 10_000
FAIL_PERCENT = 10
EMBEDDING_DIMENSIONS = 512

SYSTEM = "Summarise the document in a short paragraph for a product catalogue."
FAILURE = {
    "status": 400,
    "message": "This model's maximum context length is 128000 tokens. Please reduce the length "
    "of the messages.",
    "code": "context_length_exceeded",
    "type": "invalid_request_error",
}

_VOCABULARY = """
the of and to in is that for it as with was on be by this are or from at an which but not have
has had were been their they its more one all can also other new into after some these time about
when only first most than over such would two made year between people where system data model
order price customer product service report result value market design quality support delivery
review account process energy network storage battery window garden kitchen river mountain coffee
paper engine signal theory history method analysis summary budget season contract project device
sensor camera screen cable shipment invoice
"""
_WORDS = _VOCABULARY.split()


def _corpus(chars: int) -> str:
    rng = random.Random(20240601)
    words: list[str] = []
    size = 0
    while size < chars:
        sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 20)))
        words.append(sentence.capitalize() + ".")
        size += len(words[-1]) + 1
    return " ".join(words)


CORPUS = _corpus(LONG_CHARS + 100_000)


def text(i: int, chars: int) -> str:
    start = (i * 7919) % (len(CORPUS) - chars)
    return CORPUS[start : start + chars]


def custom_id(tag: str, i: int) -> str:
    return f"{tag}-{i:06d}"


def index_of(cid: str) -> int:
    return int(cid.rsplit("-", 1)[1])


def is_long(i: int) -> bool:
    return i % LONG_EVERY == 7


def fails(i: int) -> bool:
    """About one line in ten ends in the error file (never a long one)."""
    return not is_long(i) and zlib.crc32(i.to_bytes(4, "little")) % 100 < FAIL_PERCENT


def body(i: int, endpoint: str) -> dict[str, Any]:
    """A request body as the caller writes it (``create_batch`` adds the model)."""
    doc = f"Document {i}: " + text(i, LONG_CHARS if is_long(i) else PROMPT_CHARS)
    if endpoint == CHAT:
        return {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": doc},
            ],
            "max_tokens": 60_000 if is_long(i) else 400,
            "temperature": 0.2,
        }
    if endpoint == RESPONSES:
        return {"instructions": SYSTEM, "input": doc, "max_output_tokens": 400}
    if endpoint == EMBEDDINGS:
        return {"input": doc[:2_000], "dimensions": EMBEDDING_DIMENSIONS}
    raise ValueError(f"no requests for {endpoint}")


def requests(tag: str, n: int, endpoint: str = CHAT) -> Iterator[dict[str, Any]]:
    for i in range(n):
        yield {
            "custom_id": custom_id(tag, i),
            "body": body(i, endpoint),
            "metadata": {"doc_id": i, "source": "benchmark"},
        }


def failing_ids(tag: str, n: int) -> list[str]:
    return [custom_id(tag, i) for i in range(n) if fails(i)]


def pad(endpoint: str, result: dict[str, Any], i: int) -> None:
    """Give a 2xx response body a realistic answer length (200 KB for a long line)."""
    answer = text(i + 1, LONG_CHARS if is_long(i) else ANSWER_CHARS)
    tokens = (len(answer) + 3) // 4
    usage = result.get("usage")
    if endpoint == CHAT:
        result["choices"][0]["message"]["content"] = answer
        usage["completion_tokens"] = tokens
        usage["total_tokens"] = usage["prompt_tokens"] + tokens
    elif endpoint == RESPONSES:
        result["output"][0]["content"][0]["text"] = answer
        usage["output_tokens"] = tokens
        usage["total_tokens"] = usage["input_tokens"] + tokens


def rewrite(content: bytes, endpoint: str) -> bytes:
    """An output file the emulator wrote, with its answers lengthened by ``pad``."""
    lines = []
    for raw in content.splitlines():
        if not raw:
            continue
        line = orjson.loads(raw)
        response = line.get("response") or {}
        if response.get("status_code") == 200:
            pad(endpoint, response["body"], index_of(line["custom_id"]))
        lines.append(orjson.dumps(line))
    return b"\n".join(lines) + b"\n"


def error_line(cid: str, i: int) -> bytes:
    """The line the emulator writes for a request scripted with ``fail_request(**FAILURE)``."""
    error = {k: FAILURE[k] for k in ("message", "type", "code")} | {"param": None}
    return orjson.dumps(
        {
            "id": f"batch_req_{i:024x}",
            "custom_id": cid,
            "response": {
                "status_code": FAILURE["status"],
                "request_id": f"req_{i:028x}",
                "body": {"error": error},
            },
            "error": None,
        }
    )


def craft(tag: str, n: int, endpoint: str, created: int) -> tuple[bytes, bytes, int, int]:
    """The output and error files of a batch of ``requests(tag, n, endpoint)``, written
    without the emulator's batch machinery (which stops at 50,000 lines): each output line is
    the fake model's answer, padded, in a shuffled order as real files come. Returns
    (output, errors, completed, failed)."""
    model = MODELS[endpoint]
    out: list[bytes] = []
    err: list[bytes] = []
    for i in range(n):
        cid = custom_id(tag, i)
        if fails(i):
            err.append(error_line(cid, i))
            continue
        result = fake_model.respond(endpoint, body(i, endpoint) | {"model": model}, created)
        pad(endpoint, result, i)
        out.append(
            orjson.dumps(
                {
                    "id": f"batch_req_{i:024x}",
                    "custom_id": cid,
                    "response": {
                        "status_code": 200,
                        "request_id": f"req_{i:028x}",
                        "body": result,
                    },
                    "error": None,
                }
            )
        )
    random.Random(tag).shuffle(out)
    random.Random(tag + "e").shuffle(err)
    output = b"\n".join(out) + b"\n" if out else b""
    errors = b"\n".join(err) + b"\n" if err else b""
    return output, errors, len(out), len(err)
