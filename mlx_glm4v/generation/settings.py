"""The options of a reply, checked once, and what they build for each request: mlx-lm's
sampler and logits processors, the thinking budget's processor, a constraint's matcher, the KV
cache."""

from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from ..errors import Glm4vError
from ..inputs.processor import Processor, split_media_kwargs
from ..models.cache import PromptCache
from ..models.mlxlm import make_logits_processors, make_sampler
from ..models.model import Model
from .constrain import Constraint, RowGrammar
from .speculative import DEFAULT_DRAFT_STEPS, sampling_distribution

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


@dataclass
class GenerationSettings:
    """The options of a reply, shared by `stream_generate` and `ChatSession` and checked once.

    Sampling and logits processing are mlx-lm's; `max_kv_size` rotates the KV cache (keeping
    the system prompt and the media), `kv_bits` quantizes it, `prompt_lookup` drafts that
    many tokens from n-grams of the conversation; `draft="mtp"` drafts `draft_steps` tokens a
    pass with the checkpoint's multi-token-prediction layer. `thinking_budget` forces `</think>`
    after that many tokens of thinking, so the answer follows. `template_kwargs` reach the chat
    template (e.g. `enable_thinking`), `media_kwargs` the processor (`fps`, `max_frames`,
    `max_pixels`, `min_pixels`; for PDFs `dpi`, `pages`, `max_pdf_pages`). A `constraint`
    (constrain.Constraint) holds the answer to a grammar; it is compiled here, so a schema it
    cannot take is refused before any work.
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
    draft: Optional[str] = None
    draft_steps: int = DEFAULT_DRAFT_STEPS
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
                self.draft in (None, "mtp"),
                f"draft {self.draft!r} is not a drafter; the one there is: mtp.",
            ),
            (
                self.draft_steps >= 1,
                f"draft-steps {self.draft_steps} must be at least 1.",
            ),
            (
                self.draft is None or self.prompt_lookup == 0,
                "choose one drafter: --draft mtp or --prompt-lookup, not both.",
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
                media.get("min_pixels") is None or media["min_pixels"] >= 1,
                f"min-pixels {media.get('min_pixels')} must be a positive number of pixels.",
            ),
            (
                None in (media.get("min_pixels"), media.get("max_pixels"))
                or media["min_pixels"] <= media["max_pixels"],
                f"min-pixels {media.get('min_pixels')} is over max-pixels "
                f"{media.get('max_pixels')}.",
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
        split_media_kwargs(media)  # the PDF options (dpi, pages, max_pdf_pages) checked
        self.template_kwargs = dict(self.template_kwargs or {})
        self.media_kwargs = dict(self.media_kwargs or {})
        if isinstance(self.constraint, dict):  # as sent between ranks (dataclasses.asdict, JSON)
            self.constraint = Constraint(**self.constraint)
        if self.constraint is not None:
            if not isinstance(self.constraint, Constraint):
                raise Glm4vError("constraint must be a mlx_glm4v.Constraint.")
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
            draft=self.draft,
            draft_steps=self.draft_steps,
            distribution=sampling_distribution(
                self.temp, self.top_p if self.top_p < 1 else 1.0, self.min_p, self.top_k
            ),
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
