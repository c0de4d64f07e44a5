"""The routes besides the dialects' replies: health, metrics, the models' listings, Anthropic's
count_tokens, the stored responses' GET/DELETE, /v1/layout_parsing, Ollama's descriptions of
the models; `route` and `ollama_route` answer each one's refusals in its dialect's shape."""

import asyncio
import logging

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse

from . import anthropic, layout_parsing, ollama, openai
from .middleware import error_response
from .models import model_entry, ps, tags
from .neutral import ApiError, bad, check_model
from .run import prepare_off_loop, read_body, ready_state, timeout_error

log = logging.getLogger("mlx_glm4v.server")


async def health(request: Request):
    state = request.app.state.server
    if state.drain.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not state.ready.is_set():
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def models(request: Request):
    """GET /v1/models: every model the server may run (`loaded`: whether it is in memory)."""
    state = ready_state(request)
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
        state, name = ready_state(request), request.path_params["name"]
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


async def count_tokens(request: Request, dialect):
    """Anthropic's POST /v1/messages/count_tokens: the prompt as it would run, counted."""
    ready = ready_state(request)
    body = await read_body(request)
    lease = await ready.hold(body)
    try:
        slot = lease.slot
        neutral = dialect.parse(body, slot.served, counting=True)
        inputs = await prepare_off_loop(slot, ready.config, neutral)
    finally:
        lease.release()
    return JSONResponse({"input_tokens": int(inputs["input_ids"].shape[-1])})


async def stored_response(request: Request, dialect):
    """GET or DELETE /v1/responses/{id}: a stored Responses reply."""
    store, rid = ready_state(request).store, request.path_params["rid"]
    if request.method == "DELETE":
        return JSONResponse(dialect.delete(store, rid))
    return JSONResponse(dialect.retrieve(store, rid))


async def layout_parse(request: Request, dialect):
    """The GLM-OCR pipeline on one document (layout_parsing.py), through the engine of the model
    the request names (the first model when it names none)."""
    state = ready_state(request)
    if state.layout is None:
        raise layout_parsing.unavailable()
    body = await read_body(request)
    lease = await state.hold(body)
    try:
        slot = lease.slot
        job = await run_in_threadpool(
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
            job,
            slot.engine,
            slot.processor,
            state.layout,
            readers.append,
        )
        try:
            document, drawn = await asyncio.wait_for(work, state.config.request_timeout)
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
    return JSONResponse(layout_parsing.response(document, slot.name, job, drawn))


# ---- Ollama's descriptions of the model ---------------------------------------------------------


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
    state = ready_state(request)
    return {"models": tags(state.registry, state.started)}


async def ollama_ps(request: Request):
    return {"models": ps(ready_state(request).registry)}


async def ollama_show(request: Request):
    state = ready_state(request)
    body = await read_body(request)
    name = ollama.show_name(body)
    lease = await state.hold({"model": name})
    try:
        slot = lease.slot
        check_model(name, slot.served)
        return ollama.show(name, slot.model, slot.processor, slot.served, state.started)
    finally:
        lease.release()
