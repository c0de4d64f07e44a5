"""The vision tower in pieces (model.vision_pieces), prompt chunks a few decoder layers at a time
(model.run_layers) and attention a few heads a call (head_groups.py) give the whole pass's results
bit for bit."""

import mlx.core as mx
import pytest
from helpers import clip, cut_attention, picture

from mlx_glm4v.checkpoints.loader import load
from mlx_glm4v.generation.messages import build_messages
from mlx_glm4v.inputs.video import Video
from mlx_glm4v.models.head_groups import heads_per_call, kv_heads_of
from mlx_glm4v.models.media import media_items


def items_of(processor, images=(), videos=()):
    messages = build_messages("Look.", images, videos, None)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    media_images, media_videos = processor.media_from_messages(messages)
    inputs = processor(text, images=media_images, videos=media_videos)
    return media_items(
        *(
            inputs.get(k)
            for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
        )
    )


def in_pieces(model, item, patches, work):
    pieces = model.vision_pieces(item, patches, work)
    parts, tower = [], None
    for piece in pieces:
        tower, features = model.run_vision_piece(piece, tower)
        if features is not None:
            parts.append(features)
    return len(pieces), mx.concatenate(parts)


def test_head_groups_keep_key_value_heads_whole():
    assert heads_per_call(16, 2, 100, work=10**9) == 16
    assert heads_per_call(16, 2, 100, work=800) == 8  # one key-value head's eight query heads
    assert heads_per_call(16, 2, 100, work=500) == 4  # half of them
    assert heads_per_call(16, 2, 100, work=50) == 1  # one at least
    assert heads_per_call(12, 4, 100, work=700) == 6  # two whole groups of three, not four heads
    assert heads_per_call(12, 4, 100, work=250) == 1  # 2 does not divide a group of three
    assert [kv_heads_of(f, 2, 8, 2) for f in (0, 2, 4, 6)] == [slice(0, 1)] * 2 + [slice(1, 2)] * 2
    assert kv_heads_of(0, 8, 8, 2) == slice(0, 2)


# GLM-OCR's tower (no position embedding, per-head query/key norms, biases) and text model (head_dim
# wider than hidden/heads, full rotary) cut as the others are
FAMILIES = ["glm4v", "glm4v_moe", "glm_ocr"]

# (patches, work): everything at once, one frame through one block at a time, and in between
GROUPINGS = [(10**9, 10**9), (1, 1), (70, 150), (200, 10**9)]


# query-key pairs a call: every head in one call, or one head a call for all but the smallest frames
WORKS = {"whole": 10**12, "heads": 1000}


@pytest.mark.parametrize("heads", sorted(WORKS))
@pytest.mark.parametrize("family", FAMILIES)
def test_pieces_equal_the_whole_pass(family, heads, request, tmp_path, monkeypatch):
    path = request.getfixturevalue(f"{family}_checkpoint")[0]
    model, processor = load(path)
    for i, (h, w) in enumerate(((56, 84), (112, 140), (28, 196))):
        picture(h, w, i).save(tmp_path / f"{i}.png")
    items = items_of(
        processor,
        images=[tmp_path / f"{i}.png" for i in range(3)],
        videos=[Video(clip(8, 84, 112, 1), fps=2.0)],
    )
    # three images, a video of four temporal groups
    assert [int(item.grid[0]) for item in items] == [1, 1, 1, 4]
    for item in items:
        # every head in one call: the pass as it was
        image, video = model.encode_media(items=[item])
        whole = video if item is items[-1] else image
        cut_attention(monkeypatch, WORKS[heads])
        # the whole pass, its attention a head a call
        image, video = model.encode_media(items=[item])
        assert mx.array_equal(video if item is items[-1] else image, whole).item()
        counts = set()
        for patches, work in GROUPINGS:
            n, features = in_pieces(model, item, patches, work)
            counts.add(n)
            assert features.shape == whole.shape and mx.array_equal(features, whole).item(), (
                item.grid,
                patches,
                work,
            )
        # the groupings really cut the item differently (a head a piece cuts an image alike in all)
        assert len(counts) > 1 or (heads == "heads" and item is not items[-1])
        monkeypatch.undo()
    cut_attention(monkeypatch, WORKS[heads])
    n, _ = in_pieces(model, items[-1], 1, 1)
    per_block = 1 if heads == "whole" else model.visual.blocks[0].attn.num_heads
    # a temporal group through one block (or head) a piece
    assert n == 4 * len(model.visual.blocks) * per_block


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("step", [1, 2, "heads"])
def test_decoder_layers_in_pieces_equal_forward(family, step, request, tmp_path, monkeypatch):
    path = request.getfixturevalue(f"{family}_checkpoint")[0]
    model, processor = load(path)
    picture(56, 84, 5).save(tmp_path / "p.png")
    messages = build_messages("Describe it in detail.", [tmp_path / "p.png"], (), None)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    images, videos = processor.media_from_messages(messages)
    inputs = {
        k: v
        for k, v in processor(text, images=images, videos=videos).items()
        if k != "mm_token_type_ids"
    }
    out, split = [], []
    if step == "heads":  # a head or two a call: every chunk's attention in several pieces
        cut_attention(monkeypatch, 16 * 16)
    for pieces in (False, True):
        cache = model.make_cache()
        prompt = model.prepare(**inputs, cache=cache)
        cache.record(prompt)
        hidden = []
        for start in range(0, prompt.length, 16):
            end = min(start + 16, prompt.length)
            if pieces:
                p = model.begin_pass(prompt, cache, start, end, last_only=end == prompt.length)
                while p.layer < len(model.layers):
                    if step != "heads":
                        model.run_layers(p, cache, step)
                        continue
                    groups = model.head_groups(p.layer, end - start, end, end == prompt.length)
                    if groups is None:
                        model.run_layers(p, cache, 1)
                    else:
                        split.append(len(groups))
                        model.run_heads(p, cache, *groups[p.heads_run])
                hidden.append(p.h)
            else:
                hidden.append(
                    model.forward(prompt, cache, start, end, last_only=end == prompt.length)
                )
        mx.eval(hidden, [c.state for c in cache])
        out.append((hidden, [c.state for c in cache]))
    (a, ca), (b, cb) = out
    assert step != "heads" or (split and min(split) > 1)
    assert len(a) > 2 and all(mx.array_equal(x, y).item() for x, y in zip(a, b))
    assert all(mx.array_equal(x, y).item() for s, t in zip(ca, cb) for x, y in zip(s, t))
