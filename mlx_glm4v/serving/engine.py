"""The serving engine: one thread owns MLX and runs every active request as a row of one batch.

Requests arrive as processor outputs plus their `GenerationSettings`; each gets a `Handle` that
yields `Event`s (text pieces with their token, then a final event with the finish reason, the
stop string if one ended it, and the usage) to synchronous or asynchronous readers, and can be
cancelled at any time.

Continuous batching: each turn of the engine loop runs pieces of prefill work (a few frames through
a few blocks of the vision tower, or a prompt chunk through a few decoder layers; where attention is
long, one block's or layer's attention a few heads at a time), the row with the least prompt left
first, for about `max_stall_ms` (each piece's cost estimated from the measured cost of earlier ones;
their sizes are the constants below), then one decode step for every row that has a token to run
(rows.py). So a long video never stalls the streams already running for more than about that budget,
a short request that arrives behind it starts within about one budget, new rows join the decode
batch as soon as their first token is out, and finished or cancelled rows leave it at once. A row's
prefill, sampling and attention are its own, its chunk and vision cuts fixed by its own prompt and
media: its output does not depend on which rows share the batch or the turns. Admission is first
come, first served, bounded by `max_concurrency` rows and a budget of tokens (prompt, media tokens
included, plus max_tokens: what the KV caches will hold); beyond them a bounded queue, and past it
`QueueFull`.

Vision features are shared across requests by pixel digest, never by URL or file name; prompts
are kept after their prefill (prefix.py) so a request that starts like one starts from it.

Under `mlx.launch` (`group`), rank 0's engine decides each turn (which requests start, which
are cancelled) and sends that decision to the other ranks' engines before running it
(lockstep.py); every later choice in a turn follows from the requests' own tokens, so all
ranks run the same collectives in the same order.
"""

import asyncio
import contextlib
import itertools
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..errors import Glm4vError
from ..generation.constrain import step_masks
from ..generation.generate import (
    clear_cache_after,
    generation_stream,
    maybe_quantize_kv_cache,
    wired_limit,
)
from ..generation.messages import build_messages
from ..generation.settings import GenerationSettings, kv_group_size_for
from ..generation.streaming import ReplyText
from ..inputs.processor import Processor
from ..models.media import FeatureMemo, media_items
from ..models.model import Model
from .drafts import RowDrafts, catch_up, decide, verify
from .prefix import PrefixCache, media_marks
from .rows import RowSampler, RowState, decode_logits
from .stats import EngineStats, PieceCosts

log = logging.getLogger(__name__)

# A piece of vision work the engine runs between decode steps: frames of at most about
# VISION_PIECE_PATCHES patches (one frame at least) through blocks of the tower, as many
# blocks as keep patches x blocks within VISION_PIECE_WORK (one block at least); frames
# too large for that take a block a few attention heads a piece (head_groups.py).
VISION_PIECE_PATCHES = 2048
VISION_PIECE_WORK = 2048
# Likewise a prompt chunk of n tokens runs through max(1, TEXT_PIECE_WORK // n) decoder layers a
# piece, or, when its attention is long (head_groups.py), a layer a few heads a piece.
TEXT_PIECE_WORK = 512
# Prompt tokens a prefill chunk holds, unless the engine is told otherwise.
PREFILL_CHUNK = 512


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
    # None: no log-probabilities; k: the chosen token's and k alternatives
    top_logprobs: Optional[int] = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens read from a cached prefix instead of being run
    time_to_first_token: float = 0.0  # seconds from admission to the first token
    queued: float = 0.0  # seconds spent waiting for admission
    drafts: Optional[dict] = None  # a drafting row's speculative.DraftStats.as_dict()


@dataclass
class Event:
    text: str
    token: Optional[int] = None
    logprob: Optional[float] = None
    top_logprobs: Optional[list] = None  # [(token id, log-probability)], most likely first
    # "stop", "length", "cancelled" or "error" on the last event
    finish_reason: Optional[str] = None
    usage: Optional[Usage] = None  # on the last event
    error: Optional[str] = None  # the user-facing sentence when finish_reason is "error"
    stop: Optional[str] = None  # the stop string that ended the reply, if one did


class Handle:
    """A submitted request: iterate (or `async for`) over its events; `cancel()` ends it early."""

    def __init__(self, request: Request, number: int = 0):
        self.request = request
        self.number = number  # the order of submission: how ranks name a request to each other
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
            raise RuntimeError(
                "this request was submitted outside an event loop; iterate it synchronously"
            )
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


class _Row:
    """One admitted request: prefilled (media, then prompt chunks), then decoding."""

    def __init__(self, handle: Handle, engine: "Engine"):
        request = handle.request
        settings = request.settings
        self.handle, self.settings = handle, settings
        self.started = time.perf_counter()
        self.ids = np.asarray(request.inputs["input_ids"]).reshape(-1)
        self.usage = Usage(len(self.ids), 0, queued=self.started - handle.submitted)
        self.inputs = {k: v for k, v in request.inputs.items() if k != "mm_token_type_ids"}
        self.media = media_items(
            *(
                self.inputs.get(k)
                for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
            )
        )
        self.to_encode = list(self.media)  # media not yet through the vision tower (or in the memo)
        self.pieces = None  # the vision pieces of to_encode[0] still to run (model.VisionPiece)
        self.parts = []  # its features so far, one array per finished run of frames
        self.tower = None  # activations of the frames part-way through the tower
        # a prompt chunk part-way through the decoder layers (model.DecoderPass)
        self.decoder = None
        # digest -> features of the media this row encoded, until its prompt is embedded
        self.features = {}
        self.last_token = None  # when the latest token was handed out
        self.cache = settings.new_cache(engine.model, engine.processor, self.ids[None])
        self.prompt = None  # the embedded prompt while its chunks run
        self.marks = None  # (start, end, digest) of its media in ids, once embedded (prefix.py)
        self.done = 0  # prompt columns in the cache
        self.chunk = min(settings.prefill_step_size, engine.prefill_chunk)
        options = settings.step_options(engine.processor, engine.model)
        # constrain.RowGrammar or None
        self.grammar = options["grammar"] and options["grammar"].start(self.ids)
        self.kv_group_size = (
            kv_group_size_for(engine.model, settings.kv_group_size) if settings.kv_bits else 0
        )
        sampler = RowSampler(
            settings.temp, settings.top_p, settings.min_p, settings.top_k, request.seed
        )
        self.state = RowState(self.cache, sampler, options["logits_processors"] or [], self.ids)
        self.reply = ReplyText(
            engine.processor.tokenizer.backend, settings.stop_ids(engine.model), settings.stop
        )
        # the token the next decode step runs (an int, or the last step's lazy result)
        self.token = None
        # (token, log-probabilities) sampled by a step still running, not yet handed out
        self.pending = None
        self.sampled = 0  # tokens sampled, handed out or pending
        self.cost = len(self.ids) + settings.max_tokens
        self.drafts = row_drafts(settings, engine, bool(self.state.processors or self.grammar))

    @property
    def prefilling(self) -> bool:
        return self.token is None


def row_drafts(settings: GenerationSettings, engine: "Engine", processed: bool):
    """The row's drafter (drafts.RowDrafts) if its settings ask for one: `draft="mtp"` or
    `prompt_lookup`. Several ranks would each have to decide every draft alike: they refuse MTP
    drafts and decode prompt lookup's rows plainly (the same reply)."""
    if settings.draft == "mtp":
        if engine.link is not None:
            raise Glm4vError(
                "MTP drafts are not run across several Macs (mlx.launch); ask without draft."
            )
        return RowDrafts("mtp", settings.draft_steps, settings, processed)
    if settings.prompt_lookup > 0 and engine.link is None:
        return RowDrafts("lookup", settings.prompt_lookup, settings, processed)
    return None


def _prefill_left(row: _Row) -> tuple:
    """Which prefilling row runs the next piece: the least prompt left (media tokens included), then
    the first admitted. A short question behind a long video starts at the next piece, and prompts
    alike are finished one after the other rather than all late together; every rank picks alike."""
    return len(row.ids) - row.done, row.handle.number


def _chunk_end(row: _Row) -> int:
    """Where the row's current prompt chunk ends: chunk boundaries fixed by its own prompt."""
    return min((row.done // row.chunk + 1) * row.chunk, len(row.ids))


def memory_bytes() -> int:
    """What MLX may use: Metal's recommended working set, else the machine's RAM."""
    info = mx.device_info()
    size = info.get("max_recommended_working_set_size") or info.get("memory_size")
    return int(size or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def kv_bytes_per_token(model: Model) -> int:
    """KV cache bytes one token takes in the whole model (every layer and head, whichever rank
    holds them)."""
    text = model.config.text_config
    # the activations' (and so the KV cache's) dtype
    itemsize = model.language_model.norm.weight.dtype.size
    return 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * itemsize


def default_limits(model: Model) -> tuple:
    """(token budget, max concurrency) from the memory the weights leave: half of it for KV
    caches."""
    per_token = (
        kv_bytes_per_token(model) * len(model.layers) // model.config.text_config.num_hidden_layers
    )
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    budget = max(8192, (memory_bytes() - weights) // 2 // per_token)
    return int(budget), int(min(32, max(1, budget // 4096)))


class Engine:
    """Owns the model on one thread; `submit` from any thread or event loop.

    `max_concurrency` rows decode together and `token_budget` bounds their prompt plus
    max_tokens (defaults from free memory, see `default_limits`); `max_queue` more requests
    wait; prompts run in chunks of `prefill_chunk` tokens and media through the vision tower in
    pieces (model.vision_pieces); each turn runs such pieces, the row with the least prompt left
    first, for about `max_stall_ms` (estimated by `costs`, a `PieceCosts`), then one decode step
    (`vision_piece`: model.vision_pieces' patches and work);
    `prefix_cache_bytes` of prompt KV is kept for requests that start alike (0: none), keyed
    by the model's `identity` (checkpoint and adapter), and with a `prompt_cache`
    (disk_cache.DiskCache) on disk too; `flush` waits for its writes.
    Rows decode one token a step: a request's `prompt_lookup` is not used (it never changes
    the output, only how many passes a single stream takes).

    With a `group` of ranks and its `link`, rank 0's engine takes requests and the others
    follow it (`follow`); `lockstep.serving_engine` builds both.
    """

    def __init__(
        self,
        model: Model,
        processor: Processor,
        *,
        max_queue: int = 64,
        max_concurrency: Optional[int] = None,
        token_budget: Optional[int] = None,
        prefill_chunk: int = PREFILL_CHUNK,
        prefix_cache_bytes: int = 1 << 30,
        prompt_cache=None,
        feature_cache_items: int = 64,
        feature_cache_bytes: Optional[int] = None,
        max_stall_ms: float = 250,
        costs=None,
        vision_piece: Optional[Sequence[int]] = None,
        clock=time.perf_counter,
        group=None,
        link=None,
        identity: str = "",
    ):
        self.model, self.processor, self.group = model, processor, group
        budget, concurrency = default_limits(model)
        self.max_concurrency = max_concurrency or concurrency
        self.token_budget = token_budget or budget
        if self.max_concurrency < 1 or self.token_budget < 1 or prefill_chunk < 1 or max_queue < 0:
            raise Glm4vError(
                "max-concurrency, the token budget and the prefill chunk must be positive, "
                "the queue length not negative."
            )
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        if max_stall_ms <= 0:
            raise Glm4vError("max-stall-ms must be positive.")
        self.max_stall = max_stall_ms / 1000
        self.costs = costs or PieceCosts()
        self.clock = clock  # what measures a turn's prefill (a test may give its own)
        # (patches, work)
        self.vision_piece = tuple(vision_piece or (VISION_PIECE_PATCHES, VISION_PIECE_WORK))
        self.vision_memo = FeatureMemo(feature_cache_items, feature_cache_bytes)
        # measured for the whole model, so that every rank keeps and drops the same prefixes
        self.prefixes = PrefixCache(
            prefix_cache_bytes,
            kv_bytes_per_token(model) if group is not None else None,
            identity,
            disk=prompt_cache,
        )
        self.stats = EngineStats()
        self._waiting: deque = deque()
        self._jobs: deque = deque()  # (future, fn, args): MLX work of others, run between turns
        self._rows: list = []
        self._closing = False
        self._seconds_per_request = 1.0  # running mean, for Retry-After
        self._wake = threading.Condition()
        self._numbers = itertools.count()
        # how rank 0's engine tells the others each turn (lockstep.Link); None on one rank
        self.link = link
        self._thread = None
        if group is None or group.rank() == 0:
            self._thread = threading.Thread(target=self._run, name="mlx-glm4v-engine", daemon=True)
            self._thread.start()

    def flush(self):
        """Wait until every prompt kept so far is written to the disk tier (if there is one)."""
        self.prefixes.flush()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def prefilling(self) -> int:
        """Rows admitted and still being prefilled (read from another thread: a snapshot)."""
        return sum(1 for r in list(self._rows) if r.prefilling)

    @property
    def active(self) -> int:
        return len(self._rows)

    @property
    def reserved_tokens(self) -> int:
        """Tokens of KV the admitted rows may grow to, and the waiting requests' prompts (a
        snapshot, for the models registry's budget)."""
        rows = sum(r.cost for r in list(self._rows))
        return rows + sum(h.request.inputs["input_ids"].shape[-1] for h in list(self._waiting))

    def submit(self, request: Request) -> Handle:
        if self._thread is None:
            raise Glm4vError("only rank 0's engine takes requests; the other ranks follow it.")
        handle = Handle(request, next(self._numbers))
        with self._wake:
            if self._closing:
                raise Glm4vError("the engine is shutting down.")
            if len(self._waiting) >= self.max_queue:
                self.stats.rejected += 1
                retry = self._seconds_per_request * (len(self._waiting) + 1) / self.max_concurrency
                raise QueueFull(
                    f"the server is busy: {self.max_queue} requests are already waiting.",
                    retry_after=int(min(60, max(1, math.ceil(retry)))),
                )
            self._waiting.append(handle)
            self._wake.notify()
        return handle

    def call(self, fn, *args) -> Future:
        """Run `fn(*args)` on the engine's thread between turns (MLX is used from one thread
        only: another model, such as the layout detector, runs here too); its result or
        exception in the future."""
        if self._thread is None:
            raise Glm4vError("only rank 0's engine runs work; the other ranks follow it.")
        future: Future = Future()
        with self._wake:
            if self._closing:
                raise Glm4vError("the engine is shutting down.")
            self._jobs.append((future, fn, args))
            self._wake.notify()
        return future

    def close(self, cancel: bool = False):
        """Serve what was submitted (or, with `cancel`, end it now as cancelled), then stop the
        thread."""
        with self._wake:
            self._closing = True
            if cancel:
                for handle in list(self._waiting) + [r.handle for r in self._rows]:
                    handle.cancel()
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        self.flush()

    # ---- the engine thread ----

    def _run(self):
        try:
            with mx.stream(generation_stream), wired_limit(self.model):
                while True:
                    with self._wake:
                        while not (self._waiting or self._rows or self._jobs or self._closing):
                            self._wake.wait()
                        if self._closing and not (self._waiting or self._rows or self._jobs):
                            break
                        admitted = self._admit()
                        jobs, self._jobs = self._jobs, deque()
                    self._run_jobs(jobs)
                    if not admitted and not self._rows:
                        continue
                    cancelled = {
                        h.number
                        for h in admitted + [r.handle for r in self._rows]
                        if h.cancelled.is_set()
                    }
                    with self._watched(bool(admitted or self._rows)):
                        if self.link is not None:
                            self.link.tell(admitted, cancelled)
                        self._turn(admitted, cancelled)
                if self.link is not None:
                    self.link.close()
        except Exception as e:
            if self.link is None:
                raise
            self.link.fail(e)  # ranks may no longer agree: all stop
        finally:
            mx.synchronize()
            # this thread's streams go with it, not at interpreter exit (which aborts)
            mx.clear_streams()

    @staticmethod
    def _run_jobs(jobs):
        for future, fn, args in jobs:
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # the caller's to raise
                future.set_exception(e)

    def follow(self):
        """A rank other than 0: run each turn rank 0's engine sends (lockstep.py), until it
        stops."""
        from .distributed import finish

        with mx.stream(generation_stream), wired_limit(self.model):
            while (turn := self.link.hear(busy=bool(self._rows))) is not None:
                with self._watched(bool(turn[0] or self._rows)):
                    self._turn(*turn)
        finish(self.group)

    def _watched(self, busy: bool):
        return self.link.watched(busy) if self.link is not None else contextlib.nullcontext()

    def _turn(self, admitted: list, cancelled: set):
        """Start the admitted requests, end the cancelled ones (by number), then one step of
        work."""
        for handle in admitted:
            self._guard([handle], self._start, handle)
        for row in [r for r in self._rows if r.handle.number in cancelled]:
            self.stats.cancelled += 1
            self._end(row.handle, row, Event("", finish_reason="cancelled", usage=row.usage))
        self._step()

    def _admit(self) -> list:
        """Handles to start now: first come first served, within concurrency and the token
        budget."""
        # a place in the queue freed at once
        for handle in [h for h in self._waiting if h.cancelled.is_set()]:
            self._waiting.remove(handle)
            out_usage = Usage(len(np.asarray(handle.request.inputs["input_ids"]).reshape(-1)), 0)
            self.stats.cancelled += 1
            handle.put(Event("", finish_reason="cancelled", usage=out_usage))
        out, used = [], sum(r.cost for r in self._rows)
        while self._waiting and len(self._rows) + len(out) < self.max_concurrency:
            handle = self._waiting[0]
            cost = (
                len(np.asarray(handle.request.inputs["input_ids"]).reshape(-1))
                + handle.request.settings.max_tokens
            )
            if (self._rows or out) and used + cost > self.token_budget:
                break
            self._waiting.popleft()
            out.append(handle)
            used += cost
        return out

    def _guard(self, handles, fn, *args):
        """fn's result; on failure None, and the given requests end with an error event (the
        engine keeps serving)."""
        try:
            return fn(*args)
        except Exception as e:
            if self.link is not None and not isinstance(e, Glm4vError):
                raise  # on several ranks only a user's error is sure to happen alike on each
            if isinstance(e, Glm4vError):
                message = str(e)
            else:
                log.exception("request failed")
                message = f"generation failed ({type(e).__name__})."
            for h in handles:
                row = next((r for r in self._rows if r.handle is h), None)
                usage = (
                    row.usage
                    if row
                    else Usage(len(np.asarray(h.request.inputs["input_ids"]).reshape(-1)), 0)
                )
                self._end(h, row, Event("", finish_reason="error", usage=usage, error=message))
                self.stats.errors += 1

    def _start(self, handle: Handle):
        row = _Row(handle, self)
        self._rows.append(row)
        self.stats.requests += 1
        self.stats.prompt_tokens += row.usage.prompt_tokens

    def _step(self):
        """Prefill pieces for about the stall budget, the row with the least prompt left first
        (`_prefill_left`); then a decode step.

        At least one piece runs, so every turn moves; on several ranks rank 0 decides, from its
        own clock, whether another piece fits and tells the others (`_another`).
        """
        began, ran, vision = self.clock(), 0, 0.0
        while True:
            waiting = [r for r in self._rows if r.prefilling]
            if not waiting:
                break
            row = min(waiting, key=_prefill_left)
            kind, size = self._guard([row.handle], self._next_piece, row) or (None, 0)
            if kind is None:  # the row failed and ended
                continue
            # another piece if it ends nearer the budget than stopping now: turns average the budget
            if ran and not self._another(
                self.clock() - began + self.costs.estimate(kind, size) / 2 <= self.max_stall
            ):
                break
            in_tower, start = bool(row.pieces), self.clock()
            self._guard([row.handle], self._prefill, row)
            seconds = self.clock() - start
            self.costs.measured(kind, size, seconds)
            self.stats.pieces[kind] = self.stats.pieces.get(kind, 0) + 1
            vision += seconds if in_tower else 0.0
            ran += 1
        if ran:
            self.stats.turns.append((ran, self.clock() - began))
            self.stats.vision_turn.observe(vision)
            self.stats.vision_seconds += vision
            log.debug(
                "prefill turn: %d pieces, %.3f s (vision %.3f s)", ran, self.clock() - began, vision
            )
        decoding = [r for r in self._rows if not r.prefilling]
        if decoding:
            self._guard([r.handle for r in decoding], self._decode, decoding)

    def _another(self, fits: bool) -> bool:
        """Whether another prefill piece runs this turn: rank 0's answer, the same on every rank."""
        if self.link is None:
            return fits
        return self.link.another(fits if self._thread is not None else None)

    def _next_piece(self, row: _Row) -> tuple:
        """(kind, size) of the row's next piece of prefill, in the units of `PieceCosts`: ("vision",
        patches x blocks), ("text", tokens x layers) or ("attention", query-key pairs x heads).

        Follows from the row's own prompt and media (and the memo, which every rank fills alike)."""
        if row.pieces is None:
            while row.to_encode and row.to_encode[0].digest in self.vision_memo:
                row.to_encode.pop(0)
            if row.to_encode:
                row.pieces = self.model.vision_pieces(row.to_encode[0], *self.vision_piece)
                self.vision_memo.misses += 1
        if row.pieces:
            return row.pieces[0].kind, row.pieces[0].work
        end = _chunk_end(row)
        tokens = end - row.done
        if (heads := self._next_heads(row, end)) is not None:
            return "attention", heads[1] * tokens * end
        first = row.decoder.layer if row.decoder is not None else 0
        return "text", tokens * (min(self._layers, first + self._layer_step(tokens)) - first)

    def _next_heads(self, row: _Row, end: int) -> Optional[tuple]:
        """The attention heads the row's next piece runs (model.head_groups), or None: whole
        layers."""
        p = row.decoder
        groups = self.model.head_groups(
            p.layer if p else 0, end - row.done, end, end == len(row.ids)
        )
        if groups is None:
            return None
        return groups[p.heads_run if p is not None else 0]

    @property
    def _layers(self) -> int:
        return len(self.model.layers)

    def _layer_step(self, tokens: int) -> int:
        """Decoder layers a piece of a prompt chunk runs: all of them for a short chunk, fewer
        for a long one (cut from the chunk's size alone, the same on every rank); all under a
        pipeline split."""
        if self.model.language_model.pipeline_group is not None:
            return self._layers
        return max(1, TEXT_PIECE_WORK // max(1, tokens))

    def _prefill(self, row: _Row):
        """One piece of a row's prefill (see `_next_piece`): vision pieces, then prompt chunks."""
        if row.pieces:
            row.tower, features = self.model.run_vision_piece(row.pieces.pop(0), row.tower)
            if features is not None:
                row.parts.append(features)
            self.stats.vision_pieces += 1
            # the item is done: its features for every row, as a whole pass gives them
            if not row.pieces:
                item = row.to_encode.pop(0)
                features = mx.concatenate(row.parts) if len(row.parts) > 1 else row.parts[0]
                self.vision_memo.put(item.digest, features)
                row.features[item.digest] = features
                row.pieces, row.parts = None, []
                self.stats.vision_items += 1
            return
        if row.prompt is None:
            self._embed(row)
        prompt, cache = row.prompt, row.cache
        end = _chunk_end(row)
        # the MTP layer runs from every column's hidden state
        drafter = row.drafts is not None and row.drafts.kind == "mtp"
        last_only = end == prompt.length and not drafter
        step = self._layer_step(end - row.done)
        heads = self._next_heads(row, end)
        # a short chunk: all of it at once
        if row.decoder is None and heads is None and step >= self._layers:
            hidden = self.model.forward(prompt, cache, row.done, end, last_only=last_only)
        # a long one: a few decoder layers (or attention heads) a piece, its state kept between
        # turns
        else:
            if row.decoder is None:
                row.decoder = self.model.begin_pass(
                    prompt, cache, row.done, end, last_only=last_only
                )
            if heads is not None:
                self.model.run_heads(row.decoder, cache, *heads)
            else:
                self.model.run_layers(row.decoder, cache, step)
            if row.decoder.layer < self._layers:
                return
            hidden, row.decoder = row.decoder.h, None
        if drafter:
            row.drafts.prefilled(hidden, row.done, end)
        row.done = end
        self.stats.prefill_chunks += 1
        if end < prompt.length:
            clear_cache_after([c.state for c in cache] + ([hidden] if drafter else []))
            return
        row.prompt = None
        first = self._sample(row, self.model.logits(hidden[:, -1, :]))
        mx.eval(first, [c.state for c in cache])
        self.prefixes.store(row.ids, row.marks, cache)
        row.sampled = 1
        token = first[0].item()
        self._emit(row, token, first[1])
        if row.drafts is not None and row in self._rows:
            row.drafts.first(token)

    def _embed(self, row: _Row):
        """The row's prompt embedded (media from the memo) and recorded; a kept prefix restored."""
        # back in the memo if another row's media pushed them out
        for key, features in row.features.items():
            if key not in self.vision_memo:
                self.vision_memo.put(key, features)
        row.features = {}
        prompt = self.model.prepare(
            **row.inputs, cache=row.cache, vision_memo=self.vision_memo, media=row.media
        )
        row.cache.record(prompt)
        if prompt.positions is not None:
            mx.eval(prompt.embeds)
        if row.drafts is not None:
            row.drafts.start(self.model, row.cache, prompt, row.ids)
        row.marks = media_marks(self.model.config, row.ids, row.media)
        if self.prefixes.max_bytes > 0 and not row.cache.rotating and row.settings.kv_bits is None:
            entry, n = self.prefixes.lookup(row.ids, row.marks)
            # the last prompt token always runs: its logits give the first token
            n = min(n, prompt.length - 1)
            if n > 0:
                self.prefixes.restore(entry, n, row.cache)
                row.done = row.usage.cached_tokens = n
                self.stats.cached_tokens += n
        row.prompt = prompt

    def _sample(self, row: _Row, logits: mx.array, allowed: Optional[mx.array] = None):
        s = row.settings
        maybe_quantize_kv_cache(row.cache, s.quantized_kv_start, row.kv_group_size, s.kv_bits)
        if row.grammar is not None and allowed is None:  # the first token: no step shares the mask
            allowed = step_masks([row.grammar], None, logits)[0]
        return row.state.sample(logits, allowed)

    def _decode(self, rows: list):
        """Queue one decode step for the rows that need more tokens, then hand out the previous
        step's tokens while it runs (mlx-lm's pipelining: the device never waits for the host).
        Rows with drafts make it a step of several columns (`verify`); their previous round is
        decided first (`_decide`: the step's one wait), and its tokens handed out with the
        others' once the next step is queued."""
        decided = self._decide([r for r in rows if r.drafts is not None and r.drafts.round])
        ready = [r for r in rows if r.pending is not None]
        step = [r for r in rows if r.sampled < r.settings.max_tokens]
        plain, out = step, []
        if any(r.drafts is not None for r in step):
            plain, out = self._verify(step)
        elif step:
            tokens = mx.concatenate(
                [
                    t.reshape(1) if isinstance(t, mx.array) else mx.array([t])
                    for t in (r.token for r in step)
                ]
            )
            logits = decode_logits(self.model, [r.cache for r in step], tokens)
            # {} when no row is constrained
            masks = step_masks([r.grammar for r in step], tokens, logits)
            for b, row in enumerate(step):
                row.state.ran(tokens[b : b + 1])
                out.append(self._sample(row, logits[b : b + 1], masks.get(b)))
            mx.async_eval(out)
            self.stats.decode_steps += 1
            self.stats.decode_rows += len(step)
            if self.stats.decode_steps % 256 == 0:
                clear_cache_after(out)
        for row in ready:
            (token, logprobs), row.pending = row.pending, None
            self._emit(row, token.item(), logprobs)
        for row, chosen in decided:
            for token, logprobs in chosen:
                if row not in self._rows:  # ended by a token just handed out
                    break
                self._emit(row, token, logprobs)
        for row, sampled in zip(plain, out):
            if row in self._rows:  # not ended by the token just handed out
                row.pending, row.token = sampled, sampled[0]
                row.sampled += 1

    def _verify(self, step: list) -> tuple:
        """Queue a decode step with drafting rows (drafts.verify). Returns the plain rows and
        their samples."""
        return verify(self.model, step, self._sample, self.stats)

    def _decide(self, rows: list) -> list:
        """The drafting rows' queued round, waited for and decided as each row's run alone
        decides it (drafts.decide): [(row, [(token, log-probabilities)] to hand out)]. Rejected
        drafts leave the rows' caches and their MTP layers catch up on the kept columns
        (queued)."""
        if not rows:
            return []
        mx.eval([r.drafts.round[3] for r in rows if r.drafts.round[3] is not None])
        decided, rounds = [], []
        for row in rows:
            logits, hidden, position, choices = row.drafts.round
            row.drafts.round = None
            k = len(row.drafts.drafts)
            chosen, kept = decide(row, logits, choices.tolist() if choices is not None else None)
            self._count_round(row, k, kept)
            decided.append((row, chosen))
            row.sampled += len(chosen)
            row.token = chosen[-1][0]
            if k > kept:
                row.cache.trim(k - kept)
            s = row.settings
            maybe_quantize_kv_cache(row.cache, s.quantized_kv_start, row.kv_group_size, s.kv_bits)
            if k == 0 and row.cache.rotating:  # a full rotating cache: plain decoding from now
                row.drafts = None
                continue
            rounds.append((row, hidden, kept, position))
        catch_up(self.model, rounds)
        return decided

    def _count_round(self, row: _Row, drafted: int, kept: int):
        self.stats.drafted += drafted
        self.stats.draft_accepted += kept
        self.stats.verify_steps += 1
        self.stats.verify_tokens += kept + 1
        row.usage.drafts = row.drafts.stats.as_dict()

    def _emit(self, row: _Row, token: int, logprobs: mx.array):
        """Hand out a sampled token as text (whole characters, stop strings held back), or end
        the row."""
        usage = row.usage
        usage.completion_tokens += 1
        self.stats.generated_tokens += 1
        now = time.perf_counter()
        if usage.completion_tokens == 1:
            usage.time_to_first_token = now - row.started
            self.stats.time_to_first_token.append(usage.time_to_first_token)
            self.stats.ttft.observe(now - row.handle.submitted)
        else:
            self.stats.inter_token.observe(now - row.last_token)
        row.last_token = now
        logprob, alternatives = top_logprobs(logprobs, token, row.handle.request.top_logprobs)
        text, finish = row.reply.add(token)
        if finish:
            return self._end(
                row.handle,
                row,
                Event(text, token, logprob, alternatives, finish, usage, stop=row.reply.stop),
            )
        row.handle.put(Event(text, token, logprob, alternatives))
        if usage.completion_tokens >= row.settings.max_tokens:
            return self._end(
                row.handle, row, Event(row.reply.finish(), finish_reason="length", usage=usage)
            )
        row.token = token

    def _end(self, handle: Handle, row: Optional[_Row], event: Event):
        handle.put(event)
        if row is not None and row in self._rows:
            self._rows.remove(row)
            seconds = time.perf_counter() - row.started
            self._seconds_per_request += 0.2 * (seconds - self._seconds_per_request)


def batch_generate(
    model: Model,
    processor: Processor,
    prompts: Sequence,
    images: Optional[Sequence] = None,
    videos: Optional[Sequence] = None,
    *,
    system: Optional[str] = None,
    seed: Optional[int] = None,
    max_concurrency: Optional[int] = None,
    **settings,
) -> list:
    """Replies to many prompts at once (texts or chat messages), as one continuous batch.

    `images[i]` and `videos[i]` are the media of prompt i; `settings` are those of
    `GenerationSettings`, the same for every prompt; each prompt's reply is what it gets alone.
    """
    settings = GenerationSettings(**settings)
    prompts = list(prompts)
    for name, media in (("images", images), ("videos", videos)):
        if media is not None and len(media) != len(prompts):
            raise Glm4vError(
                f"{name} has {len(media)} entries for {len(prompts)} prompts; "
                "give one list per prompt."
            )
    requests = []
    for i, prompt in enumerate(prompts):
        messages = build_messages(
            prompt, images[i] if images else (), videos[i] if videos else (), system
        )
        inputs = processor.process_messages(
            messages, settings.template_kwargs, settings.media_kwargs
        )
        requests.append(Request(inputs, settings, seed))
    engine = Engine(model, processor, max_queue=len(requests), max_concurrency=max_concurrency)
    try:
        handles = [engine.submit(r) for r in requests]
        texts = []
        for handle in handles:
            events = list(handle)
            if events[-1].finish_reason == "error":
                raise Glm4vError(events[-1].error)
            texts.append("".join(e.text for e in events))
        return texts
    finally:
        engine.close()
