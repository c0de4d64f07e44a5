"""Images and videos as items with an identity, so work done on them is never done twice.

The processor hands over all pixel rows of a prompt concatenated; here they are split back
into one item per image or video, each with a digest of its pixels. The digest keys the
`FeatureMemo` (vision features already computed) and tells a chat session whether the media
in its KV cache are the ones a new prompt shows at the same place.
"""

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import numpy as np

from .rope_index import IMAGE, VIDEO, token_types


@dataclass
class MediaItem:
    kind: int  # IMAGE or VIDEO
    rows: np.ndarray  # pixel rows [patches, C*T*P*P]
    grid: np.ndarray  # (t, h, w)

    @cached_property
    def digest(self) -> bytes:
        h = hashlib.blake2b(np.ascontiguousarray(self.rows).tobytes(), digest_size=16)
        h.update(np.asarray(self.grid, np.int64).tobytes())
        return h.digest()


def media_items(
    pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None
) -> list:
    """The images, then the videos, each in prompt order, as separate items."""
    items = []
    for kind, pixels, grids in (
        (IMAGE, pixel_values, image_grid_thw),
        (VIDEO, pixel_values_videos, video_grid_thw),
    ):
        if pixels is None:
            continue
        pixels = np.asarray(pixels)
        grids = np.asarray(grids).reshape(-1, 3)
        bounds = np.cumsum([0] + [int(np.prod(g)) for g in grids])
        items += [
            MediaItem(kind, pixels[a:b], g) for g, a, b in zip(grids, bounds[:-1], bounds[1:])
        ]
    return items


def placed_media(config, input_ids, items: list) -> list:
    """(kind, start, end, item) of each image and video in a token sequence, in token order,
    paired with `items` (the prompt's media, as `media_items` lists them).

    An image is a run of image tokens; a video spans from its begin-of-video to its
    end-of-video token, frames and timestamps included.
    """
    ids = np.asarray(input_ids).reshape(-1)
    types = token_types(
        ids[None], config.image_token_id, config.video_start_token_id, config.video_end_token_id
    ).reshape(-1)
    is_image = np.concatenate([[0], (types == IMAGE).astype(np.int8), [0]])
    starts, ends = np.flatnonzero(np.diff(is_image) == 1), np.flatnonzero(np.diff(is_image) == -1)
    spans = [(IMAGE, int(s), int(e)) for s, e in zip(starts, ends)]
    opens, closes = (
        np.flatnonzero(ids == config.video_start_token_id),
        np.flatnonzero(ids == config.video_end_token_id),
    )
    spans += [(VIDEO, int(s), int(e) + 1) for s, e in zip(opens, closes)]
    queues = {kind: iter([i for i in items if i.kind == kind]) for kind in (IMAGE, VIDEO)}
    return [
        (kind, s, e, next(queues[kind])) for kind, s, e in sorted(spans, key=lambda span: span[1])
    ]


class FeatureMemo(OrderedDict):
    """Vision features by media digest, the most recently used kept: at most `size` items and, with
    `max_bytes`, at most that many bytes (the newest item is kept whatever its size). `hits` and
    `misses` count the lookups, for a server's metrics."""

    def __init__(self, size: int = 16, max_bytes: Optional[int] = None):
        super().__init__()
        self.size, self.max_bytes = size, max_bytes
        self.bytes = self.hits = self.misses = 0

    def get(self, key, default=None):
        if key in self:
            self.hits += 1
            self.move_to_end(key)
            return self[key]
        self.misses += 1
        return default

    def put(self, key, features):
        if key in self:
            self.bytes -= self[key].nbytes
        self[key] = features
        self.bytes += features.nbytes
        self.move_to_end(key)
        while len(self) > self.size or (
            self.max_bytes is not None and self.bytes > self.max_bytes and len(self) > 1
        ):
            _, old = self.popitem(last=False)
            self.bytes -= old.nbytes
