"""The OpenAI-compatible request and response shapes: validated by hand, refused in one line.

    request = parse_chat_request(json_body, limits)       # RequestRefused(400) names the bad field
    body = chat_response(request_id, model, completion)

Fields the OpenAI API has and this server does not implement are refused when they would change
the result (n > 1, logprobs, penalties, tools) and ignored when they would not (user, metadata).
Messages never quote the offending value: it may be a patient's text.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from typing import Any

from appliance.serve.backends import Sampling
from appliance.serve.decoding import ROLES, Completion
from appliance.serve.errors import RequestRefused
from appliance.serve.limits import ServeLimits

MAX_MESSAGES = 256
_NO_EFFECT_IF_DEFAULT = {"n": 1, "logprobs": None, "top_logprobs": None, "echo": False, "best_of": 1,
                         "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "tools": None,
                         "tool_choice": None, "functions": None, "function_call": None, "suffix": None,
                         "response_format": None}


@dataclass(frozen=True)
class GenerationRequest:
    model: str | None
    sampling: Sampling
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (as in vLLM): benchmarks want fixed lengths."""
    prompt: str | None = None
    """/v1/completions"""
    messages: tuple[dict[str, str], ...] = ()
    """/v1/chat/completions"""
    given: frozenset[str] = frozenset()
    """Which of temperature, top_p and max_tokens the request set (the others come from `for_model`)."""

    def for_model(self, defaults: dict[str, float], *, prompt_tokens: int, context: int, limits: ServeLimits,
                  reasoning: bool = False) -> Sampling:
        """The sampling for one model and prompt: the model's `generation_config` fills what the request
        left out (as vLLM does), and the generation must fit the model's context after the prompt.

        max_tokens left out: `default_max_tokens` (`default_reasoning_max_tokens` for an R1-family chat,
        whose reasoning alone runs to thousands of tokens), within what the context leaves."""
        room = context - prompt_tokens
        if room < 1:
            raise RequestRefused(400, "context_length_exceeded",
                                 f"the prompt is {prompt_tokens} tokens; this model's context holds {context}, "
                                 "with room for at least one new token")
        updates: dict[str, Any] = {}
        if "max_tokens" in self.given:
            if self.sampling.max_new_tokens > room:
                raise RequestRefused(400, "context_length_exceeded",
                                     f"max_tokens {self.sampling.max_new_tokens} plus the prompt's {prompt_tokens} "
                                     f"tokens exceed this model's context of {context}; ask for at most {room}")
        else:
            default = limits.default_reasoning_max_tokens if reasoning else limits.default_max_tokens
            updates["max_new_tokens"] = max(1, min(default, limits.max_tokens, room))
        for field, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
            value = defaults.get(field)
            if field not in self.given and isinstance(value, int | float) and not isinstance(value, bool) \
                    and math.isfinite(value) and low <= value <= high:
                updates[field] = float(value) if field == "temperature" else float(value) or 1e-9
        return replace(self.sampling, **updates)


def _bad(field: str, what: str) -> RequestRefused:
    return RequestRefused(400, "invalid_request", f"field '{field}' {what}")


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise RequestRefused(400, "invalid_json", "the request body is empty; send a JSON object")
    try:
        value = json.loads(body)
    except UnicodeDecodeError:
        raise RequestRefused(400, "invalid_json", "the request body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise RequestRefused(400, "invalid_json", f"the request body is not valid JSON (line {exc.lineno}, "
                                                  f"column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise RequestRefused(400, "invalid_json", "the request body nests too deeply") from None
    if not isinstance(value, dict):
        raise RequestRefused(400, "invalid_json", "the request body must be a JSON object")
    return value


def _number(payload: dict[str, Any], field: str, default: float, low: float, high: float) -> float:
    value = payload.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not low <= value <= high:
        raise _bad(field, f"must be a number from {low:g} to {high:g}")
    return float(value)


def _integer(payload: dict[str, Any], field: str, low: int, high: int) -> int | None:
    value = payload.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(field, f"must be an integer from {low} to {high}")
    return value


def _common(payload: dict[str, Any], limits: ServeLimits, *, chat: bool) -> dict[str, Any]:
    for field, default in _NO_EFFECT_IF_DEFAULT.items():
        value = payload.get(field, default)
        if value not in (default, None) and not (field == "logprobs" and value is False):
            raise _bad(field, f"is not supported by this server (leave it out or set it to {json.dumps(default)})")
    model = payload.get("model")
    if model is not None and (not isinstance(model, str) or not model or len(model) > 128):
        raise _bad("model", "must be a model name from GET /v1/models")
    max_tokens = _integer(payload, "max_tokens", 1, limits.max_tokens)
    if chat and max_tokens is None:
        max_tokens = _integer(payload, "max_completion_tokens", 1, limits.max_tokens)
    seed = _integer(payload, "seed", -(2**63), 2**63 - 1)
    stop = payload.get("stop")
    stops: tuple[str, ...]
    if stop is None:
        stops = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= limits.max_stop_sequences:
        stops = tuple(stop)
    else:
        raise _bad("stop", f"must be a string or a list of at most {limits.max_stop_sequences} strings")
    if any(len(s) > 256 for s in stops):
        raise _bad("stop", "holds a sequence longer than 256 characters")
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "must be true or false")
    options = payload.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options", "must be an object")
    sampling = Sampling(max_new_tokens=max_tokens or limits.default_max_tokens,
                        temperature=_number(payload, "temperature", 1.0, 0.0, 2.0),
                        top_p=_number(payload, "top_p", 1.0, 0.0, 1.0) or 1e-9,
                        seed=seed % (2**63) if seed is not None else None)
    ignore_eos = payload.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos", "must be true or false")
    given = frozenset(f for f, v in (("temperature", payload.get("temperature")), ("top_p", payload.get("top_p")),
                                     ("max_tokens", max_tokens)) if v is not None)
    return {"model": model, "sampling": sampling, "stops": stops, "stream": stream,
            "include_usage": bool(options.get("include_usage", False)), "ignore_eos": ignore_eos, "given": given}


def parse_completion_request(payload: dict[str, Any], limits: ServeLimits) -> GenerationRequest:
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("prompt", "must be a string (one prompt per request)")
    return GenerationRequest(prompt=prompt, **_common(payload, limits, chat=False))


def _content_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{index}].content", "may only hold text parts ({'type': 'text', 'text': ...})")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"messages[{index}].content", "must be a string or a list of text parts")


def parse_chat_request(payload: dict[str, Any], limits: ServeLimits) -> GenerationRequest:
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        raise _bad("messages", f"must be a list of 1 to {MAX_MESSAGES} messages")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}]", "must be an object with 'role' and 'content'")
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role not in ROLES:
            raise _bad(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}")
        parsed.append({"role": role, "content": _content_text(message.get("content"), i)})
    return GenerationRequest(messages=tuple(parsed), **_common(payload, limits, chat=True))


def usage(completion: Completion) -> dict[str, Any]:
    """Token counts; a split (R1) generation adds `completion_tokens_details.reasoning_tokens` (OpenAI/DeepSeek)."""
    counts: dict[str, Any] = {"prompt_tokens": completion.prompt_tokens,
                              "completion_tokens": completion.completion_tokens,
                              "total_tokens": completion.prompt_tokens + completion.completion_tokens}
    if completion.reasoning is not None:
        counts["completion_tokens_details"] = {"reasoning_tokens": completion.reasoning_tokens}
    return counts


def completion_response(request_id: str, model: str, version: str, completion: Completion) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": version,
            "choices": [{"index": 0, "text": completion.text, "finish_reason": completion.finish_reason,
                         "logprobs": None}],
            "usage": usage(completion)}


def chat_response(request_id: str, model: str, version: str, completion: Completion) -> dict[str, Any]:
    """`message.reasoning_content` only for a split (R1-family) generation, as in DeepSeek's API."""
    message: dict[str, Any] = {"role": "assistant", "content": completion.text}
    if completion.reasoning is not None:
        message["reasoning_content"] = completion.reasoning
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": version,
            "choices": [{"index": 0, "message": message,
                         "finish_reason": completion.finish_reason, "logprobs": None}],
            "usage": usage(completion)}


def stream_chunk(request_id: str, model: str, version: str, *, chat: bool, text: str | None = None,
                 finish_reason: str | None = None, first: bool = False, reasoning: bool = False) -> dict[str, Any]:
    """`reasoning`: `text` is reasoning (`delta.reasoning_content`, DeepSeek's API), not the answer."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["reasoning_content" if reasoning else "content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        kind = "text_completion"
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model,
            "system_fingerprint": version, "choices": [choice]}


def usage_chunk(request_id: str, model: str, version: str, completion: Completion, *, chat: bool) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "system_fingerprint": version, "choices": [],
            "usage": usage(completion)}


def error_body(refused: RequestRefused) -> dict[str, Any]:
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}
    default = "invalid_request_error" if refused.status < 500 else "server_error"
    return {"error": {"message": refused.message, "type": kind.get(refused.status, default), "code": refused.code,
                      "param": None}}
