"""Prompt prefixes kept after their prefill, so a request that starts the same way starts from them.

A request "starts like" a kept prompt when its tokens agree and every image or video inside the
shared part has the same pixel digest (the tokens of two images of one size are identical). The
shared KV rows are copied into the new request's cache; the rest of its prompt runs on the same
chunk grid a fresh run uses, so the reused rows are the ones that run would have computed.
Prompts with media turn their text with M-RoPE tables, text-only prompts with `mx.fast.rope`;
the two round differently, so an entry serves only prompts of its own kind. Entries are dropped
least recently used first, by bytes. An entry's key includes the identity of the model that
computed it (checkpoint and adapter), so no entry outlives the model it belongs to.

With a disk tier (disk_cache.py) every kept prompt is also written to disk, and a prompt that
starts longer like a file there than like any entry in memory reads that file back.
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
    path: Optional[str] = None  # its disk tier file, once written (disk_cache.py)


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

    def __init__(
        self, max_bytes: int, bytes_per_token: Optional[int] = None, identity: str = "", disk=None
    ):
        self.max_bytes = max_bytes
        self.identity = identity  # the model whose entries these are (checkpoint and adapter)
        self.disk = disk  # a disk_cache.DiskCache keyed by the same identity, or None
        self.bytes_per_token = bytes_per_token
        self.entries: "OrderedDict[int, PrefixEntry]" = OrderedDict()
        self.nbytes = 0
        self._next = 0

    def lookup(self, ids: np.ndarray, media: list):
        """(entry, shared token count) of the longest match in memory or, where longer, on disk;
        or (None, 0)."""
        best, best_n = self._lookup_memory(ids, media)
        if self.disk is not None and best_n < len(ids):
            entry, n = self.disk.lookup(ids, media)
            if n > best_n:
                entry.identity = self.identity  # the file's key named this model
                self._keep(entry)
                return entry, n
        return best, best_n

    def _lookup_memory(self, ids: np.ndarray, media: list):
        best, best_n = None, 0
        for key, entry in self.entries.items():
            if entry.identity != self.identity:
                continue
            n = shared_length(entry, ids, media)
            if n > best_n:
                best, best_n, best_key = entry, n, key
        if best is not None:
            self.entries.move_to_end(best_key)
            if self.disk is not None and best.path is not None:
                self.disk.touch(best.path)  # used: the last to leave the disk too
        return best, best_n

    def flush(self):
        """Wait until every kept prompt is on disk (a disk tier's pending writes)."""
        if self.disk is not None:
            self.disk.flush()

    def store(self, ids: np.ndarray, media: list, cache):
        """Keep the prompt held by `cache` (plain KV caches only), unless an entry holds it
        already."""
        if self.max_bytes <= 0 or not all(type(c) is KVCache for c in cache):
            return
        entry, n = self._lookup_memory(ids, media)
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
        entry = PrefixEntry(np.array(ids), media, keys, values, nbytes, self.identity)
        self._keep(entry)
        if self.disk is not None and not self.disk.holds(entry.ids, media):
            self.disk.save(entry)

    def _keep(self, entry: PrefixEntry):
        self.entries[self._next] = entry
        nbytes = entry.nbytes
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
