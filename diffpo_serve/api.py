"""The HTTP layer: ``create_app(settings)`` builds the FastAPI app; routes stay thin.

Owns: the routes (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models[/{id}]``, ``/health``,
``/metrics``, and the browser playground at ``/`` and ``/playground``: one static page, open like
``/health``, that calls the API from the same origin), the lifecycle (:class:`ServerRuntime`: the model loads in the background after startup,
so ``/health`` answers 503 while loading; :meth:`ServerRuntime.drain` is SIGTERM's drain, shutdown stops the
batcher), CORS (:class:`Cors`, the outermost layer: the ``--allowed-*`` settings, preflights answered before the
API key), the gate in front of the app (API key, body size limit, per-request metrics, and the 503 envelope for
a request uvicorn cancels at shutdown) and the exception handlers that render every error (validation,
malformed JSON, unknown route, anything unexpected) as the one OpenAI error envelope. A catch-all handler
logs the traceback and answers a generic 500; no response carries a traceback, none is plain text.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from dataclasses import replace
from email.message import Message
from pathlib import Path
from typing import Callable

import anyio
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from diffpo_serve.batcher import Batcher
from diffpo_serve.decoder_process import ProcessBatcher
from diffpo_serve.dllm.loading import LoadedModel, ModelLoadError, load_model, parse_ids
from diffpo_serve.engine import Engine, Generation
from diffpo_serve.metrics import ServerMetrics, endpoint_label
from diffpo_serve.paradigms import check_startup
from diffpo_serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, error_body, unavailable)
from diffpo_serve.settings import ServerSettings, parse_list, resolve_device

log = logging.getLogger(__name__)

Loader = Callable[[ServerSettings], LoadedModel]

PLAYGROUND = Path(__file__).with_name("static") / "playground.html"


def load_from_settings(settings: ServerSettings) -> LoadedModel:
    """The default loader: the shared ``load_model`` with the settings' path, device (``auto`` resolved) and ids."""
    loaded = load_model(settings.model, mask_id=settings.mask_id, pad_id=settings.pad_id,
                        eos_ids=parse_ids(settings.eos_id, "eos_id") if settings.eos_id is not None else None,
                        device=resolve_device(settings.device), dtype=settings.dtype,
                        trust_remote_code=settings.trust_remote_code, compile=settings.compile)
    problem = check_startup(loaded, settings)  # e.g. a masked-only --default-sampler for a canvas model
    if problem is not None:
        raise ModelLoadError(f"{settings.model}: {problem}")
    if settings.cache != "off" and not loaded.kv_cache:
        raise ModelLoadError(f"{settings.model}: --cache {settings.cache} needs a model with a native KV cache "
                             f"({type(loaded.model).__name__} has none); use --cache off")
    weight = next(loaded.model.parameters())
    if weight.dtype in (torch.bfloat16, torch.float16) and weight.device.type != "cpu":
        # on a CPU the sampler's aligned layout keeps rows independent (tests/test_sampler.py); a GPU's
        # matrix libraries may pick other kernels for other batch sizes, which no layout controls
        log.warning("decoding in %s on %s: the libraries there may round differently at different batch "
                    "sizes, so a few greedy outputs can depend on what else is in the batch (float32 keeps "
                    "them identical)", weight.dtype, weight.device)
    return loaded


class ServerRuntime:
    """Lifecycle of one app: ``loading`` -> ``ready`` -> ``draining`` (or ``failed``, or
    ``decoder_failed`` when the ``--decoder-process`` dies; the CLI then exits)."""

    def __init__(self, settings: ServerSettings, metrics: ServerMetrics, loader: Loader,
                 on_fatal: Callable[[BaseException], None] | None = None):
        self.settings = settings
        self.metrics = metrics
        self.loader = loader
        self.on_fatal = on_fatal
        self.status = "loading"
        self.error: str | None = None
        self.engine: Engine | None = None
        self.batcher: Batcher | ProcessBatcher | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._load())

    async def _load(self) -> None:
        started = time.perf_counter()
        process = None
        try:
            if self.settings.decoder_process:  # the model loads in the decoder process; we get its tokenizer
                process = ProcessBatcher(self.settings, self.loader, self.metrics, on_exit=self._decoder_exited)
                self.batcher = process
                loaded = await asyncio.to_thread(process.start)
            else:
                loaded = await asyncio.to_thread(self.loader, self.settings)
        except Exception as e:  # ModelLoadError has a clear message; anything else is logged in full
            self.status, self.error = "failed", str(e)
            log.error("cannot load the model: %s", e, exc_info=not type(e).__name__ == "ModelLoadError")
            if self.on_fatal is not None:
                self.on_fatal(e)
            return
        if self.status != "loading":  # shut down while loading
            return
        if process is not None:
            process.attach(asyncio.get_running_loop())
        else:
            self.batcher = Batcher(loaded, max_batch_size=self.settings.max_batch_size,
                                   max_queue=self.settings.max_queue, metrics=self.metrics)
            self.batcher.start()
        self.engine = Engine(loaded, self.batcher, self.settings, self.metrics)
        self.status = "ready"
        self.metrics.model_ready.set(1)
        log.info("serving %s as `%s` (loaded in %.1fs%s)", loaded.path, self.engine.model_name,
                 time.perf_counter() - started, f", {loaded.compiled} compiled" if loaded.compiled else "")

    def _decoder_exited(self, exc: BaseException) -> None:
        self.status, self.error = "decoder_failed", str(exc)
        self.metrics.model_ready.set(0)
        if self.on_fatal is not None:
            self.on_fatal(exc)

    def begin_drain(self) -> None:
        """Answer new requests with 503 from now on; running ones continue (SIGTERM calls this first)."""
        if self.status in ("loading", "ready"):
            self.status = "draining"
            self.metrics.model_ready.set(0)
            if self.batcher is not None:
                self.batcher.begin_drain()

    def busy(self) -> bool:
        """Rows of requests are queued or decoding (in this process or the decoder process)."""
        if self.batcher is None:
            return False
        stats = self.batcher.stats()
        return bool(stats["active_rows"] or stats["waiting_requests"])

    async def drain(self, poll: float = 0.05) -> bool:
        """SIGTERM's drain, while the listener stays open: new requests get 503 ``draining`` from now on,
        running and queued ones get up to ``drain_timeout`` seconds to finish; what is left then fails with
        the 503 ``draining`` envelope (a stream: an error event, then ``[DONE]``). Returns whether
        everything finished in time."""
        self.begin_drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout
        while self.busy():
            if loop.time() >= deadline:
                log.warning("drain timed out after %ss; failing the requests still running",
                            self.settings.drain_timeout)
                await asyncio.to_thread(self.batcher.stop)
                return False
            await asyncio.sleep(poll)
        return True

    async def shutdown(self) -> None:
        self.begin_drain()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.batcher is not None:
            finished = await asyncio.to_thread(self.batcher.drain, self.settings.drain_timeout)
            if not finished:
                log.warning("drain timed out after %ss; remaining requests were failed", self.settings.drain_timeout)

    def require_engine(self) -> Engine:
        if self.status == "ready" and self.engine is not None:
            return self.engine
        if self.status == "loading":
            raise unavailable("the model is loading; retry shortly", code="model_loading", retry_after=5)
        if self.status == "draining":
            raise unavailable("the server is shutting down", code="draining", retry_after=5)
        if self.status == "decoder_failed":
            raise APIError(503, f"the decoder stopped: {self.error}", type="service_unavailable_error",
                           code="decoder_failed")
        raise APIError(503, f"the model failed to load: {self.error}", type="service_unavailable_error",
                       code="model_load_failed")


# ----------------------------------------------------------------------------- the gate (pure ASGI)

def _json_response(status: int, body: dict, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(body, status_code=status, headers=headers)


class Gate:
    """Middleware inside :class:`Cors`: request metrics, API key on ``/v1``, body size limit (413); a request
    cancelled before its response started (uvicorn's shutdown grace ran out) gets the 503 ``draining`` envelope
    instead of uvicorn's plain-text 500."""

    def __init__(self, app, settings: ServerSettings, metrics: ServerMetrics):
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self._key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = endpoint_label(scope["path"])
        started = time.perf_counter()
        state = {"status": None, "recorded": False}

        def record():
            if not state["recorded"]:
                state["recorded"] = True
                self.metrics.requests.labels(endpoint, str(state["status"])).inc()
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record()

        try:
            await self._gated(scope, receive, send_and_record)
        except asyncio.CancelledError:
            if state["status"] is None:  # uvicorn gave up on the request at shutdown: the envelope, not its
                error = unavailable("the server is shutting down", code="draining", retry_after=5)  # text 500
                with contextlib.suppress(Exception):
                    await _json_response(503, error.body(), error.headers)(scope, receive, send_and_record)
            raise
        finally:
            if state["status"] is None:
                state["status"] = 499  # no response started: the client went away
            record()

    async def _gated(self, scope, receive, send_and_record):
        """The API key on ``/v1`` (401), then the body limit (413), then the app."""
        if self._key is not None and scope["path"].startswith("/v1") and not self._authorized(scope):
            error = APIError(401, "Invalid or missing API key: send `Authorization: Bearer <key>`",
                             type="authentication_error", code="invalid_api_key",
                             headers={"WWW-Authenticate": "Bearer"})
            return await _json_response(401, error.body(), error.headers)(scope, receive, send_and_record)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            receive = await self._buffer_body(scope, receive, send_and_record)
            if receive is None:
                return
        await self.app(scope, receive, send_and_record)

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)

    async def _buffer_body(self, scope, receive, send):
        """Read the whole body (at most max_body_bytes) and return a receive that replays it."""
        limit = self.settings.max_body_bytes
        too_large = APIError(413, f"the request body exceeds the server's limit of {limit} bytes",
                             code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                error = APIError(400, "invalid Content-Length header", code="invalid_request")
                await _json_response(400, error.body())(scope, receive, send)
                return None
            if int(declared) > limit:
                await _json_response(413, too_large.body())(scope, receive, send)
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _json_response(413, too_large.body())(scope, receive, send)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


# ----------------------------------------------------------------------------- CORS

class Cors(CORSMiddleware):
    """Starlette's CORS middleware with the settings' ``--allowed-*`` lists, answering preflights without plain
    text: an allowed one gets 200, no body, and the ``Access-Control-Allow-*`` headers, a refused one 400 with the error
    envelope (code ``cors_not_allowed``) and no ``Access-Control-Allow-Origin`` for the browser to accept.

    Outermost, so that preflights (which carry no API key) are answered before the :class:`Gate`, and every
    response, errors included, carries the headers a page from an allowed origin needs to read it."""

    def __init__(self, app, settings: ServerSettings):
        super().__init__(app, allow_origins=parse_list(settings.allowed_origins, "allowed_origins"),
                         allow_methods=parse_list(settings.allowed_methods, "allowed_methods"),
                         allow_headers=parse_list(settings.allowed_headers, "allowed_headers"),
                         allow_credentials=settings.allow_credentials)

    def preflight_response(self, request_headers) -> Response:
        answer = super().preflight_response(request_headers)
        headers = {k: v for k, v in answer.headers.items() if k not in ("content-length", "content-type")}
        if answer.status_code == 200:  # 200 and no body, as vLLM's and llama.cpp's preflights
            return Response(status_code=200, headers=headers)
        refused = answer.body.decode().removeprefix("Disallowed CORS ")
        message = (f"cross-origin request refused ({refused} not allowed): origin "
                   f"{request_headers['origin']!r}, method {request_headers['access-control-request-method']!r}; "
                   "the server's --allowed-origins / --allowed-methods / --allowed-headers decide")
        return _json_response(400, error_body(message, type="invalid_request_error", code="cors_not_allowed"),
                              headers)


# ----------------------------------------------------------------------------- responses

class EventStream(StreamingResponse):
    """SSE response that stops (and closes its generator) as soon as the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, content):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as tasks:
                async def stream_then_stop():
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    tasks.cancel_scope.cancel()

                tasks.start_soon(stream_then_stop)
                await self.listen_for_disconnect(receive)
                tasks.cancel_scope.cancel()
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def respond(generation: Generation, stream: bool, request: Request) -> Response:
    """A stream, or the whole response unless the client disconnects first (its rows are then dropped)."""
    if stream:
        return EventStream(generation.stream())
    work = asyncio.ensure_future(generation.result())
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    if work.cancelled():
        return Response(status_code=499)
    return JSONResponse(work.result().model_dump())


# ----------------------------------------------------------------------------- errors

def _param_of(loc) -> str | None:
    parts = [p for p in loc if p != "body"]
    if not parts:
        return None
    out = str(parts[0])
    for p in parts[1:]:
        if isinstance(p, int):
            out += f"[{p}]"
        elif "[" in str(p) or str(p) in ("str", "int", "float", "bool"):
            break  # a union member's name, not a field
        else:
            out += f".{p}"
    return out


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc, kind = tuple(first.get("loc", ())), first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the body is not valid JSON ({detail})".replace(" ()", ""), None
    if loc == ("body",):
        if kind == "missing":
            return "the request body is missing: send a JSON object", None
        return "the request body must be a JSON object", None
    param = _param_of(loc)
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{param}: {first.get('msg', 'invalid value')}{more}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _json_response(exc.status, exc.body(), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _json_response(400, error_body(message, type="invalid_request_error", param=param,
                                              code="invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message, code = f"no route {request.method} {request.url.path}", "not_found"
        elif exc.status_code == 405:
            message, code = f"method {request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _json_response(exc.status_code, error_body(message, type=kind, code=code), exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _json_response(500, error_body("internal server error", type="server_error",
                                              code="internal_error"))


async def require_json(request: Request) -> None:
    """POST bodies must be sent as ``Content-Type: application/json`` (or a ``+json`` type).

    ``async`` so that FastAPI runs it on the event loop, not via a worker thread per request."""
    value = request.headers.get("content-type")
    message = Message()
    message["content-type"] = value or ""
    subtype = message.get_content_subtype()
    if not value or message.get_content_maintype() != "application" or not (subtype == "json"
                                                                             or subtype.endswith("+json")):
        got = repr(value) if value else "none"
        raise APIError(400, f"Content-Type must be application/json; got {got}", code="invalid_content_type")


# ----------------------------------------------------------------------------- the app

def create_app(settings: ServerSettings | None = None, *, loader: Loader | None = None,
               on_fatal: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The app for ``settings`` (default: from ``DIFFPO_*`` variables).

    ``loader(settings) -> LoadedModel`` replaces the default :func:`load_from_settings` (tests
    inject slow or blocked loaders); ``on_fatal(exc)`` is called when loading fails (the CLI exits).
    """
    settings = (settings or ServerSettings.from_env()).validated()
    if settings.device == "auto":  # resolved once, here: the decoder process and /v1/models see the same device
        settings = replace(settings, device=resolve_device(settings.device))
        log.info("--device auto: %s", settings.device)
    metrics = ServerMetrics()
    runtime = ServerRuntime(settings, metrics, loader or load_from_settings, on_fatal)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await runtime.start()
        try:
            yield
        finally:
            await runtime.shutdown()

    app = FastAPI(title="diffpo-serve", summary="OpenAI-compatible API for masked diffusion LMs",
                  lifespan=lifespan)
    app.state.settings, app.state.metrics, app.state.runtime = settings, metrics, runtime
    install_error_handlers(app)
    app.add_middleware(Gate, settings=settings, metrics=metrics)
    app.add_middleware(Cors, settings=settings)  # added last: outside the Gate

    async def engine() -> Engine:  # async: resolved on the event loop, no worker-thread hop per request
        return runtime.require_engine()

    @app.post("/v1/completions", dependencies=[Depends(require_json)])
    async def completions(body: CompletionRequest, request: Request, engine: Engine = Depends(engine)):
        return await respond(engine.start_completion(body), bool(body.stream), request)

    @app.post("/v1/chat/completions", dependencies=[Depends(require_json)])
    async def chat_completions(body: ChatCompletionRequest, request: Request, engine: Engine = Depends(engine)):
        return await respond(engine.start_chat(body), bool(body.stream), request)

    @app.get("/v1/models")
    async def list_models(engine: Engine = Depends(engine)):
        return engine.models().model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, engine: Engine = Depends(engine)):
        return engine.model_card(model_id).model_dump()

    @app.get("/health")
    async def health():
        if runtime.status == "ready":
            return {"status": "ok", "model": runtime.engine.model_name}
        try:
            runtime.require_engine()
        except APIError as e:
            return _json_response(e.status, e.body(), e.headers)

    @app.get("/metrics")
    async def metrics_endpoint():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/", include_in_schema=False)
    @app.get("/playground", include_in_schema=False)
    async def playground():
        # the page itself is open (the Gate only guards /v1); it asks for the key when the API does
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})

    return app
