"""Generation: prefill a prompt in chunks, then sample token by token and stream text.

The decode loop follows mlx-lm's `generate_step`: the next step is queued with
`mx.async_eval` before the current token is handed out, so the device never waits for the
host. Samplers, logits processors and KV caches are mlx-lm's; the wired-memory limit and the
switch to a quantized cache do what mlx-lm's do, written here because `mlx_lm.generate`
imports transformers.
"""

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np
from tokenizers.decoders import DecodeStream

from ..errors import Glm4vError
from ..inputs.processor import REPLY_MARKERS, Processor
from ..models.cache import PromptCache
from ..models.mlxlm import make_logits_processors, make_sampler
from ..models.model import Model, Prompt
from .constrain import Constraint, RowGrammar

# Generation runs on a stream of its own, as in mlx-lm, so queued steps never wait on other work.
generation_stream = mx.new_thread_local_stream(mx.default_device())


@contextlib.contextmanager
def wired_limit(model: Model):
    """While generating, let the model's memory stay wired (resident) up to the device's
    recommended working set, as mlx-lm does; a no-op where the device reports none (CPU)."""
    limit = mx.device_info().get("max_recommended_working_set_size")
    if limit is None:
        yield
        return
    previous = mx.set_wired_limit(limit)
    try:
        yield
    finally:
        mx.synchronize(generation_stream)
        mx.set_wired_limit(previous)


KV_GROUP_SIZES = (128, 64, 32)  # the group sizes mx.quantize takes


def kv_group_size_for(model: Model, requested: int = 64) -> int:
    """The group size a quantized KV cache of the model's heads can use: `requested` when it
    divides the head size, else the largest smaller one MLX supports that does."""
    head_dim = model.config.text_config.head_dim
    for size in (requested,) + tuple(g for g in KV_GROUP_SIZES if g < requested):
        if size in KV_GROUP_SIZES and head_dim % size == 0:
            return size
    raise Glm4vError(
        f"kv-bits needs the attention head size ({head_dim}) to be a multiple of 32, 64 or 128, "
        "the group sizes MLX quantizes in; drop --kv-bits for this model."
    )


def maybe_quantize_kv_cache(cache: PromptCache, start: int, group_size: int, bits: Optional[int]):
    """Swap each layer's cache for a quantized one once it holds `start` tokens (mlx-lm's
    `--kv-bits`)."""
    if bits is None:
        return
    for i, c in enumerate(cache):
        if hasattr(c, "to_quantized") and c.offset >= start:
            cache[i] = c.to_quantized(group_size=group_size, bits=bits)


@dataclass
class GenerationResponse:
    """One step of `stream_generate`: the new text and the running statistics."""

    text: str
    token: Optional[int]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB, MLX's peak since the process started
    finish_reason: Optional[str] = None  # "stop", "length" or None while generating
    logprobs: Optional[mx.array] = None  # [vocab] log-probabilities the token was drawn from


def user_message(text: str = "", images: Sequence = (), videos: Sequence = ()) -> dict:
    """A user turn with its images and videos first, in the order given, then the text."""
    content = [{"type": "image", "image": i} for i in images] + [
        {"type": "video", "video": v} for v in videos
    ]
    if text:
        content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def build_messages(prompt, images=(), videos=(), system: Optional[str] = None) -> list:
    """Chat messages from a plain prompt (media go into its user turn) or messages as given."""
    if isinstance(prompt, str):
        messages = [{"role": "system", "content": system}] if system else []
        return messages + [user_message(prompt, images or (), videos or ())]
    if images or videos or system:
        raise Glm4vError(
            "with chat messages, put images, videos and the system prompt into the messages."
        )
    return list(prompt)


def prefill(
    model: Model, prompt: Prompt, cache: PromptCache, step_size: int = 2048, progress=None
) -> mx.array:
    """Run a prompt into the cache in chunks of `step_size` tokens; logits [B, vocab] of its last
    token.

    Chunks bound the memory of long prompts (a minute of video is thousands of tokens): the
    cache is evaluated and MLX's buffer cache released between them. `progress("prefill",
    done, total)`, if given, is called before each chunk.
    """
    cache.record(prompt)
    if prompt.positions is not None:
        # Images and videos first, on their own: their activations are gone before the text
        # decoder starts (and, loaded lazily, before its weights are read).
        mx.eval(prompt.embeds)
    length = prompt.length
    for start in range(0, length, step_size):
        end = min(start + step_size, length)
        if progress is not None:
            progress("prefill", start, length)
        hidden = model.forward(prompt, cache, start, end, last_only=end == length)
        if end < length:
            clear_cache_after([c.state for c in cache])
    return model.logits(hidden[:, -1, :])


def generate_step(
    model: Model,
    inputs: dict,
    cache: PromptCache,
    *,
    sampler=None,
    logits_processors=None,
    max_tokens: int = 256,
    prefill_step_size: int = 2048,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
    prompt_lookup: int = 0,
    grammar=None,
    vision_memo=None,
    progress=None,
) -> Iterator[tuple]:
    """Yield (token id, log-probabilities) for a prompt given as processor outputs (batch of one).

    With `prompt_lookup` > 0, drafts of that many tokens copied from earlier in the
    conversation are checked in one forward pass (see `lookup_decode`). Media whose features
    are in `vision_memo` (a `FeatureMemo`) are not encoded again. `progress(stage, done, total)`
    hears how reading the prompt goes: "vision" in frames (images and frame pairs) encoded,
    "prefill" in prompt tokens. A `grammar` (constrain.RowGrammar) masks what its constraint
    refuses; each step's mask needs the token before it, so the loop waits for each token.
    """
    sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
    if kv_bits is not None:
        kv_group_size = kv_group_size_for(model, kv_group_size)

    def sample(logits, history):
        for processor in logits_processors or ():
            logits = processor(history, logits)
        maybe_quantize_kv_cache(cache, quantized_kv_start, kv_group_size, kv_bits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs.squeeze(0)

    with mx.stream(generation_stream):
        prompt_ids = mx.array(inputs["input_ids"]).reshape(-1)
        if grammar is not None:
            logits_processors = [
                *(logits_processors or ()),
                grammar.start(inputs["input_ids"]).processor(),
            ]
        model_inputs = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
        prompt = model.prepare(
            **model_inputs, cache=cache, vision_memo=vision_memo, progress=progress
        )
        first = sample(prefill(model, prompt, cache, prefill_step_size, progress), prompt_ids)
        if prompt_lookup > 0:
            yield from lookup_decode(
                model, cache, first, sample, prompt_ids, max_tokens, prompt_lookup
            )
        else:
            yield from pipelined_decode(
                model, cache, first, sample, prompt_ids, max_tokens, bool(logits_processors)
            )


def clear_cache_after(arrays):
    """Wait for `arrays` (queued work), then free MLX's cache. The wait lets go of the GIL;
    clear_cache keeps it while a queued step runs, so a collective stuck on a frozen rank would
    lock out every other thread, the SIGTERM and hung-rank watchers included."""
    mx.eval(arrays)
    mx.clear_cache()


def pipelined_decode(model, cache, first, sample, history, max_tokens: int, keep_history: bool):
    """mlx-lm's loop: queue step n+1 before handing out token n, so the device never waits."""
    y, logprobs = first
    mx.async_eval(y, logprobs)
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            if keep_history:
                history = mx.concatenate([history, y])
            next_y, next_logprobs = sample(model(y[None], cache=cache)[:, -1, :], history)
            mx.async_eval(next_y, next_logprobs)
        yield y.item(), logprobs
        if n % 256 == 0:
            clear_cache_after((next_y, next_logprobs) if n + 1 < max_tokens else ())
        if n + 1 < max_tokens:
            y, logprobs = next_y, next_logprobs


def find_draft(history: np.ndarray, n_draft: int, max_ngram: int = 3) -> list:
    """Tokens that followed the latest earlier occurrence of the history's last n-gram (longest n
    first)."""
    for n in range(min(max_ngram, len(history) - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(history[:-1], n)
        hits = np.flatnonzero((windows == history[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return history[start : start + n_draft].tolist()
    return []


def lookup_decode(model, cache, first, sample, history, max_tokens: int, n_draft: int):
    """Prompt-lookup decoding: a draft copied from the prompt or the reply is verified in one pass.

    The model scores the pending token and the draft together; each position is sampled as
    plain decoding would sample it, drafts are kept while they agree, and the first
    disagreement (or the token after a fully accepted draft) comes from the model itself.
    So the output is exactly what plain decoding gives, in fewer, wider forward passes.
    """
    if cache.rotating:
        raise Glm4vError(
            "prompt lookup drops rejected drafts from the cache, "
            "which a rotating cache cannot: drop --max-kv-size."
        )
    y, logprobs = first
    ids = np.asarray(history).tolist()
    emitted = 0
    while True:
        token = y.item()
        yield token, logprobs
        ids.append(token)
        emitted += 1
        if emitted == max_tokens:
            return
        draft = find_draft(np.array(ids), min(n_draft, max_tokens - emitted - 1))
        logits = model(mx.array([[token] + draft]), cache=cache)[0]
        for i in range(len(draft) + 1):
            y, logprobs = sample(logits[i : i + 1], mx.array(ids))  # ids: all accepted so far
            if i == len(draft) or y.item() != draft[i]:
                break
            yield draft[i], logprobs
            ids.append(draft[i])
            emitted += 1
        if len(draft) > i:
            cache.trim(len(draft) - i)


def thinking_budget_processor(budget: int, think_open: int, think_close: int):
    """A logits processor that forces `</think>` once `budget` tokens follow the last unclosed
    `<think>`.

    It reads the token history (prompt and reply, as mlx-lm's processors get it) with array
    operations only, so decoding never waits for the host, and it holds no state: drafts
    verified by prompt lookup and rows of a batch see exactly what plain decoding would.
    """

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        tokens = tokens.reshape(-1, tokens.shape[-1])  # [L] or [B, L]
        at = mx.arange(tokens.shape[-1])
        opened = mx.max(mx.where(tokens == think_open, at, -1), axis=-1, keepdims=True)
        closed = mx.max(mx.where(tokens == think_close, at, -1), axis=-1, keepdims=True)
        spent = tokens.shape[-1] - 1 - opened
        force = (opened > closed) & (spent >= budget)
        only_close = mx.where(mx.arange(logits.shape[-1]) == think_close, 0.0, -mx.inf).astype(
            logits.dtype
        )
        return mx.where(force, only_close, logits)

    return process


class StopStrings:
    """Holds back text that may be the start of a stop string, and cuts at the first one found."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple:
        """(text safe to show, whether a stop string was reached)."""
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            cut = min(hits)[0]
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = max(
            (k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])),
            default=0,
        )
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class GenerationSettings:
    """The options of a reply, shared by `stream_generate` and `ChatSession` and checked once.

    Sampling and logits processing are mlx-lm's; `max_kv_size` rotates the KV cache (keeping
    the system prompt and the media), `kv_bits` quantizes it, `prompt_lookup` drafts that
    many tokens from n-grams of the conversation. `thinking_budget` forces `</think>` after that
    many tokens of thinking, so the answer follows. `template_kwargs` reach the chat template
    (e.g. `enable_thinking`), `media_kwargs` the processor (`fps`, `max_frames`, `max_pixels`).
    A `constraint` (constrain.Constraint) holds the answer to a grammar; it is compiled here, so
    a schema it cannot take is refused before any work.
    """

    max_tokens: int = 256
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = 20
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    max_kv_size: Optional[int] = None
    kv_bits: Optional[int] = None
    kv_group_size: int = 64
    quantized_kv_start: int = 0
    prefill_step_size: int = 2048
    prompt_lookup: int = 0
    thinking_budget: Optional[int] = None
    template_kwargs: Optional[dict] = None
    media_kwargs: Optional[dict] = None
    constraint: Optional[Constraint] = None

    def __post_init__(self):
        checks = [
            (self.max_tokens >= 1, f"max-tokens {self.max_tokens} must be at least 1."),
            (self.temp >= 0, f"temperature {self.temp} is negative; use 0 for greedy decoding."),
            (0 < self.top_p <= 1, f"top-p {self.top_p} must be in (0, 1]."),
            (self.top_k >= 0, f"top-k {self.top_k} must be 0 (off) or positive."),
            (0 <= self.min_p <= 1, f"min-p {self.min_p} must be in [0, 1]."),
            (
                self.repetition_penalty is None or self.repetition_penalty > 0,
                f"repetition penalty {self.repetition_penalty} must be positive.",
            ),
            (
                self.kv_bits in (None, 2, 3, 4, 5, 6, 8),
                f"kv-bits {self.kv_bits} is not supported; choose 2, 3, 4, 5, 6 or 8.",
            ),
            (
                self.max_kv_size is None or self.max_kv_size >= 1,
                f"max-kv-size {self.max_kv_size} must be a positive number of tokens.",
            ),
            (
                self.max_kv_size is None or self.kv_bits is None,
                "kv-bits cannot be combined with max-kv-size (mlx-lm has no quantized rotating "
                "cache).",
            ),
            (
                self.prefill_step_size >= 1,
                f"prefill step size {self.prefill_step_size} must be at least 1.",
            ),
            (
                self.prompt_lookup >= 0,
                f"prompt-lookup {self.prompt_lookup} must be 0 (off) or a number of draft tokens.",
            ),
            (
                self.thinking_budget is None or self.thinking_budget >= 0,
                f"thinking budget {self.thinking_budget} must be 0 or a positive number of tokens.",
            ),
        ]
        media = self.media_kwargs or {}
        checks += [
            (
                media.get("max_pixels") is None or media["max_pixels"] >= 1,
                f"max-pixels {media.get('max_pixels')} must be a positive number of pixels.",
            ),
            (
                media.get("fps") is None or media["fps"] > 0,
                f"fps {media.get('fps')} must be positive.",
            ),
            (
                media.get("max_frames") is None or media["max_frames"] >= 2,
                f"max-frames {media.get('max_frames')} is too small: "
                "frames reach the model in pairs, so 2 at least.",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise Glm4vError(message)
        self.template_kwargs = dict(self.template_kwargs or {})
        self.media_kwargs = dict(self.media_kwargs or {})
        if isinstance(self.constraint, dict):  # as sent between ranks (dataclasses.asdict, JSON)
            self.constraint = Constraint(**self.constraint)
        if self.constraint is not None:
            if not isinstance(self.constraint, Constraint):
                raise Glm4vError("constraint must be a mlx_glm4v.generation.constrain.Constraint.")
            # compiled and checked now: a bad schema is the caller's error
            _ = self.constraint.grammar

    def stop_ids(self, model: Model) -> set:
        """The end tokens; under a constraint always (its grammar, once complete, allows nothing
        else)."""
        return (
            set() if self.ignore_eos and self.constraint is None else set(model.config.eos_token_id)
        )

    def step_options(
        self, processor: Optional[Processor] = None, model: Optional[Model] = None
    ) -> dict:
        """The arguments of `generate_step`, for one request: mlx-lm's sampler and logits processors
        included, the thinking budget's (which needs the `processor` for the `<think>` ids) and the
        constraint's matcher (which needs the `model` too: its logits width and end tokens)."""
        processors = make_logits_processors(
            repetition_penalty=self.repetition_penalty,
            repetition_context_size=self.repetition_context_size,
        )
        if self.thinking_budget is not None:
            ids = (
                [processor.convert_tokens_to_ids(t) for t in ("<think>", "</think>")]
                if processor
                else [None]
            )
            if None in ids:
                raise Glm4vError(
                    "a thinking budget needs a tokenizer with <think> and </think> tokens; "
                    "this checkpoint's has none."
                    if processor
                    else "a thinking budget needs the processor: pass it to step_options."
                )
            processors.append(thinking_budget_processor(self.thinking_budget, *ids))
        return dict(
            sampler=make_sampler(
                temp=self.temp,
                top_p=self.top_p if self.top_p < 1 else 0.0,
                min_p=self.min_p,
                top_k=self.top_k,
            ),
            logits_processors=processors,
            max_tokens=self.max_tokens,
            prefill_step_size=self.prefill_step_size,
            kv_bits=self.kv_bits,
            kv_group_size=self.kv_group_size,
            quantized_kv_start=self.quantized_kv_start,
            prompt_lookup=self.prompt_lookup,
            grammar=self.row_grammar(processor, model),
        )

    def row_grammar(
        self, processor: Optional[Processor], model: Optional[Model]
    ) -> Optional[RowGrammar]:
        if self.constraint is None:
            return None
        if processor is None or model is None:
            raise Glm4vError(
                "a constraint needs the processor and the model: pass them to step_options."
            )
        return RowGrammar(
            self.constraint,
            processor,
            model.config.text_config.vocab_size,
            model.config.eos_token_id,
        )

    def new_cache(self, model: Model, processor: Processor, input_ids) -> PromptCache:
        """A cache for one conversation; a rotating one keeps the system prompt and the media of
        `input_ids`."""
        if self.kv_bits is not None:
            # a head size MLX cannot quantize: say so now
            kv_group_size_for(model, self.kv_group_size)
        if self.max_kv_size is None:
            return model.make_cache()
        keep = kept_prefix(model, processor, input_ids)
        if keep >= self.max_kv_size:
            raise Glm4vError(
                f"max-kv-size {self.max_kv_size} is too small: the system prompt and media alone "
                f"take {keep} tokens."
            )
        return model.make_cache(max_kv_size=self.max_kv_size, keep=keep)


def media_end(model: Model, input_ids) -> int:
    """The index just past the last image or video in `input_ids` (0 without media)."""
    ids = np.asarray(input_ids).reshape(-1)
    cfg = model.config
    ends = np.flatnonzero((ids == cfg.image_end_token_id) | (ids == cfg.video_end_token_id))
    return int(ends[-1]) + 1 if ends.size else 0


def kept_prefix(model: Model, processor: Processor, input_ids) -> int:
    """Tokens a rotating cache must never drop: the system prompt, and everything up to the last
    image or video."""
    ids = np.asarray(input_ids).reshape(-1)
    users = np.flatnonzero(ids == processor.convert_tokens_to_ids("<|user|>"))
    return max(media_end(model, ids), int(users[0]) if users.size else 0)


def stream_generate(
    model: Model,
    processor: Processor,
    prompt: Union[str, List[dict]],
    images: Sequence = (),
    videos: Sequence = (),
    *,
    system: Optional[str] = None,
    seed: Optional[int] = None,
    cache: Optional[PromptCache] = None,
    **settings,
) -> Iterator[GenerationResponse]:
    """Stream a reply to a prompt (text with `images`/`videos`, or chat messages) piece by piece.

    `settings` are those of `GenerationSettings` (max_tokens, temp, top_p, ...). Text comes
    out whole characters at a time; the stop token and stop strings are not part of it.
    """
    settings = GenerationSettings(**settings)
    messages = build_messages(prompt, images, videos, system)
    text = processor.apply_chat_template(
        messages, add_generation_prompt=True, **settings.template_kwargs
    )
    media_images, media_videos = processor.media_from_messages(messages)
    inputs = processor(text, images=media_images, videos=media_videos, **settings.media_kwargs)
    if seed is not None:
        mx.random.seed(seed)
    if cache is None:
        cache = settings.new_cache(model, processor, inputs["input_ids"])
    yield from stream_tokens(
        model,
        processor,
        inputs,
        cache,
        stop_ids=settings.stop_ids(model),
        stop=settings.stop,
        **settings.step_options(processor, model),
    )


def stream_tokens(model, processor, inputs: dict, cache, *, stop_ids=(), stop=(), **step_options):
    """Text and statistics for processor outputs run into `cache`: the common core of generate
    and chat."""
    n_prompt = int(inputs["input_ids"].shape[-1])
    decoder = StreamingText(processor.tokenizer.backend)
    stops = StopStrings(stop)
    start = time.perf_counter()
    prompt_tps = generation_tps = 0.0
    with wired_limit(model):
        for n, (token, logprobs) in enumerate(
            generate_step(model, inputs, cache, **step_options), start=1
        ):
            now = time.perf_counter()
            if n == 1:
                prompt_tps = n_prompt / (now - start)
                start = now
            else:
                generation_tps = (n - 1) / (now - start)
            stats = dict(
                prompt_tokens=n_prompt,
                prompt_tps=prompt_tps,
                generation_tokens=n,
                generation_tps=generation_tps,
                peak_memory=mx.get_peak_memory() / 1e9,
                logprobs=logprobs,
            )
            if token in stop_ids:
                piece, _ = stops.feed(decoder.finish())
                yield GenerationResponse(
                    piece + stops.flush(), token, **stats, finish_reason="stop"
                )
                return
            piece, stopped = stops.feed(decoder.add(token))
            if stopped:
                yield GenerationResponse(piece, token, **stats, finish_reason="stop")
                return
            yield GenerationResponse(piece, token, **stats)
    piece, _ = stops.feed(decoder.finish())
    yield GenerationResponse(
        piece + stops.flush(), None, **{**stats, "logprobs": None}, finish_reason="length"
    )


def hidden_tokens(tokenizer) -> frozenset:
    """The added tokens a reply's text leaves out: all but GLM-V's reply markers
    (processor.REPLY_MARKERS), so a turn or media marker the model emits never becomes text a
    client sends back."""
    return frozenset(
        i for i, t in tokenizer.get_added_tokens_decoder().items() if t.content not in REPLY_MARKERS
    )


class StreamingText:
    """Incremental detokenization that never splits a character; in the end equal to
    `decode(tokens)` of the tokens shown (`hidden_tokens` left out)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stream = DecodeStream(skip_special_tokens=False)
        self.hidden = hidden_tokens(tokenizer)
        self.tokens, self.text = [], ""

    def add(self, token: int) -> str:
        if token in self.hidden:
            return ""
        self.tokens.append(token)
        piece = self.stream.step(self.tokenizer, token) or ""
        self.text += piece
        return piece

    def finish(self) -> str:
        """What the stream still holds back (an unfinished character decodes as the tokenizer
        decodes it)."""
        full = self.tokenizer.decode(self.tokens, skip_special_tokens=False)
        rest = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += rest
        return rest


def generate(
    model: Model,
    processor: Processor,
    prompt,
    images=(),
    videos=(),
    verbose: bool = False,
    **kwargs,
) -> str:
    """The whole reply as a string; `verbose` streams it to stdout with a statistics line."""
    text = ""
    response = None
    for response in stream_generate(model, processor, prompt, images, videos, **kwargs):
        text += response.text
        if verbose:
            print(response.text, end="", flush=True)
    if verbose and response is not None:
        print()
        print(stats_line(response))
    return text


def stats_line(r: GenerationResponse, load_s: Optional[float] = None) -> str:
    """mlx-lm's statistics line, with the load time first when given."""
    return (
        (f"Load: {load_s:.3f} s | " if load_s is not None else "")
        + f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec | "
        f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec | "
        f"Peak memory: {r.peak_memory:.3f} GB"
    )
