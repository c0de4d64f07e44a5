"""Attention cut into groups of heads, so that no single call is long.

Heads never mix inside attention: every head is its own product of queries and keys, so an
attention call over a few heads at a time gives the same numbers as one call over all of them.
The serving engine uses this to spread the attention of a large image, or of a long prompt
chunk deep into its context, over several engine turns (its cost grows with queries x keys,
which no smaller chunk of layers can cut).
"""

from typing import Optional

import mlx.core as mx

# Query-key pairs, summed over heads, one call covers at most (one head at least), by device: about
# 0.1 s of attention on two CPU cores (MLX's CPU attention runs at some 15 GFLOP/s there). A GPU
# attends a few hundred times faster, so there only a very large frame is cut (a 6,000-token
# photo, 24,000 patches, on GLM-4.1V's 12-head tower: three heads a call), and no 512-token
# prompt chunk with less than about 128k tokens of context before it.
ATTENTION_PIECE_WORK = {"cpu": 1 << 23, "gpu": 1 << 31}


def heads_per_call(heads: int, kv_heads: int, pairs: int, work: Optional[int] = None) -> int:
    """Query heads one call takes when each head attends `pairs` query-key pairs: as many as fit in
    `work` (by default the device's ATTENTION_PIECE_WORK), in groups that share their key-value
    heads whole (a divisor of the heads each key-value head serves, or a multiple of it that
    divides `heads`)."""
    if work is None:
        work = ATTENTION_PIECE_WORK["gpu" if mx.default_device() == mx.gpu else "cpu"]
    serves = heads // kv_heads
    sizes = [
        g for g in range(1, heads + 1) if heads % g == 0 and (serves % g == 0 or g % serves == 0)
    ]
    fitting = [g for g in sizes if g * pairs <= work]
    return max(fitting) if fitting else 1


def kv_heads_of(first: int, count: int, heads: int, kv_heads: int) -> slice:
    """The key-value heads that query heads [first, first + count) read."""
    serves = heads // kv_heads
    return slice(first // serves, (first + count - 1) // serves + 1)
