"""Resized pixels against transformers' Glm4vProcessor (torchvision backend) for every per-axis
change.

Each case moves each axis one way (unchanged, grown or shrunk, by a small factor or a large one),
for every image kind a file can be and for video frames. Noise images: every pixel differs from
its neighbours, so any difference in how the two passes are done shows. Run with -s for the
figures.
"""

import numpy as np
import pytest
import tiny
from PIL import Image
from transformers.video_utils import VideoMetadata

from mlx_glm4v.inputs.processor import Processor
from mlx_glm4v.inputs.video import Video

MEAN_LIMIT, MAX_LIMIT = 1e-4, 0.03  # normalized units: 0.03 is two grey levels
MEASURED = {}  # case -> (mean, max) |pixel diff|

# (height, width, per-frame max_pixels or None): small inputs, each axis grown or shrunk by a small
# (< 25 %) or large factor or left alone; with their transposes every combination occurs.
GRID = [
    (45, 90, None),
    (23, 173, None),
    (50, 98, 6200),
    (49, 71, 4600),
    (45, 112, None),
    (8, 23, 400),
    (8, 8, 400),
    (8, 29, 400),
    (8, 35, 400),
    (8, 28, 400),
    (57, 98, None),
    (57, 98, 5400),
    (57, 71, 4000),
    (57, 112, None),
    (71, 72, 7000),
    (42, 44, 3000),
    (71, 85, 6000),
    (70, 71, 3200),
    (71, 84, 6000),
    (56, 98, None),
    (56, 98, 5600),
    (56, 71, 4000),
    (56, 112, None),
    (30, 40, None),
    (20, 300, None),
    (250, 300, 9000),
]
GRID += [(w, h, cap) for h, w, cap in GRID if h != w]
# The shapes of camera photos and screenshots (one axis shrinks while the other grows, and both
# ways).
PHOTOS = [(768, 1024, None), (1024, 768, None), (230, 230, None), (600, 800, 200_000)]


def change(before: int, after: int) -> str:
    if before == after:
        return "="
    sign = "+" if after > before else "-"
    return sign if 0.8 < after / before < 1.25 else sign * 2


@pytest.fixture(scope="module", autouse=True)
def pixel_report():
    yield
    print("\nmean / max |pixel diff| against transformers' torchvision backend:")
    for case, (mean, top) in MEASURED.items():
        print(f"  {case:44s} {mean:.1e} / {top:.1e}")


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    from transformers import AutoProcessor

    path = tmp_path_factory.mktemp("processor")
    tokenizer = tiny.build_tokenizer(path)
    tiny.build_processor(tokenizer).save_pretrained(path)
    return Processor.from_pretrained(path), AutoProcessor.from_pretrained(path)


def noise(h, w, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), np.uint8)


def write(d, kind, h, w, seed):
    """A file of `kind` that shows an (h, w) image upright."""
    rgb = noise(h, w, seed=seed)
    if kind == "RGB":
        path, image = d / "rgb.png", Image.fromarray(rgb)
    elif kind == "grayscale":
        path, image = d / "gray.png", Image.fromarray(rgb[..., 0], "L")
    elif kind == "RGBA":
        path, image = d / "rgba.png", Image.fromarray(noise(h, w, 4, seed), "RGBA")
    elif kind == "palette":
        path, image = d / "palette.png", Image.fromarray(rgb).quantize(64)
    else:  # stored sideways, EXIF orientation 6 turns it upright
        exif = Image.Exif()
        exif[0x0112] = 6
        path = d / "rotated.png"
        Image.fromarray(np.rot90(rgb, 1).copy()).save(path, exif=exif)
        return str(path)
    image.save(path)
    return str(path)


def check(case, got, want, key):
    for name in want:
        if name.startswith("pixel_values"):
            assert got[name].shape == want[name].shape, case
            diff = np.abs(got[name] - want[name])
            MEASURED[case] = float(diff.mean()), float(diff.max())
        else:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{case}: {name}")
    mean, top = MEASURED[case]
    assert mean <= MEAN_LIMIT and top <= MAX_LIMIT, (case, mean, top)
    return got[key][0]


def test_grid_covers_every_per_axis_change(processors):
    ours, _ = processors
    s = ours.image_settings
    from mlx_glm4v.inputs.image import smart_resize

    seen = set()
    for h, w, cap in GRID:
        budget = s.max_pixels if cap is None else min(s.max_pixels, 2 * cap)
        rh, rw = smart_resize(2, h, w, s, budget, "grid")
        seen.add((change(h, rh), change(w, rw)))
    kinds = ["=", "+", "++", "-", "--"]
    assert seen == {(a, b) for a in kinds for b in kinds}


KINDS = ["RGB", "grayscale", "RGBA", "palette", "EXIF-rotated"]
IMAGE_CASES = [(kind, *case) for kind in KINDS for case in GRID] + [
    ("RGB", *case) for case in PHOTOS
]


@pytest.mark.parametrize("kind,h,w,cap", IMAGE_CASES, ids=lambda v: str(v))
def test_image_file_pixels(processors, tmp_path, kind, h, w, cap):
    ours, ref = processors
    path = write(tmp_path, kind, h, w, seed=h * w)
    caps = {} if cap is None else {"size": {"shortest_edge": 12544, "longest_edge": 2 * cap}}
    want = ref(text=["<|image|>"], images=[path], return_tensors="np", **caps)
    got = ours(text="<|image|>", images=[path], max_pixels=cap)
    check(f"{kind} {h}x{w} cap {cap}", got, want, "image_grid_thw")


@pytest.mark.parametrize("h,w,cap", GRID + PHOTOS[:2], ids=lambda v: str(v))
def test_video_frame_pixels(processors, h, w, cap):
    ours, ref = processors
    # one second at 2 fps: both frames sampled
    frames = np.stack([noise(h, w, seed=i) for i in range(2)])
    metadata = VideoMetadata(total_num_frames=2, fps=2.0, duration=1.0)
    caps = {} if cap is None else {"size": {"shortest_edge": 12544, "longest_edge": 2 * cap}}
    want = ref(
        text=["<|video|>"], videos=[frames], video_metadata=[metadata], return_tensors="np", **caps
    )
    got = ours(text="<|video|>", videos=[Video(frames, 2.0, 1.0)], max_pixels=cap)
    assert check(f"video {h}x{w} cap {cap}", got, want, "video_grid_thw")[0] == 1
