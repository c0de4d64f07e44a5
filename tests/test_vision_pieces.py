"""The vision tower in pieces (model.vision_pieces) and prompt chunks a few decoder layers at a time
(model.run_layers) give the whole pass's results bit for bit."""

import mlx.core as mx
import pytest

from mlx_glm4v.generate import build_messages
from mlx_glm4v.loader import load
from mlx_glm4v.media import media_items
from mlx_glm4v.video import Video
from test_model import clip, picture


def items_of(processor, images=(), videos=()):
    messages = build_messages("Look.", images, videos, None)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    media_images, media_videos = processor.media_from_messages(messages)
    inputs = processor(text, images=media_images, videos=media_videos)
    return media_items(*(inputs.get(k) for k in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                                  "video_grid_thw")))


def in_pieces(model, item, patches, work):
    pieces = model.vision_pieces(item, patches, work)
    visual, parts, state = model.visual, [], None
    for piece in pieces:
        if piece.start == 0:
            state = visual.begin(piece.rows, piece.grids)
        visual.run_blocks(state, piece.start, piece.end)
        if piece.end == len(visual.blocks):
            parts.append(visual.finish(state))
    return len(pieces), mx.concatenate(parts)


# (patches, work): everything at once, one frame through one block at a time, and in between
GROUPINGS = [(10**9, 10**9), (1, 1), (70, 150), (200, 10**9)]


@pytest.mark.parametrize("family", ["glm4v", "glm4v_moe"])
def test_pieces_equal_the_whole_pass(family, glm4v_checkpoint, glm4v_moe_checkpoint, tmp_path):
    path = (glm4v_checkpoint if family == "glm4v" else glm4v_moe_checkpoint)[0]
    model, processor = load(path)
    for i, (h, w) in enumerate(((56, 84), (112, 140), (28, 196))):
        picture(h, w, i).save(tmp_path / f"{i}.png")
    items = items_of(processor, images=[tmp_path / f"{i}.png" for i in range(3)],
                     videos=[Video(clip(8, 84, 112, 1), fps=2.0)])
    assert [int(item.grid[0]) for item in items] == [1, 1, 1, 4]  # three images, a video of four temporal groups
    for item in items:
        image, video = model.encode_media(items=[item])
        whole = video if item is items[-1] else image
        counts = set()
        for patches, work in GROUPINGS:
            n, features = in_pieces(model, item, patches, work)
            counts.add(n)
            assert features.shape == whole.shape and mx.array_equal(features, whole).item(), (item.grid, patches, work)
        assert len(counts) > 1  # the groupings really cut the item differently
    n, _ = in_pieces(model, items[-1], 1, 1)
    assert n == 4 * len(model.visual.blocks)  # a temporal group through one block a piece


@pytest.mark.parametrize("family", ["glm4v", "glm4v_moe"])
@pytest.mark.parametrize("step", [1, 2])
def test_decoder_layers_in_pieces_equal_forward(family, step, glm4v_checkpoint, glm4v_moe_checkpoint, tmp_path):
    path = (glm4v_checkpoint if family == "glm4v" else glm4v_moe_checkpoint)[0]
    model, processor = load(path)
    picture(56, 84, 5).save(tmp_path / "p.png")
    messages = build_messages("Describe it in detail.", [tmp_path / "p.png"], (), None)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    images, videos = processor.media_from_messages(messages)
    inputs = {k: v for k, v in processor(text, images=images, videos=videos).items() if k != "mm_token_type_ids"}
    out = []
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
                    model.run_layers(p, cache, step)
                hidden.append(p.h)
            else:
                hidden.append(model.forward(prompt, cache, start, end, last_only=end == prompt.length))
        mx.eval(hidden, [c.state for c in cache])
        out.append((hidden, [c.state for c in cache]))
    (a, ca), (b, cb) = out
    assert len(a) > 2 and all(mx.array_equal(x, y).item() for x, y in zip(a, b))
    assert all(mx.array_equal(x, y).item() for s, t in zip(ca, cb) for x, y in zip(s, t))
