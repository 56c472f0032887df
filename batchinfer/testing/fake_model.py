"""A deterministic stand-in for an OpenAI model.

Every answer is a pure function of the request body (plus the ``created`` timestamp), so the live
endpoints and the batch output give byte-identical bodies for the same request apart from
timestamps, and tests can predict both text and token counts.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = [
    "BATCH_ENDPOINTS",
    "MODEL_ENDPOINTS",
    "BatchUsage",
    "ModelError",
    "batch_usage",
    "body_digest",
    "chat_completion",
    "embeddings",
    "respond",
    "response",
]

JSON = dict[str, Any]

# What POST /v1/batches accepts as `endpoint`; the fake model answers only the first three.
MODEL_ENDPOINTS = ("/v1/chat/completions", "/v1/responses", "/v1/embeddings")
BATCH_ENDPOINTS = (
    *MODEL_ENDPOINTS,
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
)

ECHO_LIMIT = 200
DEFAULT_DIMENSIONS = 8
# Per-message overhead, roughly what OpenAI's chat format adds around each message.
MESSAGE_OVERHEAD = 3


class ModelError(Exception):
    """A request the model refuses; the live endpoint answers it as an HTTP error."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type

    def envelope(self) -> JSON:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": error}


@dataclass(frozen=True, slots=True)
class BatchUsage:
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0


def body_digest(body: JSON) -> str:
    """A stable id fragment: the same body always yields the same ids, live or batched."""
    raw = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(raw, digest_size=12).hexdigest()


def _words(text: str) -> int:
    return len(text.split())


def _prompt_tokens(text: str) -> int:
    # OpenAI's rule of thumb of ~4 characters per token. Splitting multi-kilobyte prompts into
    # words dominated the cost of a 50,000-request batch, and this needs no allocation.
    return (len(text) + 3) // 4


def _cached(prompt_tokens: int) -> int:
    # Mirrors OpenAI's prompt caching: only prompts of 1024+ tokens, in 128-token increments.
    return (prompt_tokens // 128) * 128 if prompt_tokens >= 1024 else 0


def _is_reasoning_model(model: str) -> bool:
    return model.startswith(("o", "gpt-5"))


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        ]
        return " ".join(texts)
    return ""


def _echo(text: str) -> str:
    return ("Echo: " + text[:ECHO_LIMIT]).strip()


def _require_model(body: JSON) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ModelError(
            "Model parameter is required.", param="model", code="missing_required_parameter"
        )
    return model


def _reject_stream(body: JSON) -> None:
    if body.get("stream") is True:
        raise ModelError(
            "Streaming is not supported by the batchinfer emulator.",
            param="stream",
            code="unsupported_value",
        )


def _placeholder(schema: object) -> object:
    if not isinstance(schema, dict):
        return None
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "object":
        return _arguments_object(schema)
    return {"string": "echo", "integer": 0, "number": 0, "boolean": False, "array": []}.get(
        str(kind)
    )


def _arguments_object(schema: JSON) -> JSON:
    props = schema.get("properties")
    if not isinstance(props, dict):
        return {}
    return {name: _placeholder(sub) for name, sub in props.items()}


def _tool_arguments(parameters: object) -> str:
    # Filling every declared property keeps strict-mode schemas satisfied.
    args = _arguments_object(parameters) if isinstance(parameters, dict) else {}
    return orjson.dumps(args).decode()


def _pick_function(tools: object, tool_choice: object, *, nested: bool) -> JSON | None:
    """The function tool to call, or None when the model should answer in text.

    ``nested`` is the chat shape (``{"type":"function","function":{...}}``); the Responses API
    puts name and parameters at the top level.
    """
    if not isinstance(tools, list) or not tools or tool_choice == "none":
        return None
    functions: list[JSON] = []
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            continue
        spec = tool.get("function") if nested else tool
        if isinstance(spec, dict) and isinstance(spec.get("name"), str):
            functions.append(spec)
    if not functions:
        return None
    wanted: object = None
    if isinstance(tool_choice, dict):
        inner = tool_choice.get("function") if nested else tool_choice
        if isinstance(inner, dict):
            wanted = inner.get("name")
    for spec in functions:
        if spec["name"] == wanted:
            return spec
    return functions[0]


def _output_budget(words: list[str], limit: object) -> tuple[str, bool]:
    """The visible reply after applying a max-token limit, and whether it was cut short."""
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < len(words):
        return " ".join(words[:limit]), True
    return " ".join(words), False


def chat_completion(body: JSON, created: int) -> JSON:
    _reject_stream(body)
    model = _require_model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ModelError(
            "Messages parameter is required.", param="messages", code="missing_required_parameter"
        )
    digest = body_digest(body)
    prompt_tokens = 0
    last_user = ""
    for message in messages:
        if not isinstance(message, dict):
            raise ModelError(
                "Each message must be an object.", param="messages", code="invalid_type"
            )
        text = _content_text(message.get("content"))
        prompt_tokens += _prompt_tokens(text) + MESSAGE_OVERHEAD
        if message.get("role") == "user":
            last_user = text

    tool = _pick_function(body.get("tools"), body.get("tool_choice"), nested=True)
    message_out: JSON = {"role": "assistant", "refusal": None, "annotations": []}
    if tool is not None:
        arguments = _tool_arguments(tool.get("parameters"))
        visible = max(1, len(arguments) // 4)
        message_out["content"] = None
        message_out["tool_calls"] = [
            {
                "id": f"call_{digest}",
                "type": "function",
                "function": {"name": tool["name"], "arguments": arguments},
            }
        ]
        finish_reason = "tool_calls"
    else:
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        text, truncated = _output_budget(_echo(last_user).split(), limit)
        visible = _words(text)
        message_out["content"] = text
        finish_reason = "length" if truncated else "stop"

    reasoning = 2 * visible if _is_reasoning_model(model) else 0
    completion_tokens = visible + reasoning
    return {
        "id": f"chatcmpl-{digest}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "message": message_out, "logprobs": None, "finish_reason": finish_reason}
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": _cached(prompt_tokens), "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": reasoning,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_batchinfer_emulator",
    }


def _response_input(body: JSON) -> tuple[int, str]:
    """Prompt token count and the text to echo, from `input` and `instructions`."""
    items = body.get("input")
    instructions = body.get("instructions")
    tokens = _prompt_tokens(instructions) if isinstance(instructions, str) else 0
    if isinstance(items, str):
        return tokens + _prompt_tokens(items) + MESSAGE_OVERHEAD, items
    if not isinstance(items, list) or not items:
        raise ModelError(
            "Input parameter is required.", param="input", code="missing_required_parameter"
        )
    last_user = ""
    for item in items:
        if not isinstance(item, dict):
            raise ModelError(
                "Each input item must be an object.", param="input", code="invalid_type"
            )
        text = _content_text(item.get("content"))
        if not text and isinstance(item.get("output"), str):
            text = item["output"]
        tokens += _prompt_tokens(text) + MESSAGE_OVERHEAD
        if item.get("role") == "user":
            last_user = text
    return tokens, last_user


def _response_tools(tools: object) -> list[object]:
    if not isinstance(tools, list):
        return []
    out: list[object] = []
    for tool in tools:
        if isinstance(tool, dict) and tool.get("type") == "function":
            # The server normalises function tools; echoing unknown keys would break SDK parsing.
            out.append(
                {
                    "type": "function",
                    "name": tool.get("name"),
                    "description": tool.get("description"),
                    "parameters": tool.get("parameters"),
                    "strict": tool.get("strict", True),
                }
            )
        else:
            out.append(tool)
    return out


def response(body: JSON, created: int) -> JSON:
    _reject_stream(body)
    model = _require_model(body)
    digest = body_digest(body)
    input_tokens, last_user = _response_input(body)

    tool = _pick_function(body.get("tools"), body.get("tool_choice"), nested=False)
    status = "completed"
    incomplete: JSON | None = None
    output: list[JSON]
    if tool is not None:
        arguments = _tool_arguments(tool.get("parameters"))
        visible = max(1, len(arguments) // 4)
        output = [
            {
                "type": "function_call",
                "id": f"fc_{digest}",
                "call_id": f"call_{digest}",
                "name": tool["name"],
                "arguments": arguments,
                "status": "completed",
            }
        ]
    else:
        text, truncated = _output_budget(_echo(last_user).split(), body.get("max_output_tokens"))
        visible = _words(text)
        if truncated:
            status = "incomplete"
            incomplete = {"reason": "max_output_tokens"}
        output = [
            {
                "type": "message",
                "id": f"msg_{digest}",
                "status": status,
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ]

    reasoning = 2 * visible if _is_reasoning_model(model) else 0
    output_tokens = visible + reasoning
    metadata = body.get("metadata")
    return {
        "id": f"resp_{digest}",
        "object": "response",
        "created_at": created,
        "completed_at": created if status == "completed" else None,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": incomplete,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": body.get("max_tool_calls"),
        "model": model,
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": body.get("text", {"format": {"type": "text"}}),
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": _response_tools(body.get("tools")),
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {
                "cached_tokens": _cached(input_tokens),
                "cache_write_tokens": 0,
            },
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": input_tokens + output_tokens,
        },
        "user": body.get("user"),
        "metadata": metadata if isinstance(metadata, dict) else {},
    }


def _vector(item: object, dimensions: int) -> list[float]:
    seed = orjson.dumps(item)
    raw = hashlib.shake_256(seed).digest(4 * dimensions)
    values = [(n / 0xFFFFFFFF) * 2.0 - 1.0 for n in struct.unpack(f"<{dimensions}I", raw)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    # Round-trip through float32 so the float and base64 encodings carry identical numbers.
    packed = struct.pack(f"<{dimensions}f", *(v / norm for v in values))
    return list(struct.unpack(f"<{dimensions}f", packed))


def _embedding_inputs(raw: object) -> list[str | list[Any]]:
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if all(isinstance(x, int) for x in raw):
            return [raw]
        if all(isinstance(x, str | list) for x in raw):
            return list(raw)
    raise ModelError(
        "Input must be a string, an array of strings, or an array of token arrays.",
        param="input",
        code="invalid_value",
    )


def embeddings(body: JSON) -> JSON:
    model = _require_model(body)
    inputs = _embedding_inputs(body.get("input"))
    dimensions = body.get("dimensions", DEFAULT_DIMENSIONS)
    if (
        not isinstance(dimensions, int)
        or isinstance(dimensions, bool)
        or not 1 <= dimensions <= 4096
    ):
        raise ModelError("dimensions must be between 1 and 4096.", param="dimensions")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise ModelError("encoding_format must be 'float' or 'base64'.", param="encoding_format")
    data: list[JSON] = []
    tokens = 0
    for index, item in enumerate(inputs):
        tokens += _prompt_tokens(item) if isinstance(item, str) else len(item)
        vector = _vector(item, dimensions)
        embedding: object = (
            base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            if encoding == "base64"
            else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def respond(endpoint: str, body: JSON, created: int) -> JSON:
    """The body a live call to ``endpoint`` (e.g. ``/v1/chat/completions``) returns."""
    if endpoint == "/v1/chat/completions":
        return chat_completion(body, created)
    if endpoint == "/v1/responses":
        return response(body, created)
    if endpoint == "/v1/embeddings":
        return embeddings(body)
    raise ModelError(
        f"The batchinfer emulator does not implement {endpoint}.",
        status=404,
        code="unsupported_endpoint",
    )


def batch_usage(endpoint: str, result: JSON) -> BatchUsage:
    """One result's usage in the Batch object's `usage` vocabulary."""
    usage = result.get("usage")
    if not isinstance(usage, dict):
        return BatchUsage()
    if endpoint == "/v1/responses":
        return BatchUsage(
            input_tokens=usage["input_tokens"],
            cached_tokens=usage["input_tokens_details"]["cached_tokens"],
            output_tokens=usage["output_tokens"],
            reasoning_tokens=usage["output_tokens_details"]["reasoning_tokens"],
        )
    if endpoint == "/v1/chat/completions":
        return BatchUsage(
            input_tokens=usage["prompt_tokens"],
            cached_tokens=usage["prompt_tokens_details"]["cached_tokens"],
            output_tokens=usage["completion_tokens"],
            reasoning_tokens=usage["completion_tokens_details"]["reasoning_tokens"],
        )
    return BatchUsage(input_tokens=usage.get("prompt_tokens", 0))


# ---- Anthropic's Messages API


def _anthropic_text(content: object) -> str:
    if isinstance(content, list):
        return " ".join(
            b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str)
        )
    return content if isinstance(content, str) else ""


def _cache_marked(blocks: object) -> int:
    """Tokens up to the last block marked ``cache_control``: the prefix Anthropic caches."""
    if not isinstance(blocks, list):
        return 0
    tokens = marked = 0
    for block in blocks:
        if isinstance(block, dict):
            tokens += _prompt_tokens(_anthropic_text([block]))
            if block.get("cache_control"):
                marked = tokens
    return marked


def message(body: JSON, cache: set[str]) -> JSON:
    """A Messages API answer (``POST /v1/messages``, or a batch's ``succeeded`` result).

    Prompt caching is played out in ``cache``: a system prompt marked ``cache_control`` is
    written to it the first time it is seen (``cache_creation_input_tokens``) and read from it
    after (``cache_read_input_tokens``).
    """
    _reject_stream(body)
    model = _require_model(body)
    limit = body.get("max_tokens")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ModelError(
            "max_tokens: Field required (an integer of at least 1)", param="max_tokens"
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ModelError("messages: Field required", param="messages")
    system = body.get("system")
    prompt = _prompt_tokens(_anthropic_text(system))
    last_user = ""
    for item in messages:
        if not isinstance(item, dict) or item.get("role") not in ("user", "assistant"):
            raise ModelError("messages: each message needs a role of user or assistant")
        text = _anthropic_text(item.get("content"))
        prompt += _prompt_tokens(text) + MESSAGE_OVERHEAD
        if item["role"] == "user":
            last_user = text
    cached = _cache_marked(system)
    written = read = 0
    if cached:
        key = body_digest({"model": model, "system": system})
        if key in cache:
            read = cached
        else:
            cache.add(key)
            written = cached
    digest = body_digest(body)
    tools = body.get("tools")
    choice = body.get("tool_choice")
    chosen = None
    if (
        isinstance(tools, list)
        and tools
        and not (isinstance(choice, dict) and choice.get("type") == "none")
    ):
        named = [t for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)]
        wanted = choice.get("name") if isinstance(choice, dict) else None
        chosen = next((t for t in named if t["name"] == wanted), named[0] if named else None)
    content: list[JSON]
    if chosen is not None:
        schema = chosen.get("input_schema")
        arguments = _arguments_object(schema) if isinstance(schema, dict) else {}
        content = [
            {
                "type": "tool_use",
                "id": f"toolu_{digest}",
                "name": chosen["name"],
                "input": arguments,
            }
        ]
        visible = max(1, len(orjson.dumps(arguments)) // 4)
        stop_reason = "tool_use"
    else:
        text, truncated = _output_budget(_echo(last_user).split(), limit)
        content = [{"type": "text", "text": text, "citations": None}]
        visible = _words(text)
        stop_reason = "max_tokens" if truncated else "end_turn"
    thinking = body.get("thinking")
    thought = 2 * visible if isinstance(thinking, dict) and thinking.get("type") == "enabled" else 0
    return {
        "id": f"msg_{digest}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {
            "input_tokens": prompt - written - read,
            "output_tokens": visible + thought,
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": written,
                "ephemeral_1h_input_tokens": 0,
            },
            "server_tool_use": None,
            "service_tier": "standard",
        },
    }


# ---- Google's Gemini API (generateContent, embedContent), camelCase as on the wire


def _gemini_text(content: object) -> str:
    parts = content.get("parts") if isinstance(content, dict) else None
    if not isinstance(parts, list):
        return ""
    return " ".join(
        p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)
    )


def gemini_content(request: JSON, model: str) -> JSON:
    """A GenerateContentResponse. ``generationConfig.maxOutputTokens`` cuts the answer short;
    a ``thinkingConfig.thinkingBudget`` above 0 thinks for twice the visible tokens (counted
    in ``thoughtsTokenCount``, apart from the candidates', as Gemini counts them)."""
    contents = request.get("contents")
    if not isinstance(contents, list) or not contents:
        raise ModelError("* GenerateContentRequest.contents: contents is not specified")
    prompt = _prompt_tokens(_gemini_text(request.get("systemInstruction")))
    last_user = ""
    for item in contents:
        if not isinstance(item, dict):
            raise ModelError("* GenerateContentRequest.contents: each content must be an object")
        text = _gemini_text(item)
        prompt += _prompt_tokens(text)
        if item.get("role", "user") == "user":
            last_user = text
    config = request.get("generationConfig")
    config = config if isinstance(config, dict) else {}
    text, truncated = _output_budget(_echo(last_user).split(), config.get("maxOutputTokens"))
    visible = _words(text)
    thinking = config.get("thinkingConfig")
    budget = thinking.get("thinkingBudget", 0) if isinstance(thinking, dict) else 0
    thoughts = 2 * visible if isinstance(budget, int) and budget != 0 else 0
    usage: JSON = {
        "promptTokenCount": prompt,
        "candidatesTokenCount": visible,
        "totalTokenCount": prompt + visible + thoughts,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
    }
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    return {
        "candidates": [
            {
                "content": {"parts": [{"text": text}], "role": "model"},
                "finishReason": "MAX_TOKENS" if truncated else "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": usage,
        "modelVersion": model.removeprefix("models/"),
        "responseId": body_digest(request)[:22],
    }


def gemini_embedding(request: JSON) -> JSON:
    """An EmbedContentResponse for one ``content``, as a batch's line gives it."""
    content = request.get("content")
    if not isinstance(content, dict):
        raise ModelError("* EmbedContentRequest.content: content is not specified")
    dimensions = request.get("outputDimensionality", DEFAULT_DIMENSIONS)
    if not isinstance(dimensions, int) or dimensions < 1:
        raise ModelError("* EmbedContentRequest.outputDimensionality: must be positive")
    text = _gemini_text(content)
    return {
        "embedding": {"values": _vector(text, dimensions)},
        "tokenCount": str(_prompt_tokens(text)),
    }
