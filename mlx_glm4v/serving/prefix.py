"""Prompt prefixes kept after their prefill, so a request that starts the same way starts from them.

A request "starts like" a kept prompt when its tokens agree and every image or video inside the
shared part has the same pixel digest (the tokens of two images of one size are identical). The
shared KV rows are copied into the new request's cache; the rest of its prompt runs on the same
chunk grid a fresh run uses, so the reused rows are the ones that run would have computed.
Prompts with media turn their text with M-RoPE tables, text-only prompts with `mx.fast.rope`;
the two round differently, so an entry serves only prompts of its own kind. Entries are dropped
least recently used first, by bytes. An entry's key includes the identity of the model that
computed it (checkpoint and adapter), so no entry outlives the model it belongs to.
"""

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np

from ..generation.chat import common_prefix
from ..models.media import placed_media
from ..models.mlxlm import KVCache


@dataclass
class PrefixEntry:
    ids: np.ndarray  # [L] prompt token ids
    media: list  # (start, end, digest) per image or video, in token order; None: a text-only prompt
    keys: list  # per layer [1, heads, L, dim]
    values: list
    nbytes: int
    identity: str = ""  # the model that computed it: checkpoint and adapter (PrefixCache)


def media_marks(config, ids: np.ndarray, items: list):
    """(start, end, digest) of each image and video in `ids`; `items` are the prompt's media
    (images, then videos). None for a prompt without media."""
    if not items:
        return None
    return [(start, end, item.digest) for _, start, end, item in placed_media(config, ids, items)]


def shared_length(entry: PrefixEntry, ids: np.ndarray, media: list) -> int:
    """How many leading tokens of a prompt (ids, media marks) the entry holds, media included."""
    if (entry.media is None) != (media is None):
        return 0
    n = common_prefix(entry.ids, ids)
    for i, (start, _, digest) in enumerate(media or ()):
        if start >= n:
            break
        if i >= len(entry.media) or entry.media[i][0] != start or entry.media[i][2] != digest:
            return start
    return n


class PrefixCache:
    """Kept prompts up to `max_bytes`, an entry's size measured by its arrays or, given
    `bytes_per_token`, by its length (the same on every rank, whatever part of the model each
    holds)."""

    def __init__(self, max_bytes: int, bytes_per_token: Optional[int] = None, identity: str = ""):
        self.max_bytes = max_bytes
        self.identity = identity  # the model whose entries these are (checkpoint and adapter)
        self.bytes_per_token = bytes_per_token
        self.entries: "OrderedDict[int, PrefixEntry]" = OrderedDict()
        self.nbytes = 0
        self._next = 0

    def lookup(self, ids: np.ndarray, media: list):
        """(entry, shared token count) of the longest match, or (None, 0)."""
        best, best_n = None, 0
        for key, entry in self.entries.items():
            if entry.identity != self.identity:
                continue
            n = shared_length(entry, ids, media)
            if n > best_n:
                best, best_n, best_key = entry, n, key
        if best is not None:
            self.entries.move_to_end(best_key)
        return best, best_n

    def store(self, ids: np.ndarray, media: list, cache):
        """Keep the prompt held by `cache` (plain KV caches only), unless an entry holds it
        already."""
        if self.max_bytes <= 0 or not all(type(c) is KVCache for c in cache):
            return
        entry, n = self.lookup(ids, media)
        if entry is not None and n == len(ids):
            return
        length = len(ids)
        keys = [mx.contiguous(c.keys[..., :length, :]) for c in cache]
        values = [mx.contiguous(c.values[..., :length, :]) for c in cache]
        mx.eval(keys, values)
        nbytes = (
            self.bytes_per_token * length
            if self.bytes_per_token
            else sum(a.nbytes for a in keys + values)
        )
        if nbytes > self.max_bytes:
            return
        self.entries[self._next] = PrefixEntry(
            np.array(ids), media, keys, values, nbytes, self.identity
        )
        self._next += 1
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= old.nbytes

    @staticmethod
    def restore(entry: PrefixEntry, n: int, cache):
        """Put the entry's first n tokens into an empty cache of plain KV caches."""
        for c, k, v in zip(cache, entry.keys, entry.values):
            c.state = (k[..., :n, :], v[..., :n, :], n)
