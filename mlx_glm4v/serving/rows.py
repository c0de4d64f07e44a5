"""Rows of a decode batch: one forward pass for many sequences, each computed as if it ran alone.

The weights are read once per step whatever the number of rows; everything that belongs to a
row stays its own. Each row keeps mlx-lm's per-sequence caches (a `PromptCache`, so rotating
and quantized caches work as in single-stream generation) and attends over its own keys only:
left-padding rows into one `BatchKVCache` changes which SIMD lane or thread sums which key, so
a row's attention would depend on the other rows' lengths (measured with OpenBLAS on this CPU;
on a GPU the SDPA kernels split keys across threads too). The projections and the MLP run on
all rows at once; their matrix products are per-row computations.

Sampling is per row too, with the row's own PRNG key: mlx-lm's filters (top-p, min-p, top-k),
then a categorical draw with a key split exactly as `mx.random.seed(seed)` would split the
global one, so a row samples what `stream_generate(..., seed=seed)` samples.
"""

from typing import Optional

import mlx.core as mx
import numpy as np

from ..models.cache import PromptCache
from ..models.language import text_rope
from ..models.mlxlm import apply_min_p, apply_top_k, apply_top_p, scaled_dot_product_attention


class LayerRows:
    """One decoder layer's caches for the rows of a batch; `Attention` calls `attend` on it.

    With `lengths`, row b holds its first lengths[b] columns only (rows with drafts to verify run
    several columns, the others one): the rest is padding that enters no cache and whose
    output is zeros."""

    def __init__(self, caches: list, lengths: Optional[list] = None):
        self.caches = caches
        self.lengths = lengths

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        outs, width = [], q.shape[2]
        for b, cache in enumerate(self.caches):
            n = self.lengths[b] if self.lengths else width
            keys, values = cache.update_and_fetch(k[b : b + 1, :, :n], v[b : b + 1, :, :n])
            out = scaled_dot_product_attention(
                q[b : b + 1, :, :n],
                keys,
                values,
                cache=cache,
                scale=scale,
                mask="causal" if n > 1 else None,
            )
            if n < width:
                pad = mx.zeros((*out.shape[:2], width - n, out.shape[3]), out.dtype)
                out = mx.concatenate([out, pad], axis=2)
            outs.append(out)
        return outs[0] if len(outs) == 1 else mx.concatenate(outs)


def decode_logits(model, caches: list, tokens) -> mx.array:
    """Logits [B, vocab] of one new text token per row (tokens [B], possibly not computed yet);
    each row continues at its own M-RoPE position."""
    offsets = np.array([int(np.asarray(c.next_position).reshape(-1)[0]) for c in caches])
    tokens = tokens if isinstance(tokens, mx.array) else mx.array(tokens)
    embeds = model.language_model.embed_tokens(tokens.reshape(-1, 1))
    rope = text_rope(model.config.text_config, mx.array(offsets))
    layers = [LayerRows([c[i] for c in caches]) for i in range(len(model.layers))]
    hidden = model.language_model(embeds, rope, None, layers)
    for c in caches:
        c.next_position = c.next_position + 1
    return model.logits(hidden[:, -1, :])


def rows_forward(model, caches: list, columns: mx.array, lengths: list) -> mx.array:
    """Hidden states [B, width, dim] of text columns [B, width] (row b's first lengths[b]
    real, the rest padding), each row continuing at its own M-RoPE position in its own cache."""
    offsets = np.array([int(np.asarray(c.next_position).reshape(-1)[0]) for c in caches])
    embeds = model.language_model.embed_tokens(columns)
    rope = text_rope(model.config.text_config, mx.array(offsets))
    layers = [LayerRows([c[i] for c in caches], lengths) for i in range(len(model.layers))]
    hidden = model.language_model(embeds, rope, None, layers)
    for c, n in zip(caches, lengths):
        c.next_position = c.next_position + n
    return hidden


class RowSampler:
    """mlx-lm's sampling chain with a PRNG key of the row's own (seeded like `mx.random.seed`)."""

    def __init__(
        self,
        temp: float,
        top_p: float = 1.0,
        min_p: float = 0.0,
        top_k: int = 0,
        seed: Optional[int] = None,
    ):
        self.temp = temp
        self.filters = []
        if 0 < top_p < 1:
            self.filters.append(lambda x: apply_top_p(x, top_p))
        if min_p != 0:
            self.filters.append(lambda x: apply_min_p(x, min_p, 1))
        if top_k > 0:
            self.filters.append(lambda x: apply_top_k(x, top_k))
        if seed is None:
            seed = int.from_bytes(np.random.default_rng().bytes(4), "little")
        self.key = mx.random.key(seed)

    def next_key(self) -> mx.array:
        """The key of the row's next draw (as the global key sequence gives one)."""
        self.key, draw = mx.random.split(self.key)
        return draw

    def __call__(self, logprobs: mx.array) -> mx.array:
        if self.temp == 0:
            return mx.argmax(logprobs, axis=-1)
        for f in self.filters:
            logprobs = f(logprobs)
        return mx.random.categorical(logprobs * (1.0 / self.temp), key=self.next_key())


class RowState:
    """What a decoding row needs between steps: its cache, sampler, logits processors and
    history."""

    def __init__(self, cache: PromptCache, sampler: RowSampler, processors: list, prompt_ids):
        self.cache = cache
        self.sampler = sampler
        self.processors = processors
        self.history = mx.array(np.asarray(prompt_ids).reshape(-1)) if processors else None

    def process(self, logits: mx.array, allowed: Optional[mx.array] = None) -> mx.array:
        """Log-probabilities [1, vocab] of this row's logits [1, vocab] after its processors;
        tokens not `allowed` (booleans [1, vocab], the row's grammar) at -inf."""
        for p in self.processors:
            logits = p(self.history, logits)
        if allowed is not None:
            logits = mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def sample(self, logits: mx.array, allowed: Optional[mx.array] = None):
        """(token [1], log-probabilities [vocab]) from this row's logits [1, vocab] (`process`)."""
        logprobs = self.process(logits, allowed)
        return self.sampler(logprobs), logprobs.squeeze(0)

    def ran(self, token: mx.array):
        """Note a token fed back as input (processors see the history as single-stream decoding
        does)."""
        if self.processors:
            self.history = mx.concatenate([self.history, token.reshape(-1)])
