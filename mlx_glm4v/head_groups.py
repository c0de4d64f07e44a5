"""Attention cut into groups of heads, so that no single call is long.

Heads never mix inside attention: every head is its own product of queries and keys, so an
attention call over a few heads at a time gives the same numbers as one call over all of them.
The serving engine uses this to spread the attention of a large image, or of a long prompt
chunk deep into its context, over several engine turns (its cost grows with queries x keys,
which no smaller chunk of layers can cut).
"""

from typing import Optional

# Query-key pairs, summed over heads, that one call of a piece covers at most (one head at least):
# about 0.1 s on two CPU cores, a few milliseconds on a Mac's GPU.
ATTENTION_PIECE_WORK = 1 << 23


def heads_per_call(heads: int, kv_heads: int, pairs: int, work: Optional[int] = None) -> int:
    """Query heads one call takes when each head attends `pairs` query-key pairs: as many as fit in
    `work`, in groups that share their key-value heads whole (a divisor of the heads each key-value
    head serves, or a multiple of it that divides `heads`)."""
    work = ATTENTION_PIECE_WORK if work is None else work
    serves = heads // kv_heads
    sizes = [g for g in range(1, heads + 1) if heads % g == 0 and (serves % g == 0 or g % serves == 0)]
    fitting = [g for g in sizes if g * pairs <= work]
    return max(fitting) if fitting else 1


def kv_heads_of(first: int, count: int, heads: int, kv_heads: int) -> slice:
    """The key-value heads that query heads [first, first + count) read."""
    serves = heads // kv_heads
    return slice(first // serves, (first + count - 1) // serves + 1)
