"""A conversation that keeps its KV cache between turns.

Each turn renders the conversation with the checkpoint's template, tokenizes only what is
new and runs it after what the cache already holds: earlier images and videos are never
encoded again, and a reply stays in the cache as it was generated. When the history must be
run again from text (the first turn, a cache that cannot be reused), it is rendered with
the thinking dropped from earlier replies, as the GLM-V authors ask; the cache's longest
common prefix with it (same media at the same places) is still reused.
"""

from dataclasses import dataclass, replace
from typing import Iterator, Optional, Sequence

import numpy as np

from ..inputs.processor import Processor, expand_pdfs, split_media_kwargs, unmark
from ..models.cache import PromptCache
from ..models.media import FeatureMemo, MediaItem, media_items, placed_media
from ..models.model import Model
from ..models.rope_index import IMAGE, VIDEO, rope_index, token_types
from .generate import GenerationResponse, stream_tokens
from .messages import user_message
from .reply import THINKING
from .settings import GenerationSettings, kept_prefix


def drop_thinking(text: str) -> str:
    """A reply as it goes back into the history: without its <think>…</think> part."""
    return THINKING.sub("", text).strip()


@dataclass
class MediaSpan:
    """An image or video at tokens [start, end) of the conversation; `item` holds its pixels
    while they may still need encoding."""

    kind: int
    start: int
    end: int
    item: Optional[MediaItem]
    digest: bytes = b""
    grid: Optional[np.ndarray] = None

    def __post_init__(self):
        if self.item is not None:
            self.digest, self.grid = self.item.digest, self.item.grid

    def without_pixels(self) -> "MediaSpan":
        return replace(self, item=None)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


class ChatSession:
    """One conversation with a loaded model; many sessions can share the model.

    `ask` streams the reply to a new user message (text plus optional images and videos);
    its `progress(stage, done, total)` hears how reading the prompt goes (see `generate_step`).
    `settings` (those of `GenerationSettings`: max_tokens, temp, top_p, ...) are fixed per session.
    """

    def __init__(
        self,
        model: Model,
        processor: Processor,
        system: Optional[str] = None,
        reuse=None,
        **settings,
    ):
        self.model, self.processor, self.system = model, processor, system
        # puts a kept prefix (a prompt cache file's) into a turn's cache when none of it is
        # reused from the session's own: `reuse(inputs, cache)`, see generate.prefill
        self.reuse = reuse
        self.settings = GenerationSettings(**{"max_tokens": 1024, **settings})
        self.cache: Optional[PromptCache] = None
        self.cache_ids: list = []  # the tokens the cache holds, in order
        self.cache_media: list = []  # and its images and videos (MediaSpan)
        self.vision_memo = FeatureMemo()
        self.prompt_ids: list = []  # the whole conversation as the last turn ran it
        self.reset()

    def reset(self):
        """Forget the conversation (the system prompt stays).

        The KV cache and the vision features stay behind the scenes: a new conversation that
        starts the same way (same system prompt, same image) reuses them.
        """
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.history_ids: list = []  # the conversation as the template renders it, tokenized
        self.history_media: list = []  # its images and videos (MediaSpan)
        self.rendered = ""  # ... and as text
        self.tokens_processed = 0  # prompt tokens run through the model in the last turn

    def render(self, add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            self.messages, add_generation_prompt, **self.settings.template_kwargs
        )

    def ask(
        self, text: str, images: Sequence = (), videos: Sequence = (), progress=None
    ) -> Iterator[GenerationResponse]:
        pdf, _ = split_media_kwargs(self.settings.media_kwargs)
        message = expand_pdfs([user_message(text, images, videos)], pdf)[0]
        self.messages.append(message)
        images = [i["image"] for i in message["content"] if i["type"] == "image"]
        full, target, media, common, inputs = self._plan(images, list(videos))
        self.prompt_ids = target  # the whole conversation as this turn runs it
        new_ids = target[common:]
        feed = {
            **inputs,
            "input_ids": np.array([new_ids]),
            "attention_mask": np.ones((1, len(new_ids)), np.int32),
        }
        self.tokens_processed = len(new_ids)
        before = self.cache.offset
        reply = []
        try:
            for response in stream_tokens(
                self.model,
                self.processor,
                feed,
                self.cache,
                stop_ids=self.settings.stop_ids(self.model),
                stop=self.settings.stop,
                vision_memo=self.vision_memo,
                progress=progress,
                reuse=self.reuse if common == 0 else None,
                **self.settings.step_options(self.processor, self.model),
            ):
                reply.append(response)
                yield response
        finally:
            self._settle(full, target, media, before, len(new_ids), reply)

    def _plan(self, images: list, videos: list):
        """What to run: the prompt text, the target tokens of the whole conversation, their
        media, how many of them the cache already holds (it is trimmed to that) and the pixels
        still to encode."""
        full = self.render(add_generation_prompt=True)
        if self.cache is not None and full.startswith(self.rendered):
            inputs = self._process(full[len(self.rendered) :], images, videos)
            ids = inputs["input_ids"][0].tolist()
            base, base_media = self.history_ids, self.history_media
            if not self.cache.can_trim and common_prefix(self.cache_ids, base) < len(
                self.cache_ids
            ):
                # a rotated cache cannot forget: follow it
                base, base_media = self.cache_ids, self.cache_media
            target, media = base + ids, base_media + self._spans(ids, inputs, len(base))
            common = self._reuse(target, media)
            if common >= max((m.end for m in base_media), default=0):
                return full, target, media, common, self._pixels_after(media, common)
        # First turn, or earlier media must be run again: process the whole conversation.
        self.messages = [
            {**m, "content": drop_thinking(m["content"])} if m["role"] == "assistant" else m
            for m in self.messages
        ]
        full = self.render(add_generation_prompt=True)
        images, videos = self.processor.media_from_messages(self.messages)
        inputs = self._process(full, images, videos)
        target = inputs["input_ids"][0].tolist()
        media = self._spans(target, inputs, 0)
        common = self._reuse(target, media)
        return full, target, media, common, self._pixels_after(media, common)

    def _process(self, text: str, images: list, videos: list) -> dict:
        _, media_kwargs = split_media_kwargs(self.settings.media_kwargs)
        return self.processor(text, images=images, videos=videos, **media_kwargs)

    def _spans(self, ids: list, inputs: dict, offset: int) -> list:
        """The media of `ids` (processed into `inputs`) with their places in the conversation."""
        items = media_items(
            inputs.get("pixel_values"),
            inputs.get("image_grid_thw"),
            inputs.get("pixel_values_videos"),
            inputs.get("video_grid_thw"),
        )
        return [
            MediaSpan(kind, start + offset, end + offset, item)
            for kind, start, end, item in placed_media(self.model.config, ids, items)
        ]

    def _reuse(self, target: list, media: list) -> int:
        """Trim the cache to the longest prefix it shares with `target` (the same media at the
        same places included, never half a medium), or start a new cache; returns that length."""
        common = 0
        if self.cache is not None:
            # at least the last token is run again: its logits start the reply
            common = min(common_prefix(self.cache_ids, target), len(target) - 1)
            shown = {m.start: m.digest for m in media}
            for m in self.cache_media:
                if m.start < common and (m.end > common or shown.get(m.start) != m.digest):
                    common = m.start
                    break
            if common < len(self.cache_ids):
                if self.cache.can_trim:
                    self.cache.trim(
                        len(self.cache_ids) - common, self._position_after(target, media, common)
                    )
                else:
                    self.cache, common = None, 0
        if self.cache is None:
            self.cache = self.settings.new_cache(self.model, self.processor, target)
        self.cache.protect(kept_prefix(self.model, self.processor, target))
        self.cache_ids, self.cache_media = target[:common], [m for m in media if m.end <= common]
        return common

    def _position_after(self, target: list, media: list, n: int):
        """Where the conversation continues in M-RoPE space after its first n tokens."""
        cfg = self.model.config
        ids = np.array([target[:n]])
        grids = {
            kind: [m.grid for m in media if m.kind == kind and m.end <= n] or None
            for kind in (IMAGE, VIDEO)
        }
        types = token_types(
            ids, cfg.image_token_id, cfg.video_start_token_id, cfg.video_end_token_id
        )
        return rope_index(
            ids, types, grids[IMAGE], grids[VIDEO], None, cfg.vision_config.spatial_merge_size
        )[1]

    @staticmethod
    def _pixels_after(media: list, common: int) -> dict:
        """Processor outputs for the media from token `common` on (those before are in the cache),
        with the items themselves, whose digests are already taken."""
        out = {"media": []}
        for kind, rows, grids in (
            (IMAGE, "pixel_values", "image_grid_thw"),
            (VIDEO, "pixel_values_videos", "video_grid_thw"),
        ):
            items = [m.item for m in media if m.kind == kind and m.start >= common]
            if items:
                out[rows] = np.concatenate([i.rows for i in items])
                out[grids] = np.stack([i.grid for i in items])
                out["media"] += items
        return out

    def _settle(self, full: str, target: list, media: list, before: int, n_new: int, reply: list):
        """Record what the cache now holds and the reply as the history renders it."""
        media = [m.without_pixels() for m in media]
        # interrupted between layers: start afresh next turn
        if len({c.offset for c in self.cache}) > 1:
            self.cache = None
        else:
            fed = self.cache.offset - before - n_new
            tokens = [r.token for r in reply if r.token is not None]
            # a drafter's round queued past the reply's last token: those columns go
            if fed > len(tokens) and self.cache.can_trim:
                self.cache.trim(fed - len(tokens))
                fed = len(tokens)
            self.cache_ids, self.cache_media = target + tokens[: max(fed, 0)], media
        text = "".join(r.text for r in reply)
        self.messages.append({"role": "assistant", "content": text})
        self.rendered = self.render(add_generation_prompt=False)
        if self.rendered.startswith(full):
            # The reply as generated when it renders as generated (no stop string cut it, no
            # control token left out of its text), so the cache stays valid; else as the
            # tokenizer reads it back, message text as data.
            tail = self.rendered[len(full) :]
            generated = [r.token for r in reply if r.token is not None and r.finish_reason is None]
            same = self.processor.tokenizer.decode(generated) == unmark(tail)
            self.history_ids = target + (
                generated if same else self.processor.tokenizer.encode(tail)
            )
            self.history_media = media
        else:  # a template that rewrites earlier turns: the next turn processes everything
            self.rendered, self.history_ids, self.history_media = "\0", [], []
