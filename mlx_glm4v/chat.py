"""A conversation that keeps its KV cache between turns.

Each turn renders the whole conversation with the checkpoint's template (thinking dropped
from earlier replies, as the GLM-V authors ask), tokenizes only what is new, and reuses the
cache for the longest common prefix with what it already holds: earlier images and videos
are never encoded again, and a reply whose thinking was dropped is re-read as text only.
"""

import re
from typing import Iterator, Optional, Sequence

import numpy as np

from .cache import PromptCache
from .generate import (
    GenerationResponse,
    kept_prefix,
    media_end,
    new_cache,
    sampling,
    stop_token_ids,
    stream_tokens,
    user_message,
)
from .model import Model
from .processor import Processor

_THINKING = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)


def drop_thinking(text: str) -> str:
    """A reply as it goes back into the history: without its <think>…</think> part."""
    return _THINKING.sub("", text).strip()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


class ChatSession:
    """One conversation with a loaded model; many sessions can share the model.

    `ask` streams the reply to a new user message (text plus optional images and videos).
    Generation options (max_tokens, temp, top_p, top_k, min_p, repetition_penalty,
    prefill_step_size, stop, ignore_eos, ...) are fixed per session.
    """

    def __init__(
        self,
        model: Model,
        processor: Processor,
        system: Optional[str] = None,
        *,
        max_tokens: int = 1024,
        temp: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: Optional[float] = None,
        repetition_context_size: int = 20,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        max_kv_size: Optional[int] = None,
        kv_bits: Optional[int] = None,
        kv_group_size: int = 64,
        quantized_kv_start: int = 0,
        prefill_step_size: int = 2048,
        prompt_lookup: int = 0,
        template_kwargs: Optional[dict] = None,
        media_kwargs: Optional[dict] = None,
    ):
        self.model, self.processor, self.system = model, processor, system
        self.sampler, self.logits_processors = sampling(temp, top_p, top_k, min_p, repetition_penalty, repetition_context_size)
        self.stop, self.stop_ids = stop, stop_token_ids(model, ignore_eos)
        self.max_kv_size, self.kv_bits = max_kv_size, kv_bits
        self.step_options = dict(max_tokens=max_tokens, prefill_step_size=prefill_step_size, kv_bits=kv_bits,
                                 kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start,
                                 prompt_lookup=prompt_lookup)
        self.template_kwargs = template_kwargs or {}
        self.media_kwargs = media_kwargs or {}
        self.reset()

    def reset(self):
        """Forget the conversation (the system prompt stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache: Optional[PromptCache] = None
        self.cache_ids: list = []  # the tokens the cache holds, in order
        self.history_ids: list = []  # the conversation as the template renders it, tokenized
        self.rendered = ""  # ... and as text
        self.tokens_processed = 0  # prompt tokens run through the model in the last turn

    def render(self, add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(self.messages, add_generation_prompt, **self.template_kwargs)

    def ask(self, text: str, images: Sequence = (), videos: Sequence = ()) -> Iterator[GenerationResponse]:
        self.messages.append(user_message(text, images, videos))
        full = self.render(add_generation_prompt=True)
        target, common, inputs = self._plan(full, images, videos)
        new_ids = target[common:]
        feed = {**inputs, "input_ids": np.array([new_ids]), "attention_mask": np.ones((1, len(new_ids)), np.int32)}
        feed.pop("mm_token_type_ids", None)
        self.tokens_processed = len(new_ids)
        before = self.cache.offset
        reply = []
        try:
            for response in stream_tokens(self.model, self.processor, feed, self.cache, stop_ids=self.stop_ids,
                                          stop=self.stop, sampler=self.sampler,
                                          logits_processors=self.logits_processors, **self.step_options):
                reply.append(response)
                yield response
        finally:
            self._settle(full, target, before, len(new_ids), reply)

    def _plan(self, full: str, images, videos):
        """(target ids of the whole conversation, how many the cache already holds, processor outputs)."""
        if self.cache is not None and full.startswith(self.rendered):
            inputs = self.processor(full[len(self.rendered):], images=list(images), videos=list(videos), **self.media_kwargs)
            target = self.history_ids + inputs["input_ids"][0].tolist()
            common = common_prefix(self.cache_ids, target)
            if common < len(self.cache_ids) and not self.cache.can_trim:
                # A rotated cache cannot forget: the next turn follows what it holds.
                target, common = self.cache_ids + inputs["input_ids"][0].tolist(), len(self.cache_ids)
            elif common < len(self.cache_ids):
                self.cache.trim(len(self.cache_ids) - common)
                self.cache_ids = self.cache_ids[:common]
            if common >= media_end(self.model, self.history_ids):
                self.cache.protect(kept_prefix(self.model, self.processor, target))
                return target, common, inputs
        # First turn, or the cache cannot be reused: render and encode everything afresh.
        all_images, all_videos = self.processor.media_from_messages(self.messages)
        inputs = self.processor(full, images=all_images, videos=all_videos, **self.media_kwargs)
        target = inputs["input_ids"][0].tolist()
        self.cache = new_cache(self.model, self.processor, target, self.max_kv_size, self.kv_bits)
        self.cache_ids = []
        return target, 0, inputs

    def _settle(self, full: str, target: list, before: int, n_new: int, reply: list):
        """Record what the cache now holds and the reply as the history renders it."""
        if len({c.offset for c in self.cache}) > 1:  # interrupted between layers: start afresh next turn
            self.cache = None
        else:
            fed = self.cache.offset - before - n_new
            tokens = [r.token for r in reply if r.token is not None]
            self.cache_ids = target + tokens[:max(fed, 0)]
        self.messages.append({"role": "assistant", "content": drop_thinking("".join(r.text for r in reply))})
        self.rendered = self.render(add_generation_prompt=False)
        if self.rendered.startswith(full):
            self.history_ids = target + self.processor.tokenizer.encode(self.rendered[len(full):])
        else:
            self.cache = None
