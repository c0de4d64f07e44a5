"""The one path every dialect's request takes: the model held, the prompt built off the event
loop, the engine run, and its events turned by the one reply parser into neutral events that
the dialect renders, whole or streamed (SSE), with keep-alives; a client that goes away cancels
its request at once, a request past the timeout is ended."""

import asyncio
import json
import logging
import time
from typing import Optional

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse

from ..generation.grounding import as_json, find_marks
from ..generation.reply import ReplyParser
from . import openai
from .drain import RETRY_AFTER
from .models import Lease, Slot
from .neutral import ApiError, Finish, Logprob, Meta, bad
from .state import ServerConfig, State, prepare

log = logging.getLogger("mlx_glm4v.server")


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


def timeout_error(config: ServerConfig) -> ApiError:
    message = (
        f"the request ran past the server's limit of {config.request_timeout:g} s "
        "(--request-timeout)."
    )
    return ApiError(504, message, code="timeout")


def ready_state(request: Request) -> State:
    state = request.app.state.server
    if not state.ready.is_set():
        raise ApiError(
            503, "the model is still loading; try again shortly.", headers={"Retry-After": "5"}
        )
    return state


async def read_body(request: Request):
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise ApiError(400, "the client closed the connection while sending the request.") from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise bad("the request body is not valid JSON.") from None


async def prepare_off_loop(slot: Slot, config: ServerConfig, neutral) -> dict:
    try:  # reading media is bounded by the limits; the timeout still answers the client in time
        return await asyncio.wait_for(
            run_in_threadpool(prepare, slot, config, neutral), config.request_timeout
        )
    except asyncio.TimeoutError:
        raise timeout_error(config) from None


async def reply(request: Request, dialect, parse=None):
    """A dialect's request, run on the model it names while that model is held."""
    ready = ready_state(request)
    body = await read_body(request)
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
    inputs = await prepare_off_loop(slot, config, neutral)
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
