"""The serving engine: one thread owns MLX and runs the requests the server (or a script) submits.

Requests arrive as processor outputs plus their `GenerationSettings`; each gets a `Handle` that
yields `Event`s (text pieces with their token, then a final event with the finish reason and
the usage) to synchronous or asynchronous readers, and can be cancelled at any time. Vision
features are shared across requests by pixel digest, never by URL or file name.

This version runs one request at a time; the interface is the one the batching engine keeps.
"""

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx

from .errors import Glm4vError
from .generate import GenerationSettings, stream_tokens
from .media import FeatureMemo
from .model import Model
from .processor import Processor


class QueueFull(Glm4vError):
    """Every place in the queue is taken; `retry_after` is a guess in seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Request:
    inputs: dict  # processor outputs for one prompt: input_ids [1, L], pixels and grids
    settings: GenerationSettings
    seed: Optional[int] = None
    top_logprobs: Optional[int] = None  # None: no log-probabilities; k: the chosen token's and k alternatives


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens read from a cached prefix instead of being run
    time_to_first_token: float = 0.0  # seconds from admission to the first token
    queued: float = 0.0  # seconds spent waiting for admission


@dataclass
class Event:
    text: str
    token: Optional[int] = None
    logprob: Optional[float] = None
    top_logprobs: Optional[list] = None  # [(token id, log-probability)], most likely first
    finish_reason: Optional[str] = None  # "stop", "length", "cancelled" or "error" on the last event
    usage: Optional[Usage] = None  # on the last event
    error: Optional[str] = None  # the user-facing sentence when finish_reason is "error"


class Handle:
    """A submitted request: iterate (or `async for`) over its events; `cancel()` ends it early."""

    _END = object()

    def __init__(self, request: Request):
        self.request = request
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self._events: queue.Queue = queue.Queue()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._async_events: Optional[asyncio.Queue] = None
        try:
            self._loop = asyncio.get_running_loop()
            self._async_events = asyncio.Queue()
        except RuntimeError:
            pass

    def cancel(self):
        self.cancelled.set()

    def put(self, event: Event):
        """Called by the engine thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._async_events.put_nowait, event)
        else:
            self._events.put(event)

    def __iter__(self):
        while True:
            event = self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    async def __aiter__(self):
        if self._async_events is None:
            raise RuntimeError("this request was submitted outside an event loop; iterate it synchronously")
        while True:
            event = await self._async_events.get()
            yield event
            if event.finish_reason is not None:
                return


def top_logprobs(logprobs: mx.array, token: int, k: Optional[int]):
    """The chosen token's log-probability and the k most likely alternatives."""
    if k is None or logprobs is None:
        return None, None
    chosen = logprobs[token].item()
    if k == 0:
        return chosen, []
    ids = mx.argpartition(-logprobs, k - 1)[:k]
    values = logprobs[ids]
    order = mx.argsort(-values)
    return chosen, list(zip(ids[order].tolist(), values[order].tolist()))


@dataclass
class EngineStats:
    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0
    cancelled: int = 0
    time_to_first_token: list = field(default_factory=list)


class Engine:
    """Owns the model on one thread; `submit` from any thread or event loop."""

    def __init__(self, model: Model, processor: Processor, *, max_queue: int = 64, feature_cache_items: int = 64,
                 feature_cache_bytes: Optional[int] = None):
        self.model, self.processor = model, processor
        self.max_queue = max_queue
        self.vision_memo = FeatureMemo(feature_cache_items, feature_cache_bytes)
        self.stats = EngineStats()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="mlx-glm4v-engine", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def submit(self, request: Request) -> Handle:
        if self._queue.qsize() >= self.max_queue:
            raise QueueFull(f"the server is busy: {self.max_queue} requests are already waiting.")
        handle = Handle(request)
        self._queue.put(handle)
        return handle

    def close(self):
        self._queue.put(None)
        self._thread.join()

    def _run(self):
        while (handle := self._queue.get()) is not None:
            try:
                self._serve(handle)
            except Glm4vError as e:
                handle.put(Event("", finish_reason="error", error=str(e)))
            except Exception as e:  # keep serving; the reader gets a sentence, the log the details
                import logging

                logging.getLogger(__name__).exception("request failed")
                handle.put(Event("", finish_reason="error", error=f"generation failed ({type(e).__name__})."))

    def _serve(self, handle: Handle):
        request, settings = handle.request, handle.request.settings
        start = time.perf_counter()
        usage = Usage(int(request.inputs["input_ids"].shape[-1]), 0, queued=start - handle.submitted)
        if handle.cancelled.is_set():
            self.stats.cancelled += 1
            handle.put(Event("", finish_reason="cancelled", usage=usage))
            return
        if request.seed is not None:
            mx.random.seed(request.seed)
        cache = settings.new_cache(self.model, self.processor, request.inputs["input_ids"])
        inputs = {k: v for k, v in request.inputs.items() if k != "mm_token_type_ids"}
        self.stats.requests += 1
        self.stats.prompt_tokens += usage.prompt_tokens
        responses = stream_tokens(self.model, self.processor, inputs, cache, stop_ids=settings.stop_ids(self.model),
                                  stop=settings.stop, vision_memo=self.vision_memo, **settings.step_options())
        for response in responses:
            if handle.cancelled.is_set():
                responses.close()
                self.stats.cancelled += 1
                handle.put(Event("", finish_reason="cancelled", usage=usage))
                return
            if response.token is not None:
                usage.completion_tokens += 1
                self.stats.generated_tokens += 1
                if usage.completion_tokens == 1:
                    usage.time_to_first_token = time.perf_counter() - start
                    self.stats.time_to_first_token.append(usage.time_to_first_token)
            logprob, alternatives = top_logprobs(response.logprobs, response.token, request.top_logprobs) \
                if response.token is not None else (None, None)
            final = response.finish_reason is not None
            handle.put(Event(response.text, response.token, logprob, alternatives, response.finish_reason,
                             usage if final else None))

