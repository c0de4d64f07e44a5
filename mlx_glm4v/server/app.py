"""The ASGI app put together: the routes (routes.py, and run.py's one path for the dialects'
replies), the middleware (middleware.py), errors in the path's dialect, the start-up load on a
thread (state.py); and `serve`, which checks what it can before listening and drains on SIGTERM.

The models live in a registry (serving/registry.py, server/models.py): one `--model` is loaded
at start-up (on a thread, so `/health` answers 503 until it is ready) and pinned; with several,
each loads on its first request and unloads when idle, within a memory budget. A request names
a model or its alias, or gets a 404 (any name goes to the first model, with --answer-any-model). A
dialect (openai.py: chat completions, responses.py: the Responses API, anthropic.py: Messages)
turns its body into the neutral request; run.py reads its media (media.py) and builds the prompt
with our processor off the event loop, the engine runs it, and the one reply parser turns the
engine's text into neutral events that the dialect renders, whole or streamed (SSE). A client
that goes away cancels its request at once; a request past the timeout is ended. What a client
reads never holds a traceback or a local path: those go to the log.
"""

import asyncio
import contextlib
import functools
import logging
import threading
from pathlib import Path
from typing import Optional

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.routing import Mount, Route

from ..checkpoints.adapters import read_adapter
from ..errors import Glm4vError
from . import anthropic, layout_parsing, ollama, openai, responses
from .drain import Drain
from .middleware import Guard, dialect_of, error_response
from .neutral import ApiError, use_key_in
from .routes import (
    count_tokens,
    health,
    layout_parse,
    metrics,
    model,
    models,
    ollama_ps,
    ollama_route,
    ollama_show,
    ollama_tags,
    ollama_version,
    route,
    stored_response,
)
from .run import reply
from .state import ServerConfig, State

log = logging.getLogger("mlx_glm4v.server")

WEB_DIR = Path(__file__).resolve().parent / "web"  # the chat page, where it is shipped


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
        Route("/v1/chat/completions", route(reply, openai), methods=["POST"]),
        Route("/v1/responses", route(reply, responses), methods=["POST"]),
        Route("/v1/responses/{rid}", route(stored_response, responses), methods=["GET", "DELETE"]),
        Route("/v1/messages", route(reply, anthropic), methods=["POST"]),
        Route("/v1/messages/count_tokens", route(count_tokens, anthropic), methods=["POST"]),
        Route("/v1/layout_parsing", route(layout_parse, layout_parsing), methods=["POST"]),
        Route("/api/chat", route(reply, ollama), methods=["POST"]),
        Route(
            "/api/generate",
            route(functools.partial(reply, parse=ollama.parse_generate), ollama),
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
