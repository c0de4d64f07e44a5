"""glmga end to end: our processor and model against transformers' processor (Glm46VProcessor with
glmga's image and video processors, as the tiny checkpoint saves them) and model, on an image and
a video. The prompt ids and grids, float32 logits within 1e-4 and 8 greedy tokens must agree."""

import numpy as np
import pytest
import torch
from helpers import clip, picture
from transformers.video_utils import VideoMetadata

from mlx_glm4v.checkpoints.loader import load
from mlx_glm4v.inputs.video import Video

TOL = 1e-4
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def setup(glmga_checkpoint, tmp_path_factory):
    path, ref, hf = glmga_checkpoint
    model, processor = load(path)
    assert type(hf.video_processor).__name__ == "GlmgaVideoProcessor"
    image = tmp_path_factory.mktemp("media") / "tall.png"
    picture(300, 70, 4).save(image)
    return dict(model=model, processor=processor, ref=ref, hf=hf, image=image)


def ours_greedy(model, inputs):
    cache = model.make_cache()
    logits = model(**inputs, cache=cache)
    tokens = [int(np.array(logits[0, -1].argmax()))]
    for _ in range(NEW_TOKENS - 1):
        step = model(np.array([[tokens[-1]]], np.int32), cache=cache)
        tokens.append(int(np.array(step[0, -1].argmax())))
    return tokens


def check(setup, messages, **media):
    """Both whole paths on `messages`; `media` are transformers' processor arguments."""
    ours = setup["processor"].process_messages(messages)
    text = setup["hf"].apply_chat_template(messages, add_generation_prompt=True)
    want = setup["hf"](text=[text], return_tensors="pt", **media)
    for key in ("input_ids", "image_grid_thw", "video_grid_thw"):
        if key in want:
            np.testing.assert_array_equal(ours[key], want[key].numpy(), err_msg=key)
    inputs = {k: v for k, v in ours.items() if k != "mm_token_type_ids"}
    logits = np.array(setup["model"](**inputs))
    with torch.no_grad():
        ref_logits = setup["ref"](**want).logits.numpy()
        out = setup["ref"].generate(
            **want, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
    worst = float(np.abs(logits - ref_logits).max())
    assert worst <= TOL, f"max |logit difference| {worst:.2e}"
    assert ours_greedy(setup["model"], inputs) == out[0, want["input_ids"].shape[1] :].tolist()
    return ours


def test_image_end_to_end(setup):
    from PIL import Image

    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(setup["image"])},
                {"type": "text", "text": "Describe this image."},
            ],
        }
    ]
    check(setup, messages, images=[Image.open(setup["image"])])


def test_video_end_to_end(setup):
    """30 frames at 10 fps, which the reference takes for round(29 / 10) + 1 = 4 s: glmga's
    processor samples 2 a second, 8 frames, 4 frame pairs."""
    frames = clip(30, 70, 84, 6)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": Video(frames, 10.0)},
                {"type": "text", "text": "What happens?"},
            ],
        }
    ]
    ours = check(
        setup,
        messages,
        videos=[frames],
        video_metadata=[VideoMetadata(total_num_frames=30, fps=10.0)],
    )
    assert ours["video_grid_thw"][0, 0] == 4
