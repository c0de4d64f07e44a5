"""The decode loops: prefill a prompt in chunks, then sample token by token (or check drafts,
speculative.py); `stream_generate` and `generate` on top, and mlx-lm's statistics line. The options
and what they build are settings.py's, token ids -> text is streaming.py's.

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

from ..inputs.processor import Processor
from ..models.cache import PromptCache
from ..models.model import Model, Prompt
from .messages import build_messages
from .settings import GenerationSettings, kv_group_size_for
from .speculative import DEFAULT_DRAFT_STEPS, DraftStats, lookup_decode, mtp_decode, mtp_drafter
from .streaming import ReplyText

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
    drafts: Optional[dict] = None  # with a drafter: DraftStats.as_dict() so far


def prefill(
    model: Model,
    prompt: Prompt,
    cache: PromptCache,
    step_size: int = 2048,
    progress=None,
    reuse=None,
    on_hidden=None,
) -> mx.array:
    """Run a prompt into the cache in chunks of `step_size` tokens; logits [B, vocab] of its last
    token.

    Chunks bound the memory of long prompts (a minute of video is thousands of tokens): the
    cache is evaluated and MLX's buffer cache released between them. `progress("prefill",
    done, total)`, if given, is called before each chunk. `reuse(cache)`, if given, puts a kept
    prefix of the prompt into the (recorded, empty) cache and returns its length; the rest runs
    in the chunks a fresh run would end where they end. `on_hidden(hidden, start, end)`, if
    given, gets every chunk's hidden states, all columns (what the MTP drafter starts from).
    """
    cache.record(prompt)
    if prompt.positions is not None:
        # Images and videos first, on their own: their activations are gone before the text
        # decoder starts (and, loaded lazily, before its weights are read).
        mx.eval(prompt.embeds)
    length = prompt.length
    done = min(reuse(cache), length - 1) if reuse is not None else 0
    for start in range(done - done % step_size, length, step_size):
        start = max(start, done)
        end = min(start - start % step_size + step_size, length)
        if progress is not None:
            progress("prefill", start, length)
        hidden = model.forward(
            prompt, cache, start, end, last_only=end == length and on_hidden is None
        )
        if on_hidden is not None:
            on_hidden(hidden, start, end)
        if end < length:  # (a drafter's hidden states computed now, not held as a graph)
            clear_cache_after([c.state for c in cache] + ([hidden] if on_hidden else []))
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
    draft: Optional[str] = None,
    draft_steps: int = DEFAULT_DRAFT_STEPS,
    distribution=None,
    draft_stats: Optional[DraftStats] = None,
    grammar=None,
    vision_memo=None,
    progress=None,
    reuse=None,
) -> Iterator[tuple]:
    """Yield (token id, log-probabilities) for a prompt given as processor outputs (batch of one).

    With `prompt_lookup` > 0, drafts of that many tokens copied from earlier in the
    conversation are checked in one forward pass (see `lookup_decode`); with `draft="mtp"` the
    checkpoint's MTP layer drafts `draft_steps` tokens (`mtp_decode`; `distribution`, from
    `sampling_distribution`, says what the sampler draws from, None for greedy) and
    `draft_stats` (a `DraftStats`) counts what drafting did. Media whose features
    are in `vision_memo` (a `FeatureMemo`) are not encoded again. `progress(stage, done, total)`
    hears how reading the prompt goes: "vision" in frames (images and frame pairs) encoded,
    "prefill" in prompt tokens. `reuse(inputs, cache)` restores a kept prefix (see `prefill`).
    A `grammar` (constrain.RowGrammar) masks what its constraint
    refuses; each step's mask needs the token before it, so the loop waits for each token.
    """
    sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
    if kv_bits is not None:
        kv_group_size = kv_group_size_for(model, kv_group_size)

    def process(logits, history, verified=True):
        for processor in logits_processors or ():
            logits = processor(history, logits)
        if verified and grammar_processor is not None:
            logits = grammar_processor(history, logits)
        return logits

    def sample(logits, history):
        logits = process(logits, history)
        maybe_quantize_kv_cache(cache, quantized_kv_start, kv_group_size, kv_bits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs.squeeze(0)

    with mx.stream(generation_stream):
        prompt_ids = mx.array(inputs["input_ids"]).reshape(-1)
        grammar_processor = (
            grammar.start(inputs["input_ids"]).processor() if grammar is not None else None
        )
        model_inputs = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
        prompt = model.prepare(
            **model_inputs, cache=cache, vision_memo=vision_memo, progress=progress
        )
        kept = None if reuse is None else (lambda c: reuse(inputs, c))
        drafter = None
        if draft == "mtp":
            drafter = mtp_drafter(model, cache, prompt, np.asarray(inputs["input_ids"]))
        last = prefill(
            model,
            prompt,
            cache,
            prefill_step_size,
            progress,
            kept,
            on_hidden=drafter.prefilled if drafter is not None else None,
        )
        first = sample(last, prompt_ids)
        if drafter is not None:
            yield from mtp_decode(
                model,
                cache,
                drafter,
                (first[0].item(), first[1]),
                process,
                distribution,
                prompt_ids,
                max_tokens,
                draft_steps,
                draft_stats if draft_stats is not None else DraftStats(),
                processed=bool(logits_processors) or grammar is not None,
            )
        elif prompt_lookup > 0:
            yield from lookup_decode(
                model, cache, first, sample, prompt_ids, max_tokens, prompt_lookup
            )
        else:
            yield from pipelined_decode(
                model,
                cache,
                first,
                sample,
                prompt_ids,
                max_tokens,
                bool(logits_processors) or grammar is not None,
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
    reuse=None,
    **settings,
) -> Iterator[GenerationResponse]:
    """Stream a reply to a prompt (text with `images`/`videos`, or chat messages) piece by piece.

    `settings` are those of `GenerationSettings` (max_tokens, temp, top_p, ...). Text comes
    out whole characters at a time; the stop token and stop strings are not part of it.
    `reuse(inputs, cache)` puts a kept prefix of the prompt into the cache (see `prefill`).
    """
    settings = GenerationSettings(**settings)
    messages = build_messages(prompt, images, videos, system)
    inputs = processor.process_messages(messages, settings.template_kwargs, settings.media_kwargs)
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
        reuse=reuse,
        **settings.step_options(processor, model),
    )


def stream_tokens(model, processor, inputs: dict, cache, *, stop_ids=(), stop=(), **step_options):
    """Text and statistics for processor outputs run into `cache`: the common core of generate
    and chat."""
    n_prompt = int(inputs["input_ids"].shape[-1])
    drafting = step_options.get("draft") is not None
    draft_stats = step_options.setdefault("draft_stats", DraftStats())
    reply = ReplyText(processor.tokenizer.backend, stop_ids, stop)
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
                drafts=draft_stats.as_dict() if drafting else None,
            )
            text, finish = reply.add(token)
            yield GenerationResponse(text, token, **stats, finish_reason=finish)
            if finish:
                return
    yield GenerationResponse(
        reply.finish(), None, **{**stats, "logprobs": None}, finish_reason="length"
    )


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
