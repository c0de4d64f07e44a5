"""3-D (temporal, height, width) positions for multimodal RoPE: pure numpy, no modules.

Mirrors `Glm4vModel.get_rope_index` in transformers. Text tokens count up on all three axes;
the merged tokens of an image (or of one video frame) share the temporal coordinate and spread
over height and width from the current position; afterwards the count resumes at
`current + max(grid_h, grid_w)`. Video frames are separate groups (the timestamp text between
them carries the time), so a video's grid (t, h, w) is used as t frames of (1, h, w).
"""

import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2


def token_types(
    input_ids, image_token_id: int, video_start_id: int, video_end_id: int
) -> np.ndarray:
    """0 for text, 1 for image tokens, 2 for image tokens inside a begin/end-of-video span."""
    ids = np.asarray(input_ids)
    in_video = np.cumsum(ids == video_start_id, axis=-1) > np.cumsum(ids == video_end_id, axis=-1)
    is_vision = ids == image_token_id
    return np.where(is_vision, np.where(in_video, VIDEO, IMAGE), TEXT).astype(np.int32)


def frame_grids(video_grid_thw) -> np.ndarray:
    """Split each video grid (t, h, w) into t frame grids (1, h, w)."""
    grids = np.asarray(video_grid_thw, dtype=np.int64).reshape(-1, 3)
    frames = np.repeat(grids, grids[:, 0], axis=0)
    frames[:, 0] = 1
    return frames


def _runs(types: np.ndarray):
    """(type, start, end) for each maximal run of equal token types."""
    if types.size == 0:
        return
    edges = np.flatnonzero(np.diff(types)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [types.size]])
    for s, e in zip(starts, ends):
        yield int(types[s]), int(s), int(e)


def _vision_positions(grid, start: int, merge: int):
    t, h, w = (int(v) for v in grid)
    gh, gw = h // merge, w // merge
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
    pos = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + start
    return pos, start + max(gh, gw)


def rope_index(
    input_ids,
    types,
    image_grid_thw=None,
    video_grid_thw=None,
    attention_mask=None,
    spatial_merge_size: int = 2,
    start=None,
):
    """Positions [3, B, L] (padding gets 0) and each sequence's next free position [B].

    `start` continues a conversation: the first new token of row b sits at `start[b]`.
    Grids are consumed in order across the batch, as the processor emits them.
    """
    ids = np.asarray(input_ids)
    types = np.asarray(types)
    B, L = ids.shape
    mask = (
        np.ones((B, L), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    )
    start = np.zeros(B, np.int64) if start is None else np.asarray(start, np.int64).reshape(B)
    grids = {
        IMAGE: iter(np.asarray(image_grid_thw, np.int64).reshape(-1, 3))
        if image_grid_thw is not None
        else iter(()),
        VIDEO: iter(frame_grids(video_grid_thw)) if video_grid_thw is not None else iter(()),
    }
    positions = np.zeros((3, B, L), np.int64)
    next_pos = start.copy()
    for b in range(B):
        real = np.flatnonzero(mask[b])
        cur = int(start[b])
        chunks = []
        for kind, s, e in _runs(types[b, real]):
            if kind == TEXT:
                chunks.append(np.broadcast_to(np.arange(cur, cur + e - s), (3, e - s)))
                cur += e - s
                continue
            # One run holds one image or one video frame; consume grids until the run is covered.
            need = e - s
            while need > 0:
                grid = next(grids[kind], None)
                if grid is None:
                    raise ValueError(
                        f"more {'video' if kind == VIDEO else 'image'} tokens than grids were given"
                    )
                pos, cur = _vision_positions(grid, cur, spatial_merge_size)
                chunks.append(pos)
                need -= pos.shape[1]
            if need < 0:
                raise ValueError(
                    "a vision grid does not match the number of its placeholder tokens"
                )
        if chunks:
            seq = np.concatenate(chunks, axis=1)
            positions[:, b, real] = seq
            next_pos[b] = seq.max() + 1
    return positions, next_pos
