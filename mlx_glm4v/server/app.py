"""The ASGI app: routes, auth, request limits, and the one path every dialect's request takes.

The models live in a registry (serving/registry.py, server/models.py): one `--model` is loaded
at start-up (on a thread, so `/health` answers 503 until it is ready) and pinned; with several,
each loads on its first request and unloads when idle, within a memory budget. A request names
a model or its alias, or gets a 404 (any name goes to the first model, with --answer-any-model). A
dialect (openai.py: chat completions, responses.py: the Responses API, anthropic.py: Messages)
turns its body into the neutral request; here its media are read (media.py) and the prompt
built by our processor off the event loop, the engine runs it, and the one reply parser turns
the engine's text into neutral events that the dialect renders, whole or streamed (SSE). A
client that goes away cancels its request at once; a request past the timeout is ended. What a
client reads never holds a traceback or a local path: those go to the log.
"""

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import uvicorn
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
from ..serving.registry import DEFAULT_KEEP_ALIVE, ModelSpec, NoRoom, Registry, default_name
from . import anthropic, layout_parsing, ollama, openai, responses
from .drain import RETRY_AFTER, Drain
from .media import MediaPolicy, processor_budget, resolve_media
from .metrics import Metrics
from .models import Lease, Slot, model_entry, ps, tags
from .neutral import ApiError, Finish, Logprob, Meta, Served, bad, check_model, use_key_in

log = logging.getLogger("mlx_glm4v.server")

WEB_DIR = Path(__file__).resolve().parent / "web"  # the chat page, where it is shipped


def draft_settings(asked: Optional[tuple], default: Optional[tuple], slot) -> dict:
    """GenerationSettings' drafting keywords for a request: what it asked (`draft`,
    `draft_steps`), else the server's default (MTP only for a model with the layer); a 400
    naming the field for MTP on a model without it or across several Macs."""
    kind, steps = asked or default or ("none", None)
    if kind == "mtp" and "mtp" not in slot.model:
        if asked is None:
            return {}
        raise bad(
            f"draft: mtp needs a model with a multi-token-prediction layer (GLM-OCR's); "
            f"{slot.name} has none.",
            "draft",
        )
    if kind != "none" and slot.engine.link is not None:
        if asked is None:
            return {}
        raise bad("draft is not run across several Macs (mlx.launch); leave it out.", "draft")
    if kind == "mtp":
        return {"draft": "mtp", **({"draft_steps": steps} if steps else {})}
    if kind == "prompt_lookup":
        return {"prompt_lookup": steps or DEFAULT_LOOKUP}
    return {}


DEFAULT_LOOKUP = 3  # prompt lookup's drafts a pass when the request gives no draft_steps


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
    drain_timeout: float = 30.0  # seconds running requests get to finish after SIGTERM
    adapter: Optional[str] = None  # an adapter directory applied to the model (--adapter)
    # the prefix cache's disk tier (and the sealing key's home), its cap, prompts run at start-up
    prompt_cache_dir: Optional[Path] = None
    prompt_cache_bytes: int = 4 << 30
    warm_prompts: list = field(default_factory=list)  # parsed --warm-prompt files
    # several models (registry.ModelSpec); empty: `model` alone, loaded at start and pinned
    models: list = field(default_factory=list)
    # seconds an idle model stays loaded (None: 5 minutes; given, one --model is not pinned)
    keep_alive: Optional[float] = None
    max_memory_bytes: Optional[int] = None  # the models' budget (None: registry.default_budget)
    # speculative drafts when a request names none (serve --draft): ("mtp", steps), for the
    # models with a multi-token-prediction layer, or ("prompt_lookup", steps)
    draft: Optional[tuple] = None
    layout_model: Optional[str] = None  # PP-DocLayoutV3 for /v1/layout_parsing (--layout-model)

    @property
    def name(self) -> str:
        """The name clients send: the alias, or the model's last part (and the adapter's: the
        adapter is part of what is served)."""
        return self.alias or default_name(self.model, self.adapter)

    def specs(self) -> list:
        if self.models:
            return self.models
        pin = self.keep_alive is None
        return [ModelSpec(self.name, self.model, pin=pin, adapter=self.adapter)]


class State:
    """What the routes share: the config, the models' registry (once built), the Responses
    store, the drain."""

    def __init__(self, config: ServerConfig, group=None):
        self.config, self.group = config, group
        self.metrics = Metrics()
        self.registry = None
        self.layout = None  # the layout detector of /v1/layout_parsing (--layout-model)
        self.ready = threading.Event()
        self.specs = config.specs()
        self.store = responses.Store(config.store_count, config.store_bytes)
        # what a request naming no model, or an unknown one, is checked against
        names = set().union(*(s.names for s in self.specs))
        self.served = Served(self.specs[0].name, names, answer_any_model=config.answer_any_model)
        self.drain = Drain(config.drain_timeout)
        self.started = datetime.now(timezone.utc)

    def engines(self) -> list:
        return [e.loaded.engine for e in self.registry.loaded()] if self.registry else []

    def flush(self):
        """Every loaded model's disk-tier writes (the drain's last step)."""
        for engine in self.engines():
            engine.flush()

    def load(self, loader=None):
        """Build the registry and load the pinned models (on a thread at start-up)."""
        from ..checkpoints.loader import resolve

        if self.config.layout_model is not None:
            from ..documents.layout import load_layout

            self.layout = load_layout(self.config.layout_model)
        keep = DEFAULT_KEEP_ALIVE if self.config.keep_alive is None else self.config.keep_alive
        self.registry = Registry(
            self.specs,
            functools.partial(self._load, loader),
            resolve,
            self.config.max_memory_bytes,
            keep,
        )
        for spec in self.specs:
            if spec.pin:
                self.registry.release(self.registry.acquire(spec.name))
        for i, body in enumerate(self.config.warm_prompts):
            self.warm(body, i)
        self.drain.flushers.append(self.flush)
        self.ready.set()

    def _load(self, loader, spec: ModelSpec, directory) -> Slot:
        """One model, its processor and its engine (under mlx.launch: this rank's part, the
        other ranks following this engine)."""
        from ..checkpoints.loader import load
        from ..serving.engine import Engine

        if self.group is not None:
            from ..serving.distributed import load as load_part

            model, processor, layout = load_part(spec.path, self.group)
            log.info("%s", layout.describe())
        elif spec.adapter is not None:
            model, processor = (loader or load)(spec.path, adapter_path=spec.adapter)
        else:
            model, processor = (loader or load)(spec.path)
        self.metrics.instrument_vision(model)
        options = dict(
            prompt_cache=self.prompt_cache(model, spec),
            max_queue=self.config.max_queue,
            max_concurrency=self.config.max_concurrency,
            feature_cache_bytes=self.config.feature_cache_bytes,
            max_stall_ms=self.config.max_stall_ms,
            identity=identity(spec),
        )
        if self.group is not None:
            from ..serving.lockstep import serving_engine

            engine = serving_engine(self.group, model, processor, **options)
        else:
            engine = Engine(model, processor, **options)
        log.info("model %s loaded; serving it as %r", spec.path, spec.name)
        return Slot(spec, model, processor, engine, self.config, self.store)

    async def hold(self, body, key: str = "model") -> Lease:
        """The model a request names, loaded if it is not (off the event loop) and held until
        the lease is given back; a name no model has is refused as the dialects refuse it."""
        registry = self.registry
        name = body.get(key) if isinstance(body, dict) else None
        entry = registry.find(name) if isinstance(name, str) else None
        if entry is None:
            first = registry.entries[self.specs[0].name]
            several = len(self.specs) > 1
            if several and not isinstance(body, dict):
                raise bad("the request body must be a JSON object.")
            if several and not (isinstance(name, str) and self.config.answer_any_model):
                if not isinstance(name, str) or not name:
                    check_model(name, self.served, key)  # the 400 every dialect gives
                listed = ", ".join(repr(s.name) for s in self.specs)
                raise ApiError(
                    404,
                    f"the model {name!r} does not exist; this server runs {listed}.",
                    key,
                    "model_not_found",
                )
            entry = first  # one model checks the name as before (or any name is answered)
        try:
            entry = await run_in_threadpool(registry.acquire, entry.spec.name)
        except NoRoom as e:
            raise ApiError(
                503, str(e), code="no_memory", headers={"Retry-After": str(e.retry_after)}
            ) from None
        except Glm4vError as e:
            log.error("could not load %s: %s", entry.spec.path, e)
            raise ApiError(
                500, f"the model {entry.spec.name!r} could not be loaded; the log says why."
            ) from None
        return Lease(registry, entry)

    def prompt_cache(self, model, spec: ModelSpec):
        """The disk tier for this model and the engine's settings, or None."""
        from ..checkpoints.loader import resolve
        from ..serving.disk_cache import CacheKey, DiskCache
        from ..serving.engine import PREFILL_CHUNK

        if self.config.prompt_cache_dir is None:
            return None
        if self.group is not None:
            log.warning("--prompt-cache-dir is not used under mlx.launch: each rank holds a part")
            return None
        adapter = read_adapter(spec.adapter).digest if spec.adapter else ""
        key = CacheKey.of(model, resolve(spec.path), PREFILL_CHUNK, adapter=adapter)
        return DiskCache(self.config.prompt_cache_dir, self.config.prompt_cache_bytes, key)

    def warm(self, body: dict, i: int):
        """Prefill a --warm-prompt (its prompt kept like any other) on the first model, loaded
        for it if it is not pinned, before serving."""
        from ..generation.settings import GenerationSettings
        from ..serving.engine import Request as EngineRequest

        started = time.monotonic()
        entry = self.registry.acquire(self.specs[0].name)
        try:
            slot = entry.loaded
            try:
                neutral = openai.parse({**body, "model": slot.name}, slot.served)
                inputs = _prepare(slot, self.config, neutral)
            except ApiError as e:
                raise Glm4vError(f"--warm-prompt number {i + 1} is refused: {e.message}") from None
            settings = GenerationSettings(**{**neutral.settings, "max_tokens": 1})
            for event in slot.engine.submit(EngineRequest(inputs, settings)):
                if event.finish_reason is not None:
                    usage = event.usage
        finally:
            self.registry.release(entry)
        log.info(
            "warm prompt %d: %d tokens (%d from the cache) in %.1f s",
            i + 1,
            usage.prompt_tokens,
            usage.cached_tokens,
            time.monotonic() - started,
        )


def identity(spec: ModelSpec) -> str:
    """What a model's outputs depend on: the checkpoint and the adapter's bytes (the prefix
    cache keys its entries by it)."""
    if spec.adapter is None:
        return spec.path
    return f"{spec.path}+{read_adapter(spec.adapter).digest}"


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
    routes, a drain)."""
    if path.startswith("/api/"):
        return ollama
    if path.startswith("/v1/responses"):
        return responses
    if path == "/v1/layout_parsing":
        return layout_parsing
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
        api = scope["path"].startswith(("/v1/", "/api/"))
        protected = api or scope["path"] == "/metrics"
        dialect = dialect_of(scope["path"])
        drain = scope["app"].state.server.drain
        if api and drain.draining and scope["method"] != "OPTIONS":
            e = ApiError(
                503,
                "the server is shutting down; send the request again shortly.",
                code="shutting_down",
                headers={"Retry-After": RETRY_AFTER},
            )
            return await error_response(e, dialect)(scope, receive, send)
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

        drain.active += api
        try:
            await self.app(scope, counted, send)
        except _BodyTooLarge:
            await self._too_large(scope, receive, send)
        finally:
            drain.active -= api

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
    if state.drain.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not state.ready.is_set():
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def models(request: Request):
    """GET /v1/models: every model the server may run (`loaded`: whether it is in memory)."""
    state = _state(request)
    loaded = {e.spec.name for e in state.registry.loaded()}
    names = [s.name for s in state.specs]
    return JSONResponse(
        {
            "object": "list",
            "data": [model_entry(name, name in loaded) for name in names],
            "has_more": False,
            "first_id": names[0],
            "last_id": names[-1],
        }
    )


async def model(request: Request):
    """GET /v1/models/{name}: one model (any name, with --answer-any-model)."""
    try:
        state, name = _state(request), request.path_params["name"]
        entry = state.registry.find(name)
        if entry is None and not state.config.answer_any_model:
            listed = ", ".join(repr(s.name) for s in state.specs)
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server runs {listed}.",
                "model",
                "model_not_found",
            )
        return JSONResponse(model_entry(name, entry is None or entry.loaded is not None))
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


async def _prepared(slot: Slot, config: ServerConfig, neutral) -> dict:
    try:  # reading media is bounded by the limits; the timeout still answers the client in time
        return await asyncio.wait_for(
            run_in_threadpool(_prepare, slot, config, neutral), config.request_timeout
        )
    except asyncio.TimeoutError:
        raise timeout_error(config) from None


async def _reply(request: Request, dialect, parse=None):
    """A dialect's request, run on the model it names while that model is held."""
    ready = _state(request)
    body = await _body(request)
    lease = await ready.hold(body)
    try:
        response = await _run(request, dialect, parse or dialect.parse, ready, lease, body)
    except BaseException:
        lease.release()
        raise
    if isinstance(response, StreamingResponse):  # held until the stream ends
        response.body_iterator = lease.held_by(response.body_iterator)
    else:
        lease.release()
    return response


async def _run(request: Request, dialect, parse, ready: State, lease: Lease, body):
    slot, config = lease.slot, ready.config
    neutral = parse(body, slot.served)
    lease.keep_alive = neutral.keep_alive
    if not neutral.messages:  # Ollama's way to load a model: nothing to run
        meta = Meta(dialect.reply_id(), int(time.time()), slot.name, 0, slot.served)
        return JSONResponse(dialect.loaded(neutral, meta))
    deadline = time.monotonic() + config.request_timeout
    inputs = await _prepared(slot, config, neutral)
    n = int(inputs["input_ids"].shape[-1])
    settings = dict(neutral.settings)
    if slot.spec.kv_bits is not None and settings.get("kv_bits") is None:
        settings["kv_bits"] = slot.spec.kv_bits
    context = min(slot.context, neutral.context or slot.context)
    if neutral.context and n >= context:
        raise bad(
            f"the prompt is {n} tokens, over the context of {context} the request allows "
            "(options.num_ctx).",
            "options.num_ctx",
            "context_length_exceeded",
        )
    room = context - n if settings.get("max_tokens") is None else settings["max_tokens"]
    if room < 1:  # only with --max-prompt-tokens over the context: no limit asked, none left
        raise bad(
            f"the prompt is {n} tokens and fills the model's context of {slot.context}; give a "
            "token limit or a shorter prompt.",
            "messages",
            "context_length_exceeded",
        )
    if neutral.context:
        room = min(room, context - n)
    if config.max_output_tokens:
        room = min(room, config.max_output_tokens)
    settings["max_tokens"] = max(1, room)
    settings.update(draft_settings(neutral.draft, config.draft, slot))

    from ..generation.settings import GenerationSettings
    from ..serving.engine import QueueFull
    from ..serving.engine import Request as EngineRequest

    try:
        handle = slot.engine.submit(
            EngineRequest(
                inputs, GenerationSettings(**settings), neutral.seed, neutral.top_logprobs
            )
        )
    except QueueFull as e:
        raise ApiError(
            429, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after)}
        ) from None
    meta = Meta(dialect.reply_id(), int(time.time()), slot.name, n, slot.served)
    run = Run(ready, slot, neutral, settings, handle, deadline, meta)
    if neutral.stream:
        return StreamingResponse(
            run.stream(dialect.Stream(neutral, meta)),
            media_type=getattr(dialect, "MEDIA_TYPE", "text/event-stream"),
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return JSONResponse(dialect.whole(neutral, await run.whole(request), meta))


async def count_tokens(request: Request, dialect):
    """Anthropic's POST /v1/messages/count_tokens: the prompt as it would run, counted."""
    ready = _state(request)
    body = await _body(request)
    lease = await ready.hold(body)
    try:
        slot = lease.slot
        neutral = dialect.parse(body, slot.served, counting=True)
        inputs = await _prepared(slot, ready.config, neutral)
    finally:
        lease.release()
    return JSONResponse({"input_tokens": int(inputs["input_ids"].shape[-1])})


async def stored_response(request: Request, dialect):
    """GET or DELETE /v1/responses/{id}: a stored Responses reply."""
    store, rid = _state(request).store, request.path_params["rid"]
    if request.method == "DELETE":
        return JSONResponse(dialect.delete(store, rid))
    return JSONResponse(dialect.retrieve(store, rid))


# ---- Ollama's descriptions of the model ---------------------------------------------------------


async def layout_parse(request: Request, dialect):
    """The GLM-OCR pipeline on one document (layout_parsing.py), through the engine of the model
    the request names (the first model when it names none)."""
    state = _state(request)
    if state.layout is None:
        raise layout_parsing.unavailable()
    body = await _body(request)
    lease = await state.hold(body)
    try:
        slot = lease.slot
        data, settings, request_id = await run_in_threadpool(
            layout_parsing.parse,
            body,
            slot.served,
            state.config.media,
            slot.processor,
            state.config.max_output_tokens,
        )
        readers = []
        work = run_in_threadpool(
            layout_parsing.read,
            data,
            settings,
            slot.engine,
            slot.processor,
            state.layout,
            readers.append,
        )
        try:
            document = await asyncio.wait_for(work, state.config.request_timeout)
        except asyncio.TimeoutError:
            for reader in readers:
                reader.cancel()
            raise timeout_error(state.config) from None
        except asyncio.CancelledError:  # the client left
            for reader in readers:
                reader.cancel()
            raise
    finally:
        lease.release()
    if not document.pages:  # the whole document failed before any page
        raise bad(document.errors[0] if document.errors else "file: no pages were read.", "file")
    return JSONResponse(layout_parsing.response(document, slot.name, request_id))


def ollama_route(handler):
    """An Ollama GET/POST that describes the served model, its refusals in Ollama's shape."""

    async def endpoint(request: Request):
        try:
            return JSONResponse(await handler(request))
        except ApiError as e:
            return error_response(e, ollama)

    return endpoint


async def ollama_version(request: Request):
    return {"version": ollama.VERSION}


async def ollama_tags(request: Request):
    state = _state(request)
    return {"models": tags(state.registry, state.started)}


async def ollama_ps(request: Request):
    return {"models": ps(_state(request).registry)}


async def ollama_show(request: Request):
    state = _state(request)
    body = await _body(request)
    name = ollama.show_name(body)
    lease = await state.hold({"model": name})
    try:
        slot = lease.slot
        check_model(name, slot.served)
        return ollama.show(name, slot.model, slot.processor, slot.served, state.started)
    finally:
        lease.release()


def _prepare(slot: Slot, config: ServerConfig, neutral) -> dict:
    """Media read and checked, the template rendered, the processor run: the engine's inputs."""
    processor = slot.processor
    media_kwargs = processor_budget(neutral.media_budget, config.media, processor)
    messages, resolved = resolve_media(
        neutral.messages, config.media, processor, neutral.media_budget
    )
    try:
        kwargs = dict(neutral.template_kwargs)
        if neutral.tools:
            kwargs.update(tools=neutral.tools, tool_choice=neutral.tool_choice)
        inputs = processor.process_messages(messages, kwargs, media_kwargs)
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
    if n > slot.max_prompt_tokens:
        raise bad(
            f"the prompt is {n} tokens, "
            f"over the limit of {slot.max_prompt_tokens} (--max-prompt-tokens).",
            "messages",
            "context_length_exceeded",
        )
    return inputs


class Run:
    """One request on the engine: its events as neutral events (the one reply parser), whole or
    streamed."""

    def __init__(
        self, state: State, slot: Slot, neutral, settings: dict, handle, deadline: float, meta: Meta
    ):
        self.state, self.neutral, self.handle, self.meta = state, neutral, handle, meta
        self.deadline = deadline
        eos = set(slot.engine.model.config.eos_token_id)
        self.skip_logprob = eos if not settings.get("ignore_eos") else set()
        tokenizer = slot.processor.tokenizer
        self.decode = lambda t: tokenizer.decode([t])
        self.parser, self.text, self.reasoning_tokens = ReplyParser(neutral.tools), [], 0
        self.was_cut = False

    def cut(self):
        """End the run at the drain's deadline: its client is told (an error, not a finish)."""
        self.was_cut = True
        self.handle.cancel()

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
        self.state.drain.runs.add(self)
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
                if event.finish_reason == "cancelled" and self.was_cut:
                    finished = True
                    raise ApiError(
                        503,
                        "the server shut down before this reply was finished (--drain-timeout); "
                        "send the request again.",
                        code="shutting_down",
                        headers={"Retry-After": RETRY_AFTER},
                    )
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
            self.state.drain.runs.discard(self)
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
                    if line := renderer.keepalive():
                        yield line
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
    if config.prompt_cache_dir is not None:  # reasoning sealed before a restart opens after it
        use_key_in(config.prompt_cache_dir)

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

        state.drain.loop = asyncio.get_running_loop()
        threading.Thread(target=load, name="mlx-glm4v-load", daemon=True).start()
        yield
        if state.registry is not None:
            state.registry.close()

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
        Route("/v1/layout_parsing", route(layout_parse, layout_parsing), methods=["POST"]),
        Route("/api/chat", route(_reply, ollama), methods=["POST"]),
        Route(
            "/api/generate",
            route(functools.partial(_reply, parse=ollama.parse_generate), ollama),
            methods=["POST"],
        ),
        Route("/api/tags", ollama_route(ollama_tags)),
        Route("/api/show", ollama_route(ollama_show), methods=["POST"]),
        Route("/api/ps", ollama_route(ollama_ps)),
        Route("/api/version", ollama_route(ollama_version)),
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


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first SIGTERM or Ctrl-C drains (drain.py) before it exits; a second
    one is uvicorn's own shutdown. The signal is handled, not re-raised: the process exits 0."""

    def __init__(self, config: uvicorn.Config, drain: Drain):
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig, frame):
        if self.should_exit or not self.drain.begin(lambda: setattr(self, "should_exit", True)):
            super().handle_exit(sig, frame)


def serve(
    config: ServerConfig,
    host: str = "127.0.0.1",
    port: int = 8080,
    insecure_no_auth: bool = False,
    log_level: str = "info",
    group=None,
):
    """Run the server until interrupted (under mlx.launch, on rank 0: `group`)."""
    check_bind(host, config.api_key, insecure_no_auth)
    if config.media.media_root is not None and not config.media.media_root.is_dir():
        raise Glm4vError(f"--media-root {config.media.media_root}: no such directory.")
    from ..checkpoints.loader import resolve

    for spec in config.specs():
        if Path(spec.path).expanduser().exists() or spec.path.count("/") != 1:
            # a wrong local path fails now; a hub download happens when the model loads
            resolve(spec.path)
        if spec.adapter is not None:  # a wrong adapter directory fails now, before listening
            read_adapter(spec.adapter)
    if config.layout_model is not None:
        if group is not None:
            raise Glm4vError("--layout-model is not served under mlx.launch (one process reads).")
        if Path(config.layout_model).expanduser().exists() or config.layout_model.count("/") != 1:
            resolve(config.layout_model)
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    app = create_app(config, group=group)
    server = DrainingServer(
        uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=30),
        app.state.server.drain,
    )
    app.state.stop = lambda: setattr(server, "should_exit", True)
    server.run()
    if app.state.failed:
        raise Glm4vError(f"the model {config.model} could not be loaded; see the log above.")
