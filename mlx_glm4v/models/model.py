"""GLM-V: the vision tower and the text decoder glued by token embeddings and 3-D positions.

Mirrors transformers' `Glm4vForConditionalGeneration`; `Glm4vMoeForConditionalGeneration` and
`Glm46VForConditionalGeneration` differ only in the text decoder, which the config picks
(language.py for GLM-4.1V's, moe.py for GLM-4.5V's experts). Vision features replace the image
tokens in the embeddings; an image token inside a begin/end-of-video span takes video
features instead, so a prompt may carry images and videos together. `GlmOcrForConditionalGeneration`
is the same glue over GLM-OCR's tower and text model; its multi-token-prediction layer, when the
checkpoint carries one, is `Model.mtp` (mtp.py).
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..errors import Glm4vError
from .cache import PromptCache, left_padding, make_prompt_cache, right_padding
from .config import ModelConfig, MoeTextConfig
from .language import TextModel, multimodal_rope, text_rope
from .loss import CausalLMOutput, labelled_lm_loss
from .media import FeatureMemo, media_items
from .mlxlm import create_causal_mask
from .moe import MoeTextModel, stack_experts
from .moe import cast_predicate as moe_cast_predicate
from .mtp import MTPLayer, mtp_name
from .rope_index import IMAGE, VIDEO, frame_grids, rope_index, token_types
from .vision import VisionModel


@dataclass
class Prompt:
    """Tokens ready for the decoder: embeddings and where each column sits in M-RoPE space."""

    embeds: mx.array  # [B, L, hidden]
    positions: Optional[np.ndarray]  # [3, B, L] when vision tokens are present, else None
    offsets: np.ndarray  # [B]: without vision, column j of row b sits at offsets[b] + j
    next_position: np.ndarray  # [B]: where each row continues after this prompt
    left_pad: np.ndarray  # [B]

    @property
    def length(self) -> int:
        return self.embeds.shape[1]


# checkpoint prefix -> our module path: transformers' published layout, then mlx-vlm's.
WEIGHT_PREFIXES = (
    ("model.visual.", "visual."),
    ("model.language_model.", "language_model."),
    ("vision_tower.", "visual."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
)


def checkpoint_name(key: str) -> str:
    """A checkpoint's tensor name (or module path followed by ".") under our module paths."""
    for old, new in WEIGHT_PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


# Patches the vision tower takes at once (a few hundred MB of activations for GLM-4.1V's tower).
VISION_CHUNK_PATCHES = 16384


@dataclass
class VisionPiece:
    rows: np.ndarray  # pixel rows of the frames
    grids: np.ndarray  # their grids, one (1, h, w) per frame or temporal group
    start: int  # tower blocks [start, end): start 0 begins the frames, end == depth finishes them
    end: int
    heads: Optional[tuple] = None  # (first, count): these attention heads of block `start` alone

    @property
    def kind(self) -> str:
        return "vision" if self.heads is None else "attention"

    @property
    def work(self) -> int:
        """Patches x blocks; for a piece of heads, query-key pairs x heads (the engine's cost
        units)."""
        sizes = np.prod(self.grids, axis=1)
        if self.heads is not None:
            return int((sizes * sizes).sum()) * self.heads[1]
        return int(sizes.sum()) * (self.end - self.start)


@dataclass
class DecoderPass:
    """A prompt chunk part-way through the decoder layers (`Model.begin_pass`)."""

    h: mx.array
    rope: tuple
    mask: object
    last_rope: Optional[tuple]
    last_only: bool
    layer: int = 0  # the next layer to run; all of them run: h is the output
    # (queries, keys, values, head outputs so far) of a layer part-way
    attention: Optional[tuple] = None

    @property
    def heads_run(self) -> int:
        """Head groups of the current layer's attention already run (`Model.run_heads`)."""
        return len(self.attention[3]) if self.attention is not None else 0


def _host(x):
    return None if x is None else np.asarray(x)


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.visual = VisionModel(config.vision_config)
        moe = isinstance(config.text_config, MoeTextConfig)
        self.language_model = (MoeTextModel if moe else TextModel)(config.text_config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(
                config.text_config.hidden_size, config.text_config.vocab_size, bias=False
            )

    def sanitize(self, weights: dict) -> dict:
        """Checkpoint tensors under our names and layouts: known prefixes renamed, rotary
        buffers dropped, convolutions moved channels-last unless they already are; for a
        mixture-of-experts text model, experts stacked for SwitchGLU."""
        expected = dict(tree_flatten(self.parameters()))
        out = {}
        for key, value in weights.items():
            if "rotary_emb.inv_freq" in key:
                continue
            key = checkpoint_name(key)
            want = expected.get(key)
            if want is not None and value.ndim in (4, 5) and value.shape != want.shape:
                value = value.transpose(0, *range(2, value.ndim), 1)
            out[key] = value
        text = self.config.text_config
        mtp = f"language_model.layers.{text.num_hidden_layers}."
        if isinstance(text, MoeTextConfig):
            # transformers skips the multi-token-prediction layer GLM-4.5 checkpoints may append
            return stack_experts(
                {k: v for k, v in out.items() if not k.startswith(mtp)}, text.n_routed_experts
            )
        if self.holds_mtp(out):
            self.add_mtp()
        kept = {}
        for key, value in out.items():
            if key.startswith(mtp):
                key = mtp_name(key[len(mtp) :])
                if key is None:  # the layer's copy of the embeddings or the head
                    continue
                key = "mtp." + key
            kept[key] = value
        return kept

    def holds_mtp(self, names) -> bool:
        """Whether checkpoint tensors `names` (any layout) carry a multi-token-prediction layer
        this model runs: GLM-OCR's after its last decoder layer, or one we wrote (`mtp.`).
        Mixture-of-experts models drop theirs, as transformers does."""
        text = self.config.text_config
        if isinstance(text, MoeTextConfig):
            return False
        prefix = f"language_model.layers.{text.num_hidden_layers}."
        for name in names:
            name = checkpoint_name(name)
            if name.startswith("mtp.") or (
                name.startswith(prefix) and mtp_name(name[len(prefix) :]) is not None
            ):
                return True
        return False

    def add_mtp(self):
        """Give the model its multi-token-prediction layer (mtp.py); it exists when the
        checkpoint carries it."""
        if "mtp" not in self:
            self.mtp = MTPLayer(self.config.text_config)

    @property
    def cast_predicate(self):
        """Which tensors a dtype cast may touch (mlx-lm's convention): all but the MoE routers,
        which transformers keeps in float32."""
        return moe_cast_predicate

    @property
    def layers(self):
        """The decoder layers this process runs (all of them unless `pipeline` kept a part)."""
        return self.language_model.layers

    def shard(self, group) -> list:
        """Tensor parallelism over `group` (mx.distributed): attention heads, MLP and expert
        features split across ranks; the vision tower, embeddings, norms, routers and head stay
        whole. Returns the decoder sub-modules kept whole because their widths do not divide."""
        return [f"language_model.{name}" for name in self.language_model.shard(group)]

    def pipeline(self, group):
        """Pipeline parallelism over `group`: this rank keeps its run of decoder layers only."""
        self.language_model.pipeline(group)

    def make_cache(self, max_kv_size: Optional[int] = None, keep: int = 0) -> PromptCache:
        return make_prompt_cache(len(self.layers), max_kv_size, keep)

    def encode_media(
        self,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        memo: Optional[FeatureMemo] = None,
        items: Optional[list] = None,
        progress=None,
    ):
        """Image features and video features (each [tokens, hidden] or None).

        Everything not found in `memo` (by pixel digest) goes through the tower in one pass;
        video frames are separate attention segments, as in transformers.
        """
        if items is None:
            items = media_items(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        if not items:
            return None, None
        keys = [item.digest for item in items] if memo is not None else [None] * len(items)
        found = [memo.get(k) if memo is not None else None for k in keys]
        todo = [i for i, f in enumerate(found) if f is None]
        if todo:
            grids = [
                frame_grids(items[i].grid) if items[i].kind == VIDEO else items[i].grid[None]
                for i in todo
            ]
            merge = self.config.vision_config.spatial_merge_size**2
            sizes = [int(np.prod(g, axis=1).sum()) // merge for g in grids]
            features = self.encode_frames(
                np.concatenate([items[i].rows for i in todo]),
                np.concatenate(grids),
                progress=progress,
            )
            for i, part in zip(todo, mx.split(features, np.cumsum(sizes)[:-1].tolist())):
                found[i] = part
                if memo is not None:
                    memo.put(keys[i], part)
        image = [f for item, f in zip(items, found) if item.kind == IMAGE]
        video = [f for item, f in zip(items, found) if item.kind == VIDEO]
        return (mx.concatenate(image) if image else None), (
            mx.concatenate(video) if video else None
        )

    def vision_pieces(self, item, patches: int, work: int) -> list:
        """One media item's vision work as `VisionPiece`s, in order: frames of at most about
        `patches` patches (one frame at least) through as many blocks as keep patches x blocks
        within `work` (one block at least).

        A video's temporal groups never attend to each other, so they go a few at a time; each
        group's activations are carried from block to block as in one pass. Frames whose
        attention the tower splits by heads (`VisionAttention.head_groups`) take a block a head
        group a piece. The cuts follow from the item's grid alone, so every rank makes the same
        ones, and running the pieces in order gives the whole pass's features bit for bit.
        """
        grids = (
            frame_grids(item.grid) if item.kind == VIDEO else np.asarray(item.grid, np.int64)[None]
        )
        sizes = np.prod(grids, axis=1)
        depth = len(self.visual.blocks)
        attn = self.visual.blocks[0].attn
        pieces, first, row = [], 0, 0
        while first < len(grids):
            last, n = first + 1, int(sizes[first])
            while last < len(grids) and n + sizes[last] <= patches:
                n, last = n + int(sizes[last]), last + 1
            rows, frames = item.rows[row : row + n], grids[first:last]
            groups = attn.head_groups(int(sizes[first]))
            if len(groups) > 1:  # a block a head group a piece
                pieces += [
                    VisionPiece(rows, frames, b, b + 1, group)
                    for b in range(depth)
                    for group in groups
                ]
            else:
                step = max(1, work // n)
                pieces += [
                    VisionPiece(rows, frames, s, min(depth, s + step))
                    for s in range(0, depth, step)
                ]
            first, row = last, row + n
        return pieces

    def run_vision_piece(self, piece: VisionPiece, tower=None) -> tuple:
        """Run one of `vision_pieces` on `tower`, its frames' state (None before their first
        piece): (the state to carry to the next piece, None) or, once the frames leave the tower,
        (None, their features)."""
        visual = self.visual
        if tower is None:
            tower = visual.begin(piece.rows, piece.grids)
        if piece.heads is None:
            visual.run_blocks(tower, piece.start, piece.end)
            done = True
        else:
            done = visual.run_heads(tower, piece.start, *piece.heads)
        if piece.end < len(visual.blocks) or not done:
            return tower, None
        features = visual.finish(tower)
        mx.eval(features)
        return None, features

    def encode_frames(
        self, rows: np.ndarray, grids: np.ndarray, chunk: Optional[int] = None, progress=None
    ) -> mx.array:
        """Features of frames (grids t = 1), about `chunk` patches through the tower at a time.

        Frames never attend to each other, so a long video is encoded in pieces, each
        evaluated before the next starts: activations stay those of one piece, not of the
        whole clip. Inputs within one piece stay lazy. `progress("vision", done, total)`
        hears the frames done after each piece.
        """
        chunk = chunk or VISION_CHUNK_PATCHES
        patches = np.prod(grids, axis=1)
        if patches.sum() <= chunk:
            return self.visual(rows, grids)
        ends = np.cumsum(patches)
        parts, first = [], 0
        while first < len(grids):
            last = max(
                first + 1, int(np.searchsorted(ends, ends[first] - patches[first] + chunk, "right"))
            )
            start, stop = ends[first] - patches[first], ends[last - 1]
            parts.append(self.visual(rows[start:stop], grids[first:last]))
            mx.eval(parts[-1])
            first = last
            if progress is not None:
                progress("vision", first, len(grids))
        return mx.concatenate(parts)

    def embed(self, ids: np.ndarray, types: np.ndarray, image, video) -> mx.array:
        """Token embeddings with image and video features scattered over their tokens, by type."""
        h = self.language_model.embed_tokens(mx.array(ids))
        slots, features = [], []
        for kind, feats, name in ((IMAGE, image, "image"), (VIDEO, video, "video")):
            where = np.flatnonzero(types.reshape(-1) == kind)
            n = 0 if feats is None else feats.shape[0]
            if len(where) != n:
                raise ValueError(
                    f"the prompt has {len(where)} {name} tokens but the {name}s give {n} features"
                )
            if n:
                slots.append(where)
                features.append(feats)
        if not slots:
            return h
        B, L, D = h.shape
        h = h.reshape(B * L, D)
        h[mx.array(np.concatenate(slots))] = mx.concatenate(features).astype(h.dtype)
        return h.reshape(B, L, D)

    def prepare(
        self,
        input_ids,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        attention_mask=None,
        cache: Optional[PromptCache] = None,
        vision_memo: Optional[FeatureMemo] = None,
        media: Optional[list] = None,
        progress=None,
    ) -> Prompt:
        """Embeddings and positions for new tokens, continuing the sequences held in `cache`.

        `attention_mask` describes the given tokens only and must be left padding, allowed on
        the first call into a cache; without a cache it may be right padding too (as batches are
        padded for training), whose pad columns no real column sees. Without pixels every token
        is text and no host copy of `input_ids` is made, so decoding stays asynchronous. Media
        found in `vision_memo` are not encoded again; `media`, the same pixels already split into
        `MediaItem`s (images, then videos), spares hashing them twice. `progress` hears how a long
        video's encoding goes.
        """
        B, L = input_ids.shape
        fresh = cache is None or cache.empty
        start = np.zeros(B, np.int64) if fresh else cache.next_position
        pads = np.zeros(B, np.int64)
        if attention_mask is not None and not (cache is None and right_padding(attention_mask, L)):
            pads = left_padding(attention_mask, L)
        if pads.any() and not fresh:
            raise ValueError("padding is only allowed on the first call into a cache")
        if pixel_values is None and pixel_values_videos is None:
            embeds = self.language_model.embed_tokens(mx.array(input_ids))
            return Prompt(embeds, None, start - pads, start + L - pads, pads)
        cfg = self.config
        ids = np.asarray(input_ids)
        types = token_types(
            ids, cfg.image_token_id, cfg.video_start_token_id, cfg.video_end_token_id
        )
        image, video = self.encode_media(
            pixel_values,
            image_grid_thw,
            pixel_values_videos,
            video_grid_thw,
            vision_memo,
            media,
            progress,
        )
        positions, next_position = rope_index(
            ids,
            types,
            _host(image_grid_thw),
            _host(video_grid_thw),
            _host(attention_mask),
            cfg.vision_config.spatial_merge_size,
            start,
        )
        return Prompt(self.embed(ids, types, image, video), positions, None, next_position, pads)

    def forward(
        self,
        prompt: Prompt,
        cache: Optional[PromptCache] = None,
        start: int = 0,
        end=None,
        last_only: bool = False,
    ) -> mx.array:
        """Hidden states (after the final norm) of the prompt's columns [start, end), or with
        `last_only` of column end - 1 alone ([B, 1, hidden]): the last layer then runs its
        queries, output and MLP for that column only, keys and values for all.

        Chunks must be run in order; the caller records the prompt in the cache first
        (`cache.record(prompt)`), as `__call__` does.
        """
        p = self.begin_pass(prompt, cache, start, end, last_only)
        p.h = self.language_model(p.h, p.rope, p.mask, cache, p.last_rope)
        return p.h[:, -1:] if last_only else p.h

    def begin_pass(
        self,
        prompt: Prompt,
        cache: Optional[PromptCache],
        start: int = 0,
        end=None,
        last_only: bool = False,
    ) -> "DecoderPass":
        """A chunk's pass through the decoder before its layers: `forward`, or `run_layers` a few
        layers at a time (the same operations, so the same bits) and then `end_pass`."""
        end = prompt.length if end is None else end
        embeds = prompt.embeds[:, start:end]
        rope = self._rope(prompt, start, end, embeds.dtype)
        mask = self._mask(prompt, cache, embeds, start)
        last_rope = (
            self._rope(prompt, end - 1, end, embeds.dtype)
            if last_only and end - start > 1
            else None
        )
        return DecoderPass(embeds, rope, mask, last_rope, last_only)

    def _rope(self, prompt: Prompt, start: int, end: int, dtype):
        """The rotation of the prompt's columns [start, end)."""
        cfg = self.config.text_config
        if prompt.positions is not None:
            return multimodal_rope(cfg, prompt.positions[:, :, start:end], dtype)
        offsets = prompt.offsets + start
        return text_rope(cfg, int(offsets[0]) if offsets.size == 1 else mx.array(offsets))

    @staticmethod
    def _mask(prompt: Prompt, cache, embeds: mx.array, start: int = 0):
        """The attention mask of `embeds`, the prompt's columns from `start`, entering `cache`."""
        if cache is not None:
            return cache.make_mask(embeds)
        length = embeds.shape[1]
        if prompt.left_pad.any():
            return create_causal_mask(length, start, left_padding=mx.array(prompt.left_pad))
        return "causal" if length > 1 else None

    def make_mtp_cache(self, max_kv_size: Optional[int] = None, keep: int = 0) -> PromptCache:
        """The multi-token-prediction layer's own KV cache (one layer)."""
        return make_prompt_cache(1, max_kv_size, keep)

    def mtp_forward(
        self,
        prompt: Prompt,
        next_tokens,
        hidden: mx.array,
        cache: Optional[PromptCache] = None,
        start: int = 0,
        end=None,
        return_hidden: bool = False,
    ):
        """The MTP layer's logits [B, L, vocab] for the prompt's columns [start, end): each
        column's main hidden state `hidden` (what `__call__(return_hidden=True)` gives) and
        `next_tokens` [B, L], the token after each column. The layer runs at the main model's
        positions of those columns and zeroes the embedding where the position is 0 (mtp.py).
        `cache` (`make_mtp_cache`) follows the prompt as the model's does: the caller records the
        prompt in it first. With `return_hidden`, (logits, the layer's output): what a chained
        step takes as its hidden state."""
        end = prompt.length if end is None else end
        embeds = self.language_model.embed_tokens(mx.array(next_tokens))
        rope, mask = (
            self._rope(prompt, start, end, embeds.dtype),
            self._mask(prompt, cache, embeds, start),
        )
        if prompt.positions is not None:
            at_zero = prompt.positions[0, :, start:end] == 0
        else:
            at_zero = (prompt.offsets[:, None] + np.arange(start, end)[None]) == 0
        h = self.mtp(embeds, hidden, rope, mask, cache[0] if cache else None, mx.array(at_zero))
        logits = self.logits(self.mtp.head_input(h))
        return (logits, h) if return_hidden else logits

    def mtp_step(self, tokens: mx.array, hidden: mx.array, cache: PromptCache, offsets):
        """One chained MTP step for text columns: logits [B, 1, vocab] and the layer's output
        [B, 1, dim], from `tokens` [B, 1] (the drafts just made), `hidden` [B, 1, dim] (the
        layer's previous output) at M-RoPE positions `offsets` [B] (never 0)."""
        embeds = self.language_model.embed_tokens(tokens)
        offsets = np.asarray(offsets).reshape(-1)
        rope = text_rope(
            self.config.text_config, int(offsets[0]) if offsets.size == 1 else mx.array(offsets)
        )
        h = self.mtp(embeds, hidden, rope, cache.make_mask(embeds), cache[0])
        return self.logits(self.mtp.head_input(h)), h

    def run_layers(self, p: "DecoderPass", cache: PromptCache, count: int):
        """The pass's next `count` decoder layers, evaluated with their caches (no pipeline
        split)."""
        layers = self.language_model.layers
        for i in range(p.layer, min(len(layers), p.layer + count)):
            last = i == len(layers) - 1 and p.last_rope is not None
            p.h = (
                layers[i](p.h, p.rope, p.mask, cache[i], p.last_rope)
                if last
                else layers[i](p.h, p.rope, p.mask, cache[i])
            )
            mx.eval(p.h, cache[i].state)
            p.layer = i + 1
        self._end_pass(p)

    def head_groups(self, layer: int, queries: int, keys: int, last_only: bool) -> Optional[list]:
        """(first, count) of each piece of layer `layer`'s attention when a chunk's is long
        enough to split by heads (head_groups.py); None: the layer runs whole. Never under a
        pipeline split, nor for a last layer that answers one column. Follows from the chunk
        alone: every rank cuts alike."""
        layers = self.language_model.layers
        if self.language_model.pipeline_group is not None or (
            layer == len(layers) - 1 and last_only
        ):
            return None
        groups = layers[layer].self_attn.head_groups(queries, keys)
        return groups if len(groups) > 1 else None

    def run_heads(self, p: "DecoderPass", cache: PromptCache, first: int, count: int):
        """Query heads [first, first + count) of the pass's current layer (`head_groups`): its norm,
        projections and cache update with the first ones, the rest of the layer after the last;
        the layer in several calls, the same operations as `run_layers`. Evaluated."""
        layer, c = self.language_model.layers[p.layer], cache[p.layer]
        attn = layer.self_attn
        if p.attention is None:
            q, k, v = attn.project(layer.input_layernorm(p.h), p.rope)
            p.attention = (q, *c.update_and_fetch(k, v), [])
        q, k, v, parts = p.attention
        parts.append(attn.attend(q, k, v, p.mask, c, (first, count)))
        if first + count < attn.n_heads:
            mx.eval(parts[-1], c.state)
            return
        p.h = layer.finish(
            p.h, attn.output(mx.concatenate(parts, axis=1) if len(parts) > 1 else parts[0])
        )
        p.attention = None
        mx.eval(p.h, c.state)
        p.layer += 1
        self._end_pass(p)

    def _end_pass(self, p: "DecoderPass"):
        if p.layer == len(self.language_model.layers):
            p.h = self.language_model.norm(p.h)
            p.h = p.h[:, -1:] if p.last_only else p.h

    def logits(self, hidden: mx.array) -> mx.array:
        if self.config.tie_word_embeddings:
            return self.language_model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)

    def __call__(
        self,
        input_ids,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        attention_mask=None,
        cache: Optional[PromptCache] = None,
        labels=None,
        return_hidden: bool = False,
        num_items: Optional[int] = None,
        vision_memo: Optional[FeatureMemo] = None,
    ):
        """Logits [B, L, vocab]. With a cache, later calls take only the new tokens (see
        `prepare`). With `labels` [B, L] (-100 where nothing is learnt; transformers' convention)
        a `CausalLMOutput`: the loss (loss.py; summed over `num_items` when given, the labelled
        tokens of a whole accumulated step), from the head at the labelled columns alone, and
        the logits of every column, lazy: computed only if evaluated. Training takes the pass
        without a cache, the one `mlx.nn.value_and_grad` differentiates. Media found in
        `vision_memo` are not encoded again (see `prepare`). With `return_hidden`, (logits,
        hidden states after the final norm): what the MTP layer drafts from, at no extra cost."""
        if labels is not None and cache is not None:
            raise ValueError("labels are for a pass without a cache")
        if labels is not None and getattr(self.config.text_config, "output_router_logits", False):
            raise Glm4vError(
                "config.json's text_config.output_router_logits is true, which adds transformers' "
                "load-balancing loss; mlx-glm4v computes the language-model loss alone, so set it "
                "to false."
            )
        prompt = self.prepare(
            input_ids,
            pixel_values,
            image_grid_thw,
            pixel_values_videos,
            video_grid_thw,
            attention_mask,
            cache,
            vision_memo,
        )
        if cache is not None:
            cache.record(prompt)
        hidden = self.forward(prompt, cache)
        logits = self.logits(hidden)
        if labels is not None:
            loss = labelled_lm_loss(hidden, self.logits, labels, num_items)
            return CausalLMOutput(loss, logits)
        return (logits, hidden) if return_hidden else logits
