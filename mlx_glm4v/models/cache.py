"""Per-conversation decoding state: mlx-lm's KV caches plus where each sequence continues in
M-RoPE space.

M-RoPE positions run ahead of the token count after an image (an image of 24x24 merged tokens
advances the position by 24, not 576), so the next position of each sequence is kept here,
beside the KV caches it belongs to, and never on the model: one loaded model can serve many
conversations.
"""

import numpy as np

from .mlxlm import (
    BatchKVCache,
    BatchRotatingKVCache,
    KVCache,
    RotatingKVCache,
    create_attention_mask,
)


class PromptCache(list):
    """One KV cache per decoder layer (a plain list to mlx-lm), plus `next_position` [B]."""

    def __init__(self, layers):
        super().__init__(layers)
        self.next_position = None

    @property
    def empty(self) -> bool:
        return self[0].empty()

    @property
    def offset(self) -> int:
        """Tokens stored (padding included) -- the KV length the next token attends over."""
        c = self[0]
        return int(c._idx) if isinstance(c, (BatchKVCache, BatchRotatingKVCache)) else int(c.offset)

    def make_mask(self, embeds):
        """The attention mask for `embeds` about to enter the cache.

        mlx-lm masks a chunk entering a full rotating cache as a sliding window over cache
        slots, which hides the kept prefix (system prompt, images) from all but the first
        queries. Every key a rotating cache still holds is meant to be seen, so a chunk
        gets a plain causal mask over all of them.
        """
        if embeds.shape[1] > 1 and isinstance(self[0], RotatingKVCache):
            return "causal"
        return create_attention_mask(embeds, self[0])

    @property
    def rotating(self) -> bool:
        return isinstance(self[0], (RotatingKVCache, BatchRotatingKVCache))

    @property
    def can_trim(self) -> bool:
        return all(c.is_trimmable() for c in self)

    def trim(self, n: int, next_position=None):
        """Forget the last n tokens. Text tokens take one position each; across an image or a
        video the caller gives the position where the sequence now continues."""
        for c in self:
            c.trim(n)
        self.next_position = self.next_position - n if next_position is None else next_position

    def protect(self, n: int):
        """Let a rotating cache keep its first n tokens from now on, if it has not dropped any
        yet."""
        for c in self:
            if isinstance(c, RotatingKVCache) and c.offset < c.max_size and n < c.max_size:
                c.keep = max(c.keep, n)

    def record(self, prompt):
        """Note a prompt about to be run: its padding (first call only) and where its rows
        continue."""
        if prompt.left_pad.any():
            self.pad_left(prompt.left_pad)
        self.next_position = prompt.next_position

    def pad_left(self, left_padding):
        """Turn the (still empty) per-layer caches into mlx-lm's batch caches for a left-padded
        batch."""
        pads = [int(p) for p in left_padding]
        for i, c in enumerate(self):
            if not c.empty():
                raise ValueError("a padded batch must be the first input of a cache")
            if isinstance(c, RotatingKVCache):
                self[i] = BatchRotatingKVCache(c.max_size, pads)
            elif isinstance(c, KVCache):
                self[i] = BatchKVCache(pads)
            else:
                raise ValueError(f"{type(c).__name__} does not support padded batches")


def make_prompt_cache(num_layers: int, max_kv_size=None, keep: int = 0) -> PromptCache:
    if max_kv_size is not None:
        return PromptCache(
            [RotatingKVCache(max_size=max_kv_size, keep=keep) for _ in range(num_layers)]
        )
    return PromptCache([KVCache() for _ in range(num_layers)])


def left_padding(attention_mask, length: int) -> np.ndarray:
    """Pad count per row of a left-padded mask [B, L]; anything else is refused."""
    mask = np.asarray(attention_mask).astype(bool)
    if mask.ndim != 2 or mask.shape[1] != length:
        raise ValueError(
            f"attention_mask must have shape [batch, {length}], got {list(mask.shape)}"
        )
    pads = length - mask.sum(axis=1)
    cols = np.arange(length)[None]
    if not np.array_equal(mask, cols >= pads[:, None]):
        raise ValueError("attention_mask must be left padding (zeros first, then ones)")
    return pads.astype(np.int64)


def right_padding(attention_mask, length: int) -> bool:
    """Whether a mask [B, length] is right padding (ones first, then zeros) with some padding."""
    mask = np.asarray(attention_mask).astype(bool)
    if mask.ndim != 2 or mask.shape[1] != length or mask.all():
        return False
    return np.array_equal(mask, np.arange(length)[None] < mask.sum(axis=1)[:, None])
