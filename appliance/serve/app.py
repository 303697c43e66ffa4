"""The HTTP API (FastAPI): OpenAI-compatible text generation, image classification, health and metrics.

    GET  /healthz               no auth: 200 while the server runs
    GET  /metrics               Prometheus text (any valid key)
    GET  /v1/models             the models this key may use
    POST /v1/completions        {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream"}
    POST /v1/chat/completions   {"model", "messages", ...} through the base model's chat template
    POST /v1/classify?model=M   body: the bytes of one DICOM, PNG or JPEG file

Every request passes, in this order: API key (401 / revoked 401) -> body size (413) and time (408)
-> JSON (400) -> model (404, 403 for a key limited to other tasks) -> admission (429 for the key,
503 for the server, both with Retry-After) -> a row of the model's running batch (a batched LM: its
tokens come from the batch's scheduler thread) or a worker thread (classifiers, TensorRT).
`/v1/classify` takes its model from the query, so it checks model and admission before it reads (and
buffers) the upload. Responses name the model version and backend (X-Airlock-Model: name@version,
X-Airlock-Backend). Each request leaves one JSON log line: id, key name, endpoint, status, bytes in
and out, tokens, latency. Never prompt or output text, never file contents: they may be patient data.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from appliance.serve import openai_api
from appliance.serve.api_keys import ApiKey, authenticate
from appliance.serve.batching import BatchingLMBackend
from appliance.serve.decoding import Completion, GenerationTimeout, complete, encode_chat, encode_prompt
from appliance.serve.errors import RequestRefused
from appliance.serve.hot_swap import ModelTable
from appliance.serve.limits import Admission, ServeLimits, Ticket
from appliance.serve.metrics import Metrics
from appliance.serve.models import ServedModel
from appliance.serve.uploads import decode_upload

request_log = logging.getLogger("airlock.serve.requests")
_KIND_WORDS = {"lm": "a language model", "classifier": "an image classifier"}


@dataclass
class ServerState:
    home: Path
    table: ModelTable
    limits: ServeLimits
    metrics: Metrics = field(default_factory=Metrics)
    admission: Admission | None = None
    executor: ThreadPoolExecutor | None = None
    db: Any = None
    """A catalog connection of the event loop's thread (API key lookups)."""


@dataclass
class Exchange:
    """What the request log and metrics record about one request (sizes and counts, never contents)."""

    endpoint: str
    request_id: str = field(default_factory=lambda: "req-" + secrets.token_hex(8))
    started: float = field(default_factory=time.monotonic)
    key: str = "-"
    bytes_in: int = 0
    bytes_out: int = 0
    model: str | None = None
    backend: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    code: str | None = None


def create_app(state: ServerState) -> FastAPI:
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        from appliance.catalog import open_catalog

        state.db = open_catalog(state.home, migrate=False)
        state.admission = Admission(state.limits)
        # A thread per running request: `workers` for backends that do not batch, and one per batch row, where the
        # request waits for its tokens from the batch's scheduler thread (appliance.serve.batching).
        state.executor = ThreadPoolExecutor(state.limits.workers + state.limits.max_batch,
                                            thread_name_prefix="airlock-infer")
        try:
            yield
        finally:
            state.executor.shutdown(wait=True, cancel_futures=True)
            state.db.close()

    app = FastAPI(title="Airlock inference server", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    api = _Api(state)

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"status": "ok", "models": len(state.table.all())})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return await api.serve(request, "metrics", api.metrics)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await api.serve(request, "models", api.models)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await api.serve(request, "completions", api.completions)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await api.serve(request, "chat_completions", api.chat_completions)

    @app.post("/v1/classify")
    async def classify(request: Request) -> Response:
        return await api.serve(request, "classify", api.classify)

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> Response:
        refused = RequestRefused(404, "no_such_endpoint", f"no endpoint {request.method} {request.url.path[:100]}")
        return JSONResponse(openai_api.error_body(refused), status_code=404)

    @app.exception_handler(405)
    async def wrong_method(request: Request, exc: Exception) -> Response:
        refused = RequestRefused(405, "method_not_allowed", f"{request.method} is not allowed on this endpoint")
        return JSONResponse(openai_api.error_body(refused), status_code=405)

    return app


Handler = Callable[[Request, Exchange], Awaitable[Response]]


class _Api:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.limits = state.limits

    # -- the envelope every request goes through --------------------------------------------------

    async def serve(self, request: Request, endpoint: str, handler: Handler) -> Response:
        exchange = Exchange(endpoint)
        try:
            response = await handler(request, exchange)
        except RequestRefused as refused:
            response = self._refusal(refused, exchange)
        except Exception as exc:  # never a traceback or a message (it may quote data) to the client or the log
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            request_log.error(json.dumps({"event": "internal_error", "id": exchange.request_id,
                                          "error": type(exc).__name__,
                                          "at": f"{Path(frame.filename).name}:{frame.lineno}"}))
            response = self._refusal(RequestRefused(500, "internal_error", "internal error; the server log has the "
                                                    f"details under request id {exchange.request_id}"), exchange)
        response.headers["X-Request-Id"] = exchange.request_id
        if exchange.model:
            response.headers["X-Airlock-Model"] = exchange.model
            response.headers["X-Airlock-Backend"] = exchange.backend or ""
        if isinstance(response, StreamingResponse):
            response.body_iterator = self._logged_stream(response.body_iterator, exchange, response.status_code)
        else:
            exchange.bytes_out = len(response.body)
            self._record(exchange, response.status_code)
        return response

    def _refusal(self, refused: RequestRefused, exchange: Exchange) -> Response:
        exchange.code = refused.code
        headers = {}
        if refused.retry_after_s is not None:
            headers["Retry-After"] = str(refused.retry_after_s)
        if refused.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if refused.status in (408, 413):
            headers["Connection"] = "close"  # the rest of the body is not read
        return JSONResponse(openai_api.error_body(refused), status_code=refused.status, headers=headers)

    async def _logged_stream(self, chunks: Any, exchange: Exchange, status: int) -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                data = chunk.encode() if isinstance(chunk, str) else chunk
                exchange.bytes_out += len(data)
                yield data
        finally:
            self._record(exchange, status)

    def _record(self, exchange: Exchange, status: int) -> None:
        seconds = time.monotonic() - exchange.started
        # A code is set only by a refusal or by a stream that ended in an error event (its status was 200).
        self.state.metrics.observe_request(exchange.endpoint, status, seconds, exchange.code)
        line = {"event": "request", "id": exchange.request_id, "key": exchange.key, "endpoint": exchange.endpoint,
                "status": status, "bytes_in": exchange.bytes_in, "bytes_out": exchange.bytes_out,
                "ms": round(seconds * 1000, 1), "model": exchange.model}
        if exchange.prompt_tokens is not None:
            line["prompt_tokens"] = exchange.prompt_tokens
            line["completion_tokens"] = exchange.completion_tokens
        if exchange.code:
            line["code"] = exchange.code
        request_log.info(json.dumps(line))

    def _authenticate(self, request: Request, exchange: Exchange) -> ApiKey:
        key = authenticate(self.state.db, request.headers.get("authorization"))
        exchange.key = key.name
        return key

    async def _read_body(self, request: Request, exchange: Exchange, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise RequestRefused(400, "bad_content_length", "the Content-Length header is not a number")
            if int(declared) > limit:
                if int(declared) <= 4 * limit:  # small enough to read and drop, so the client sees the answer
                    await self._drain(request, 4 * limit)
                raise RequestRefused(413, "body_too_large", f"the body is {int(declared)} bytes; this endpoint "
                                                            f"takes at most {limit}")
        chunks: list[bytes] = []

        async def receive() -> None:
            async for chunk in request.stream():
                exchange.bytes_in += len(chunk)
                if exchange.bytes_in > limit:
                    raise RequestRefused(413, "body_too_large", f"the body is larger than {limit} bytes, the most "
                                                                "this endpoint takes")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(receive(), self.limits.body_timeout_s)
        except TimeoutError:
            raise RequestRefused(408, "body_timeout", f"the body did not arrive within "
                                                      f"{self.limits.body_timeout_s:g} s") from None
        return b"".join(chunks)

    async def _drain(self, request: Request, most: int) -> None:
        seen = 0
        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                async for chunk in request.stream():
                    seen += len(chunk)
                    if seen > most:
                        return
        except Exception:  # a client that stops sending, or leaves: answer anyway and close
            return

    def _model(self, key: ApiKey, name: str | None, kind: str, exchange: Exchange) -> ServedModel:
        table = self.state.table
        if name is None:
            usable = [m for m in table.all() if m.kind == kind and key.allows(m.name)]
            if len(usable) != 1:
                raise RequestRefused(400, "model_required", "say which model to use in 'model' (GET /v1/models "
                                                            "lists them)")
            model = usable[0]
        else:
            found = table.get(name)
            if found is None:
                raise RequestRefused(404, "model_not_found", f"model {name!r} is not served here; GET /v1/models "
                                                             "lists the models")
            model = found
        if not key.allows(model.name):
            raise RequestRefused(403, "model_not_allowed", f"API key {key.name!r} may not use model {model.name!r}")
        if model.kind != kind:
            endpoint = "/v1/classify" if model.kind == "classifier" else "/v1/chat/completions or /v1/completions"
            raise RequestRefused(400, "wrong_model_kind", f"model {model.name!r} is {_KIND_WORDS[model.kind]}; "
                                                          f"use {endpoint}")
        exchange.model, exchange.backend = model.label, model.backend.kind
        return model

    async def _start(self, key: ApiKey, model: ServedModel) -> Ticket:
        assert self.state.admission is not None
        place = "batch" if isinstance(model.backend, BatchingLMBackend) else "worker"
        ticket = self.state.admission.admit(key.name, place)
        try:
            await ticket.start()
        except BaseException:
            ticket.release()
            raise
        return ticket

    def _in_worker(self, ticket: Ticket, work: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run `work` on the model's thread pool; the ticket is released when the work ends, not before."""
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self.state.executor, work)
        except BaseException:
            ticket.release()
            raise
        future.add_done_callback(lambda _: ticket.release())
        return future

    # -- endpoints --------------------------------------------------------------------------------

    async def metrics(self, request: Request, exchange: Exchange) -> Response:
        key = self._authenticate(request, exchange)
        admission = self.state.admission
        text = self.state.metrics.render(self.state.table.all(), admission.admitted if admission else 0,
                                         admission.running if admission else 0, allows=key.sees_metrics_of)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def models(self, request: Request, exchange: Exchange) -> Response:
        key = self._authenticate(request, exchange)
        data = []
        for model in sorted(self.state.table.all(), key=lambda m: m.name):
            if key.allows(model.name):
                entry = {"id": model.name, "object": "model", "created": int(model.loaded_at), "owned_by": "airlock",
                         "airlock": {"version": model.version, "kind": model.kind, "backend": model.backend.kind,
                                     "backend_reason": model.backend_reason, "base_model": model.base_model,
                                     "run": model.target.run_id}}
                if model.kind == "classifier":
                    entry["airlock"]["labels"] = model.labels
                else:  # as vLLM names it: prompt plus generated tokens the model takes
                    entry["max_model_len"] = model.context_length
                    entry["airlock"]["reasoning"] = model.reasoning
                    entry["airlock"]["max_batch"] = getattr(model.backend, "max_batch", 1)
                data.append(entry)
        return JSONResponse({"object": "list", "data": data})

    async def completions(self, request: Request, exchange: Exchange) -> Response:
        return await self._generate(request, exchange, chat=False)

    async def chat_completions(self, request: Request, exchange: Exchange) -> Response:
        return await self._generate(request, exchange, chat=True)

    async def _generate(self, request: Request, exchange: Exchange, *, chat: bool) -> Response:
        key = self._authenticate(request, exchange)
        body = await self._read_body(request, exchange, self.limits.max_text_body_bytes)
        payload = openai_api.parse_json_object(body)
        parsed = (openai_api.parse_chat_request if chat else openai_api.parse_completion_request)(payload, self.limits)
        model = self._model(key, parsed.model, "lm", exchange)
        limit = self.limits.max_prompt_tokens

        def encode() -> list[int]:
            if chat:
                return encode_chat(model.tokenizer, parsed.messages, limit=limit)
            return encode_prompt(model.tokenizer, parsed.prompt or "", limit=limit)

        ticket = await self._start(key, model)
        try:  # tokenized in a worker too (a long prompt takes milliseconds), before any response header
            prompt_ids = await asyncio.get_running_loop().run_in_executor(self.state.executor, encode)
        except BaseException:
            ticket.release()
            raise
        reasoning = chat and model.reasoning
        try:
            sampling = parsed.for_model(model.sampling_defaults, prompt_tokens=len(prompt_ids),
                                        context=model.context_length, limits=self.limits, reasoning=reasoning)
        except BaseException:
            ticket.release()
            raise
        cancelled = threading.Event()

        def run(on_text: Callable[[str], None] | None,
                on_reasoning: Callable[[str], None] | None = None) -> Completion:
            return complete(model.backend, model.tokenizer, prompt_ids, sampling, stops=parsed.stops,
                            eos_ids=frozenset() if parsed.ignore_eos else model.eos_ids,
                            should_stop=cancelled.is_set, on_text=on_text,
                            timeout_s=self.limits.generation_timeout_s, reasoning=reasoning,
                            on_reasoning=on_reasoning)

        if parsed.stream:
            return self._stream(model, exchange, ticket, run, cancelled, chat=chat, include_usage=parsed.include_usage)
        try:
            result = await self._in_worker(ticket, lambda: run(None))
        except GenerationTimeout:
            raise RequestRefused(504, "generation_timeout", "the generation took longer than "
                                                            f"{self.limits.generation_timeout_s:g} s") from None
        finally:
            cancelled.set()
        self._count_tokens(model, exchange, result)
        build = openai_api.chat_response if chat else openai_api.completion_response
        return JSONResponse(build(_response_id(chat), model.name, model.version, result))

    def _count_tokens(self, model: ServedModel, exchange: Exchange, result: Completion) -> None:
        exchange.prompt_tokens, exchange.completion_tokens = result.prompt_tokens, result.completion_tokens
        self.state.metrics.add_tokens(model.name, result.prompt_tokens, result.completion_tokens)

    def _stream(self, model: ServedModel, exchange: Exchange, ticket: Ticket,
                run: Callable[..., Completion], cancelled: threading.Event, *,
                chat: bool, include_usage: bool) -> Response:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def put(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            except RuntimeError:  # the loop closed (server shutting down): nobody is listening any more
                cancelled.set()

        def work() -> None:
            try:
                put("done", run(lambda text: put("text", text), lambda text: put("reasoning", text)))
            except GenerationTimeout:
                put("timeout", None)
            except RequestRefused as refused:
                put("refused", refused)
            except Exception as exc:
                put("error", exc)

        worker = self._in_worker(ticket, work)
        response_id = _response_id(chat)

        def sse(value: dict[str, Any]) -> str:
            return f"data: {json.dumps(value, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            try:
                if chat:
                    yield sse(openai_api.stream_chunk(response_id, model.name, model.version, chat=True, first=True))
                while True:
                    kind, value = await queue.get()
                    if kind in ("text", "reasoning"):
                        yield sse(openai_api.stream_chunk(response_id, model.name, model.version, chat=chat,
                                                          text=value, reasoning=kind == "reasoning"))
                        continue
                    # The worker's last act was to report; once it has returned, its slot is free again,
                    # before the client sees the end (a client that waits for it may ask again at once).
                    await worker
                    ticket.release()
                    if kind == "done":
                        self._count_tokens(model, exchange, value)
                        yield sse(openai_api.stream_chunk(response_id, model.name, model.version, chat=chat,
                                                          finish_reason=value.finish_reason))
                        if include_usage:
                            yield sse(openai_api.usage_chunk(response_id, model.name, model.version, value, chat=chat))
                    else:
                        refused = value if kind == "refused" else \
                            RequestRefused(504, "generation_timeout", "the generation took too long") \
                            if kind == "timeout" else \
                            RequestRefused(500, "internal_error", f"internal error ({type(value).__name__})")
                        exchange.code = refused.code
                        yield sse(openai_api.error_body(refused))
                    break
                yield "data: [DONE]\n\n"
            finally:
                cancelled.set()  # a client that went away stops the generation at the next token

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def classify(self, request: Request, exchange: Exchange) -> Response:
        key = self._authenticate(request, exchange)
        name = request.query_params.get("model")
        # Model and admission before the body: a client without a slot never gets to make the
        # server buffer an upload (up to max_classify_body_bytes) while it waits.
        model = self._model(key, name, "classifier", exchange)
        ticket = await self._start(key, model)
        try:
            body = await self._read_body(request, exchange, self.limits.max_classify_body_bytes)
        except BaseException:
            ticket.release()
            raise

        def run() -> tuple[list[float], str]:
            pixels, kind = decode_upload(body, size=model.image_size, channels=model.backend.channels,
                                         frames=model.frames)
            return model.backend.probabilities(pixels), kind

        probabilities, kind = await self._in_worker(ticket, run)
        ranked = sorted(zip(model.labels, probabilities, strict=True), key=lambda p: -p[1])
        return JSONResponse({"id": "cls-" + secrets.token_hex(8), "object": "classification", "model": model.name,
                             "version": model.version, "backend": model.backend.kind, "input": kind,
                             "label": ranked[0][0],
                             "predictions": [{"label": label, "probability": p} for label, p in ranked]})


def _response_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
