"""The ASGI middleware every request passes (auth, the body cap, a draining server's 503s)
and `dialect_of`: whose error shape a path answers in before its route runs."""

import hmac

from starlette.responses import JSONResponse

from . import anthropic, layout_parsing, ollama, openai, responses
from .drain import RETRY_AFTER
from .neutral import ApiError
from .state import ServerConfig


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
