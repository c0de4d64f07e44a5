"""The ASGI app: routes, auth, request limits, and the one path every dialect's request takes.

One model is loaded at start-up (on a thread, so `/health` answers 503 until it is ready) and
pinned: a request names it or its alias, or gets a 404 (any name, with --answer-any-model). A
dialect (openai.py: chat completions, responses.py: the Responses API, anthropic.py: Messages)
turns its body into the neutral request; here its media are read (media.py) and the prompt
built by our processor off the event loop, the engine runs it, and the one reply parser turns
the engine's text into neutral events that the dialect renders, whole or streamed (SSE). A
client that goes away cancels its request at once; a request past the timeout is ended. What a
client reads never holds a traceback or a local path: those go to the log.
"""

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Mount, Route

from ..checkpoints.adapters import read_adapter
from ..errors import Glm4vError
from ..generation.grounding import as_json, find_marks
from ..generation.reply import ReplyParser
from ..inputs.image import load_image
from . import anthropic, openai, responses
from .media import MediaPolicy, resolve_media
from .metrics import Metrics
from .neutral import ApiError, Finish, Logprob, Meta, Served, bad

log = logging.getLogger("mlx_glm4v.server")

WEB_DIR = Path(__file__).resolve().parent / "web"  # the chat page, where it is shipped


@dataclass
class ServerConfig:
    model: str  # what --model named: a hub id or a local directory
    alias: Optional[str] = None  # the name clients use; default: the last part of `model`
    api_key: Optional[str] = None
    cors_origins: list = field(default_factory=list)
    max_body_bytes: int = 64 << 20
    max_prompt_tokens: Optional[int] = None  # default: the model's context length
    request_timeout: float = 600.0
    keepalive: float = 10.0  # seconds between SSE comment lines while nothing else is sent
    max_queue: int = 64
    max_concurrency: Optional[int] = None  # None: the engine's default (from free memory)
    max_stall_ms: float = 250.0  # prefill work one engine turn may do before running rows decode
    feature_cache_bytes: int = 2 << 30
    ui: bool = True
    media: MediaPolicy = field(default_factory=MediaPolicy)
    max_output_tokens: Optional[int] = None  # clamps every request's token limit
    # answer any model name with the served model (agents' side-task models)
    answer_any_model: bool = False
    store_count: int = 1000  # Responses kept for previous_response_id / GET, newest first
    store_bytes: int = 64 << 20
    adapter: Optional[str] = None  # an adapter directory applied to the model (--adapter)

    @property
    def name(self) -> str:
        """The name clients send: the alias, or the model's last part (and the adapter's: the
        adapter is part of what is served)."""
        if self.alias:
            return self.alias
        name = self.model.rstrip("/").split("/")[-1]
        if self.adapter:
            name += "+" + Path(self.adapter).expanduser().resolve().name
        return name


class State:
    """What the routes share: the config, and once loaded, the model, processor and engine."""

    def __init__(self, config: ServerConfig, group=None):
        self.config, self.group = config, group
        self.metrics = Metrics()
        self.engine = self.processor = None
        self.ready = threading.Event()
        self.names = {config.name, config.model}
        self.tools_supported = self.thinking_in_template = False
        self.max_prompt_tokens = config.max_prompt_tokens
        self.context = None  # the model's context length, once loaded
        self.store = responses.Store(config.store_count, config.store_bytes)
        self.served = None

    def identity(self) -> str:
        """What the model's outputs depend on: the checkpoint and the adapter's bytes (the prefix
        cache keys its entries by it)."""
        if self.config.adapter is None:
            return self.config.model
        return f"{self.config.model}+{read_adapter(self.config.adapter).digest}"

    def load(self, loader=None):
        """Load and pin the model (on a thread at start-up)."""
        from jinja2 import Environment, meta

        from ..checkpoints.loader import load
        from ..serving.engine import Engine

        # under mlx.launch: this rank's part; the other ranks follow this engine
        if self.group is not None:
            from ..serving.distributed import load as load_part

            model, processor, layout = load_part(self.config.model, self.group)
            log.info("%s", layout.describe())
        elif self.config.adapter is not None:
            model, processor = (loader or load)(self.config.model, adapter_path=self.config.adapter)
        else:
            model, processor = (loader or load)(self.config.model)
        self.metrics.instrument_vision(model)
        variables = meta.find_undeclared_variables(Environment().parse(processor.chat_template))
        self.tools_supported = "tools" in variables
        self.thinking_in_template = "</think>" in processor.chat_template
        self.context = model.config.text_config.max_position_embeddings
        if self.max_prompt_tokens is None:
            self.max_prompt_tokens = self.context
        self.processor = processor
        self.served = Served(
            self.config.name,
            self.names,
            self.tools_supported,
            self.thinking_in_template,
            "enable_thinking" in processor.chat_template,
            self.config.answer_any_model,
            self.store,
        )
        options = dict(
            max_queue=self.config.max_queue,
            max_concurrency=self.config.max_concurrency,
            feature_cache_bytes=self.config.feature_cache_bytes,
            max_stall_ms=self.config.max_stall_ms,
            identity=self.identity(),
        )
        if self.group is not None:
            from ..serving.lockstep import serving_engine

            self.engine = serving_engine(self.group, model, processor, **options)
        else:
            self.engine = Engine(model, processor, **options)
        self.ready.set()
        log.info("model %s loaded; serving it as %r", self.config.model, self.config.name)


def timeout_error(config: ServerConfig) -> ApiError:
    message = (
        f"the request ran past the server's limit of {config.request_timeout:g} s "
        "(--request-timeout)."
    )
    return ApiError(504, message, code="timeout")


def error_response(e: ApiError, dialect=openai) -> JSONResponse:
    return JSONResponse(dialect.error_body(e), status_code=e.status, headers=e.headers)


def dialect_of(path: str):
    """Whose error shape a path answers in, before its route runs (auth, body cap, unknown
    routes)."""
    return anthropic if path.startswith("/v1/messages") else openai


# ---- middleware ----------------------------------------------------------------------------------


class Guard:
    """Auth (bearer or x-api-key, constant-time) on the API and /metrics, and the request-body
    cap (413).

    /health and the static chat page stay open: a browser cannot send a key to load a page, and
    the page sends the key with its API calls.

    A plain ASGI middleware, so that streaming responses still learn when their client leaves.
    """

    def __init__(self, app, config: ServerConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        protected = scope["path"].startswith("/v1/") or scope["path"] == "/metrics"
        dialect = dialect_of(scope["path"])
        if self.config.api_key and protected and scope["method"] != "OPTIONS":
            key = self.config.api_key.encode()
            bearer = hmac.compare_digest(headers.get(b"authorization", b""), b"Bearer " + key)
            if not (bearer | hmac.compare_digest(headers.get(b"x-api-key", b""), key)):
                message = (
                    "the API key is missing or wrong (send Authorization: "
                    "Bearer <key> or x-api-key: <key>)."
                )
                e = ApiError(401, message, code="invalid_api_key")
                return await error_response(e, dialect)(scope, receive, send)
        limit = self.config.max_body_bytes
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await self._too_large(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _BodyTooLarge:
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope, receive, send):
        message = (
            f"the request body is over the limit of {self.config.max_body_bytes} bytes "
            "(--max-body-mb)."
        )
        e = ApiError(413, message, code="request_too_large")
        await error_response(e, dialect_of(scope["path"]))(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


# ---- routes --------------------------------------------------------------------------------------


def _state(request: Request) -> State:
    state = request.app.state.server
    if not state.ready.is_set():
        raise ApiError(
            503, "the model is still loading; try again shortly.", headers={"Retry-After": "5"}
        )
    return state


async def health(request: Request):
    state = request.app.state.server
    if not state.ready.is_set():
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ok"})


def _model_entry(name: str) -> dict:
    """One model as both SDKs read it: OpenAI's fields and Anthropic's."""
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "mlx-glm4v",
        "type": "model",
        "display_name": name,
        "created_at": "1970-01-01T00:00:00Z",
    }


async def models(request: Request):
    state = _state(request)
    name = state.config.name
    return JSONResponse(
        {
            "object": "list",
            "data": [_model_entry(name)],
            "has_more": False,
            "first_id": name,
            "last_id": name,
        }
    )


async def model(request: Request):
    """GET /v1/models/{name}: the served model (any name, with --answer-any-model)."""
    try:
        state, name = _state(request), request.path_params["name"]
        if name not in state.names and not state.config.answer_any_model:
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server runs {state.config.name!r}.",
                "model",
                "model_not_found",
            )
        return JSONResponse(_model_entry(name))
    except ApiError as e:
        return error_response(e, anthropic if "anthropic-version" in request.headers else openai)


async def metrics(request: Request):
    state = request.app.state.server
    return PlainTextResponse(state.metrics.render(state), media_type="text/plain; version=0.0.4")


async def _body(request: Request):
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise ApiError(400, "the client closed the connection while sending the request.") from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise bad("the request body is not valid JSON.") from None


def route(handler, dialect):
    """A route of `dialect`: its refusals in its own shape, counted by status."""

    async def endpoint(request: Request):
        state = request.app.state.server
        try:
            response = await handler(request, dialect)
        except ApiError as e:
            log.info("refused (%d): %s", e.status, e.message)
            response = error_response(e, dialect)
        state.metrics.responses[response.status_code] = (
            state.metrics.responses.get(response.status_code, 0) + 1
        )
        return response

    return endpoint


async def _prepared(ready: State, neutral) -> dict:
    try:  # reading media is bounded by the limits; the timeout still answers the client in time
        return await asyncio.wait_for(
            run_in_threadpool(_prepare, ready, neutral), ready.config.request_timeout
        )
    except asyncio.TimeoutError:
        raise timeout_error(ready.config) from None


async def _reply(request: Request, dialect):
    ready = _state(request)
    neutral = dialect.parse(await _body(request), ready.served)
    deadline = time.monotonic() + ready.config.request_timeout
    inputs = await _prepared(ready, neutral)
    n = int(inputs["input_ids"].shape[-1])
    settings = dict(neutral.settings)
    room = ready.context - n if settings.get("max_tokens") is None else settings["max_tokens"]
    if room < 1:  # only with --max-prompt-tokens over the context: no limit asked, none left
        raise bad(
            f"the prompt is {n} tokens and fills the model's context of {ready.context}; give a "
            "token limit or a shorter prompt.",
            "messages",
            "context_length_exceeded",
        )
    if ready.config.max_output_tokens:
        room = min(room, ready.config.max_output_tokens)
    settings["max_tokens"] = max(1, room)

    from ..generation.settings import GenerationSettings
    from ..serving.engine import QueueFull
    from ..serving.engine import Request as EngineRequest

    try:
        handle = ready.engine.submit(
            EngineRequest(
                inputs, GenerationSettings(**settings), neutral.seed, neutral.top_logprobs
            )
        )
    except QueueFull as e:
        raise ApiError(
            429, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after)}
        ) from None
    meta = Meta(dialect.reply_id(), int(time.time()), ready.config.name, n, ready.served)
    run = Run(ready, neutral, settings, handle, deadline, meta)
    if neutral.stream:
        return StreamingResponse(
            run.stream(dialect.Stream(neutral, meta)),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return JSONResponse(dialect.whole(neutral, await run.whole(request), meta))


async def count_tokens(request: Request, dialect):
    """Anthropic's POST /v1/messages/count_tokens: the prompt as it would run, counted."""
    ready = _state(request)
    inputs = await _prepared(
        ready, dialect.parse(await _body(request), ready.served, counting=True)
    )
    return JSONResponse({"input_tokens": int(inputs["input_ids"].shape[-1])})


async def stored_response(request: Request, dialect):
    """GET or DELETE /v1/responses/{id}: a stored Responses reply."""
    store, rid = _state(request).store, request.path_params["rid"]
    if request.method == "DELETE":
        return JSONResponse(dialect.delete(store, rid))
    return JSONResponse(dialect.retrieve(store, rid))


def _prepare(state: State, neutral) -> dict:
    """Media read and checked, the template rendered, the processor run: the engine's inputs."""
    processor, config = state.processor, state.config
    messages, resolved = resolve_media(neutral.messages, config.media, processor)
    try:
        kwargs = dict(neutral.template_kwargs)
        if neutral.tools:
            kwargs.update(tools=neutral.tools, tool_choice=neutral.tool_choice)
        inputs = processor.process_messages(messages, kwargs)
        neutral.image_sizes = [
            getattr(i, "info", {}).get("original_size") or load_image(i).shape[1::-1]
            for i in processor.media_from_messages(messages)[0]
        ]
    except Glm4vError as e:
        hide = [p for p in (resolved.dir and resolved.dir.name, config.media.media_root) if p]
        message = str(e)
        for path in hide:
            message = message.replace(str(Path(path).resolve()), "<media>").replace(
                str(path), "<media>"
            )
        raise bad(message, "messages") from None
    finally:
        resolved.close()
    n = int(inputs["input_ids"].shape[-1])
    if n > state.max_prompt_tokens:
        raise bad(
            f"the prompt is {n} tokens, "
            f"over the limit of {state.max_prompt_tokens} (--max-prompt-tokens).",
            "messages",
            "context_length_exceeded",
        )
    return inputs


class Run:
    """One request on the engine: its events as neutral events (the one reply parser), whole or
    streamed."""

    def __init__(self, state: State, neutral, settings: dict, handle, deadline: float, meta: Meta):
        self.state, self.neutral, self.handle, self.meta = state, neutral, handle, meta
        self.deadline = deadline
        eos = set(state.engine.model.config.eos_token_id)
        self.skip_logprob = eos if not settings.get("ignore_eos") else set()
        self.decode = lambda t: state.processor.tokenizer.decode([t])
        self.parser, self.text, self.reasoning_tokens = ReplyParser(neutral.tools), [], 0

    def logprob(self, event):
        if self.neutral.top_logprobs is None or event.token is None or event.logprob is None:
            return None
        if event.finish_reason == "stop" and event.token in self.skip_logprob:
            return None
        return openai.logprob_entry(self.decode, event.token, event.logprob, event.top_logprobs)

    def convert(self, event) -> list:
        """One engine event -> neutral events: its log-probability, the parser's events, the
        finish."""
        out = []
        if (entry := self.logprob(event)) is not None:
            out.append(Logprob(entry))
        self.text.append(event.text)
        thinking = self.parser.splitter.thinking
        out += self.parser.feed(event.text)
        if event.token is not None and (thinking or self.parser.splitter.thinking):
            self.reasoning_tokens += 1
        if event.finish_reason is None:
            return out
        out += self.parser.finish()
        reason = event.finish_reason
        if self.parser.calls and reason == "stop":
            reason = "tool_calls"
        boxes = as_json(find_marks("".join(self.text)).marks, self.neutral.image_sizes)
        return out + [Finish(reason, event.usage, event.stop, boxes, self.reasoning_tokens)]

    async def events(self, tick: float):
        """The handle's events, and None after each `tick` seconds without one; the request is
        ended at the deadline, and cancelled if the reader stops early."""
        iterator = self.handle.__aiter__()
        pending = None
        finished = False
        self.state.metrics.running += 1
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(iterator.__anext__())
                left = self.deadline - time.monotonic()
                done, _ = await asyncio.wait({pending}, timeout=max(0.0, min(tick, left)))
                if not done:
                    if time.monotonic() >= self.deadline:
                        raise timeout_error(self.state.config)
                    yield None
                    continue
                event = pending.result()
                pending = None
                if event.finish_reason == "error":
                    finished = True
                    raise ApiError(
                        500, event.error or "generation failed.", code="generation_error"
                    )
                yield event
                if event.finish_reason is not None:
                    finished = True
                    u = event.usage
                    log.info(
                        "%s %s: %d prompt tokens (%d cached), %d generated, "
                        "first token after %.3f s",
                        self.meta.id,
                        event.finish_reason,
                        u.prompt_tokens,
                        u.cached_tokens,
                        u.completion_tokens,
                        u.time_to_first_token,
                    )
                    return
        finally:
            self.state.metrics.running -= 1
            if not finished:
                self.handle.cancel()
            if pending is not None and not pending.done():
                pending.cancel()

    async def whole(self, request: Request) -> list:
        """The reply's neutral events, all of them."""

        async def watch():  # a non-streamed request learns of its client leaving by asking
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)
            self.handle.cancel()

        watcher = asyncio.ensure_future(watch())
        events = []
        try:
            async for event in self.events(tick=self.state.config.keepalive):
                if event is not None:
                    events += self.convert(event)
        finally:
            watcher.cancel()
        if events[-1].reason == "cancelled":
            raise ApiError(499, "the request was cancelled.")
        return events

    async def stream(self, renderer):
        for line in renderer.head():
            yield line
        try:
            async for event in self.events(tick=self.state.config.keepalive):
                if event is None:
                    yield renderer.keepalive()
                    continue
                if event.finish_reason == "cancelled":
                    return
                for line in renderer.feed(self.convert(event)):
                    yield line
        except ApiError as e:  # after the headers went out, an error travels as an event
            log.warning("streamed request %s ended: %s", self.meta.id, e.message)
            for line in renderer.fail(e):
                yield line
        for line in renderer.tail():
            yield line


# ---- the app ------------------------------------------------------------------------------------


async def _http_error(request: Request, exc: HTTPException):
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = {
        404: f"no route {request.url.path}.",
        405: f"{request.method} is not allowed on {request.url.path}.",
    }
    e = ApiError(
        exc.status_code,
        message.get(exc.status_code, str(exc.detail)),
        code=codes.get(exc.status_code),
    )
    return error_response(e, dialect_of(request.url.path))


async def _server_error(request: Request, exc: Exception):
    log.exception("request %s %s failed", request.method, request.url.path)
    e = ApiError(500, "the server failed on this request; its log has the details.")
    return error_response(e, dialect_of(request.url.path))


def create_app(config: ServerConfig, loader=None, group=None) -> Starlette:
    """The app; the model loads on a thread at start-up (`loader(model)` -> (model, processor));
    under mlx.launch (`group`, on rank 0) its engine leads the other ranks'."""
    state = State(config, group)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        def load():
            try:
                state.load(loader)
            except Exception as e:  # the process cannot serve: say why and stop
                log.error(
                    "could not load %s: %s", config.model, e, exc_info=not isinstance(e, Glm4vError)
                )
                app.state.failed = True
                stop = getattr(app.state, "stop", None)
                if stop is not None:
                    stop()

        threading.Thread(target=load, name="mlx-glm4v-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.close()

    routes = [
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/models", models),
        Route("/v1/models/{name:path}", model),
        Route("/v1/chat/completions", route(_reply, openai), methods=["POST"]),
        Route("/v1/responses", route(_reply, responses), methods=["POST"]),
        Route("/v1/responses/{rid}", route(stored_response, responses), methods=["GET", "DELETE"]),
        Route("/v1/messages", route(_reply, anthropic), methods=["POST"]),
        Route("/v1/messages/count_tokens", route(count_tokens, anthropic), methods=["POST"]),
    ]
    if config.ui and WEB_DIR.is_dir():  # the chat page, when the package ships one
        from starlette.staticfiles import StaticFiles

        routes.append(Mount("/", StaticFiles(directory=WEB_DIR, html=True), name="ui"))
    middleware = [Middleware(Guard, config=config)]
    if config.cors_origins:
        middleware.insert(
            0,
            Middleware(
                CORSMiddleware,
                allow_origins=config.cors_origins,
                allow_methods=["*"],
                allow_headers=["*"],
            ),
        )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    app.state.server = state
    app.state.failed = False
    return app


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_bind(host: str, api_key: Optional[str], insecure_no_auth: bool):
    """A server reachable from other machines needs a key, or an explicit choice to run without
    one."""
    import ipaddress

    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host in LOOPBACK
    if not loopback and not api_key and not insecure_no_auth:
        raise Glm4vError(
            f"--host {host} would let other machines use the server without a key: set --api-key "
            "(or MLX_GLM4V_API_KEY), or pass --insecure-no-auth to run it open."
        )


def serve(
    config: ServerConfig,
    host: str = "127.0.0.1",
    port: int = 8080,
    insecure_no_auth: bool = False,
    log_level: str = "info",
    group=None,
):
    """Run the server until interrupted (under mlx.launch, on rank 0: `group`)."""
    import uvicorn

    check_bind(host, config.api_key, insecure_no_auth)
    if config.media.media_root is not None and not config.media.media_root.is_dir():
        raise Glm4vError(f"--media-root {config.media.media_root}: no such directory.")
    from ..checkpoints.loader import resolve

    if Path(config.model).expanduser().exists() or config.model.count("/") != 1:
        # a wrong local path fails now; a hub download happens while /health says 503
        resolve(config.model)
    if config.adapter is not None:  # a wrong adapter directory fails now, before listening
        read_adapter(config.adapter)
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    app = create_app(config, group=group)
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=30)
    )
    app.state.stop = lambda: setattr(server, "should_exit", True)
    server.run()
    if app.state.failed:
        raise Glm4vError(f"the model {config.model} could not be loaded; see the log above.")
