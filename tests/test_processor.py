"""The torch-free processor against transformers' Glm4vProcessor and Glm46VProcessor on tiny
checkpoints.

Template strings, input_ids, masks and grids must be identical; pixels within a mean |diff| of
1e-4 and a max of 0.03 (two grey levels) of the default torchvision backend (measured: equal).
The PIL backend's figures are reported, not checked, except for 16-bit files, where it is the
reference. Run with -s to see the per-case pixel figures.
"""

import json
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import av
import numpy as np
import pytest
import tiny
from helpers import smooth, write_gradient_video
from PIL import Image
from transformers.video_utils import VideoMetadata

from mlx_glm4v.errors import Glm4vError
from mlx_glm4v.inputs.image import smart_resize
from mlx_glm4v.inputs.processor import Processor, unmark
from mlx_glm4v.inputs.video import Video

MEAN_LIMIT, MAX_LIMIT = 1e-4, 0.03  # against the torchvision backend
PIL_MEAN_LIMIT = 5e-3  # against the PIL backend, whose bicubic keeps more bits than torch's
MEASURED = {}  # (case, key) -> {reference backend: (mean, max) |pixel diff|}


@pytest.fixture(scope="module", autouse=True)
def pixel_report():
    yield
    print(
        "\nmean / max |pixel diff| per case, against transformers' torchvision (default) and PIL "
        "backends:"
    )
    for (case, key), figures in MEASURED.items():
        cells = [f"{backend} {m:.1e} / {x:.1e}" for backend, (m, x) in figures.items()]
        print(f"  {case + ' ' + key:48s} " + " | ".join(cells))


def record(case, key, backend, got, want):
    diff = np.abs(got - want)
    MEASURED.setdefault((case, key), {})[backend] = (float(diff.mean()), float(diff.max()))
    return float(diff.mean()), float(diff.max())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tiny.saved_processors(tmp_path_factory, "Glm4v", ("v5", "hub"))


@pytest.fixture(scope="module")
def ours(checkpoints):
    return Processor.from_pretrained(checkpoints["v5"][0])


@pytest.fixture(scope="module")
def ref(checkpoints):
    return checkpoints["v5"][1]


@pytest.fixture(scope="module")
def ref_pil(ref):
    """The same reference with transformers' PIL image backend, for the second set of figures."""
    from transformers import Glm4vImageProcessorPil, Glm4vProcessor

    image = Glm4vImageProcessorPil(size=dict(ref.image_processor.size))
    return Glm4vProcessor(
        image, ref.tokenizer, ref.video_processor, chat_template=ref.chat_template
    )


def png16(path, a):
    """Write a 16-bit PNG (gray (H, W) or RGB (H, W, 3)) by hand: PIL can't write RGB 16-bit."""
    import struct
    import zlib

    a = np.asarray(a, ">u2")
    color = 2 if a.ndim == 3 else 0
    raw = b"".join(b"\0" + row.tobytes() for row in a)

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", a.shape[1], a.shape[0], 16, color, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    rgba = smooth(60, 90, 4)
    rgba[..., 3] = np.linspace(0, 255, 90).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    Image.fromarray(smooth(70, 50)).quantize(32).save(d / "palette.png", transparency=3)
    Image.fromarray(smooth(64, 96, 1)[..., 0], "L").save(d / "gray.jpg", quality=95)
    Image.fromarray(smooth(40, 40, 2), "LA").save(d / "la.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90 degrees clockwise
    Image.fromarray(smooth(90, 160)).save(d / "rotated.jpg", exif=exif, quality=95)
    Image.fromarray(smooth(10, 10)).save(d / "tiny.png")
    Image.fromarray(smooth(2000, 3000)).save(d / "large.jpg", quality=90)
    Image.fromarray(smooth(336, 336)).save(d / "square.png")
    Image.fromarray(smooth(300, 500, seed=1)).save(d / "wide.jpg", quality=95)
    png16(d / "gray16.png", smooth(50, 70, 1)[..., 0].astype(np.uint16) * 200)
    png16(d / "rgb16.png", smooth(50, 70).astype(np.uint16) * 257)
    Image.fromarray(smooth(1, 250)).save(d / "strip.png")
    (d / "garbage.jpg").write_bytes(b"this is not a JPEG at all" * 40)
    return d


def reference_video(path):
    """All frames plus metadata as transformers' PyAV reader takes them, so that the reference
    samples."""
    from transformers.video_utils import read_video_pyav

    with av.open(str(path)) as container:
        counted = container.streams.video[0].frames
        fps = float(container.streams.video[0].average_rate)
    # mkv/webm carry no frame count, which transformers' PyAV reader can't sample from
    if not counted:
        with av.open(str(path)) as container:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        return frames, VideoMetadata(
            total_num_frames=len(frames), fps=fps, duration=len(frames) / fps
        )
    frames, metadata = read_video_pyav(
        str(path), lambda metadata, **_: np.arange(metadata.total_num_frames)
    )
    metadata.frames_indices = None
    return frames, metadata


def user(*items, text="Describe it."):
    return {"role": "user", "content": [*items, {"type": "text", "text": text}]}


def compare(
    case,
    ours,
    ref,
    messages,
    images=(),
    videos=(),
    ref_videos=None,
    ref_pil=None,
    template_kwargs=None,
    **kwargs,
):
    """Render, process with both and check; returns our output."""
    template_kwargs = template_kwargs or {}
    prompt = ours.apply_chat_template(messages, **template_kwargs)
    assert prompt == ref.apply_chat_template(
        messages, add_generation_prompt=True, **template_kwargs
    )
    got = ours(text=prompt, images=list(images) or None, videos=list(videos) or None, **kwargs)
    extra = {}
    if ref_videos is not None:
        extra = {"videos": [v for v, _ in ref_videos], "video_metadata": [m for _, m in ref_videos]}
    backends = {"torchvision": ref, "pil": ref_pil} if ref_pil is not None else {"torchvision": ref}
    for backend, reference in backends.items():
        want = reference(
            text=[prompt], images=list(images) or None, return_tensors="np", **extra, **kwargs
        )
        assert set(got) == set(want)
        for key in want:
            if key.startswith("pixel_values"):
                assert got[key].shape == want[key].shape and got[key].dtype == np.float32
                mean, top = record(case, key, backend, got[key], want[key])
                # the default backend is the reference; the PIL backend's figures are only reported,
                # since the two backends disagree on files with a transparent palette colour
                assert backend != "torchvision" or (mean <= MEAN_LIMIT and top <= MAX_LIMIT), (
                    case,
                    key,
                    mean,
                    top,
                )
            else:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{case}: {key}")
    return got


# ---------------------------------------------------------------- template and tokenizer


@pytest.mark.parametrize("layout", ["v5", "hub"])
def test_both_layouts_match(checkpoints, media, videos, layout):
    path, reference = checkpoints[layout]
    ours = Processor.from_pretrained(path)
    assert ours.image_settings.max_pixels == reference.image_processor.size["longest_edge"]
    assert ours.video_settings.max_pixels == reference.video_processor.size["longest_edge"]
    clip = videos["clip7fps.mp4"]
    messages = [
        user(
            {"type": "image", "image": str(media / "wide.jpg")},
            {"type": "video", "video": str(clip)},
        )
    ]
    images, found = ours.media_from_messages(messages)
    compare(
        f"image + video ({layout} layout)",
        ours,
        reference,
        messages,
        images=images,
        videos=found,
        ref_videos=[reference_video(clip)],
    )


def test_multi_turn_with_system_and_several_images(ours, ref, ref_pil, media):
    files = [str(media / f) for f in ("wide.jpg", "square.png", "tiny.png")]
    messages = [
        {"role": "system", "content": "You are a careful assistant."},
        user(
            {"type": "image", "image": files[0]},
            {"type": "image", "path": files[1]},
            text="Compare them.",
        ),
        {
            "role": "assistant",
            "content": "<think>Two pictures.</think><answer>They differ.</answer>",
        },
        {"role": "assistant", "metadata": "tool", "content": "ok", "reasoning_content": None},
        user({"type": "image", "url": files[2]}, text="And this one?"),
        {"role": "user", "content": "Plain text turn."},
    ]
    images, videos = ours.media_from_messages(messages)
    assert images == files and videos == []
    compare("three images, multi-turn", ours, ref, messages, images=images, ref_pil=ref_pil)


def test_process_messages_is_template_media_and_processor(ours, media):
    """The one call the generate loop, the engine and the server make equals its three steps."""
    messages = [user({"type": "image", "image": str(media / "wide.jpg")}, text="What is it?")]
    template, caps = {"enable_thinking": False}, {"max_pixels": 28 * 28 * 64}
    images, videos = ours.media_from_messages(messages)
    want = ours(ours.apply_chat_template(messages, **template), images, videos, **caps)
    got = ours.process_messages(messages, template, caps)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_batch_is_left_padded(ours, ref, media):
    prompts = [
        ours.apply_chat_template([user({"type": "image"}, text="Short.")]),
        ours.apply_chat_template(
            [user({"type": "image"}, {"type": "image"}, text="A much longer question here.")]
        ),
    ]
    images = [str(media / "square.png"), str(media / "wide.jpg"), str(media / "tiny.png")]
    got = ours(text=prompts, images=images)
    want = ref(text=prompts, images=images, padding=True, return_tensors="np")
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        np.testing.assert_array_equal(got[key], want[key])
    assert got["attention_mask"][0, 0] == 0 and got["attention_mask"][:, -1].all()
    mean, top = record(
        "batch of 2", "pixel_values", "torchvision", got["pixel_values"], want["pixel_values"]
    )
    assert mean <= MEAN_LIMIT and top <= MAX_LIMIT
    with pytest.raises(Glm4vError, match="padding=True"):
        ours(text=prompts, images=images, padding=False)


def test_tokenizer_matches_transformers(ours, ref):
    texts = [
        "".join(tiny.SPECIAL_TOKENS),
        " ".join(tiny.SPECIAL_TOKENS) + " trailing",
        "Ünïcödé, emoji 🙂 and 中文 字符<|image|><|image|>12 seconds\n\n  spaces",
        "[gMASK]<sop><|user|>\nHi<|assistant|>\n<think></think>",
    ]
    for text in texts:
        ids = ours.tokenizer.encode(text)
        assert ids == ref.tokenizer(text)["input_ids"]
        for skip in (False, True):
            assert ours.tokenizer.decode(ids, skip_special_tokens=skip) == ref.tokenizer.decode(
                ids, skip_special_tokens=skip
            )
    assert ours.convert_tokens_to_ids("<|image|>") == ref.image_token_id


def test_tokenizer_post_processor_decides_special_tokens(checkpoints, tmp_path):
    """tokenizer(text) adds what tokenizer.json's post-processor adds; add_bos_token in the
    config is dropped by transformers when a tokenizer.json exists."""
    from transformers import AutoTokenizer

    path = tmp_path / "prefix"
    shutil.copytree(checkpoints["v5"][0], path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(
        json.dumps({**config, "bos_token": "<sop>", "add_bos_token": True})
    )
    gmask = tiny.prefix_gmask(path)
    text = "<|user|>\nHello"
    want = AutoTokenizer.from_pretrained(path)(text)["input_ids"]
    assert want[0] == gmask and want[1] != gmask
    assert Processor.from_pretrained(path).tokenizer.encode(text) == want


@pytest.mark.parametrize("source", ["chat_template.json", "tokenizer_config.json"])
def test_template_from_other_files(checkpoints, tmp_path, source):
    path = tmp_path / "template"
    shutil.copytree(checkpoints["v5"][0], path)
    template = (path / "chat_template.jinja").read_text()
    (path / "chat_template.jinja").unlink()
    file = path / source
    data = json.loads(file.read_text()) if file.exists() else {}
    file.write_text(json.dumps({**data, "chat_template": template}))
    messages = [{"role": "system", "content": "S"}, user({"type": "video"}, text="Q")]
    assert Processor.from_pretrained(path).apply_chat_template(messages) == checkpoints["v5"][
        1
    ].apply_chat_template(messages, add_generation_prompt=True)


def test_media_from_messages_order_and_keys(ours):
    pil = Image.new("RGB", (30, 30))
    clip = Video(np.zeros((4, 28, 28, 3), np.uint8), fps=2)
    messages = [
        {"role": "system", "content": "S"},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "a.jpg"},
                {"type": "video", "video": "v.mp4"},
                {"type": "image_url", "image_url": {"url": "b.png"}},
                {"image": pil},
                {"type": "video", "path": clip},
                {"type": "text", "text": "hi"},
            ],
        },
    ]
    assert ours.media_from_messages(messages) == (["a.jpg", "b.png", pil], ["v.mp4", clip])


# ---------------------------------------------------------------- images


IMAGE_CASES = {
    "RGBA png (path)": lambda d: str(d / "rgba.png"),
    "palette+transparency (path)": lambda d: str(d / "palette.png"),
    "grayscale jpg (path)": lambda d: str(d / "gray.jpg"),
    "gray+alpha png (path)": lambda d: str(d / "la.png"),
    "EXIF-rotated jpg (path)": lambda d: str(d / "rotated.jpg"),
    "tiny 10px (path)": lambda d: str(d / "tiny.png"),
    "large 3000x2000 (path)": lambda d: str(d / "large.jpg"),
    "RGBA (PIL image)": lambda d: Image.open(d / "rgba.png"),
    "palette (PIL image)": lambda d: Image.open(d / "palette.png"),
    "RGBA (array, HWC)": lambda d: np.asarray(Image.open(d / "rgba.png")),
    "gray (array, HW1)": lambda d: np.asarray(Image.open(d / "gray.jpg"))[..., None],
    "RGB (array, CHW)": lambda d: np.moveaxis(np.asarray(Image.open(d / "wide.jpg")), -1, 0).copy(),
}


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_image_matches_reference(ours, ref, ref_pil, media, case):
    image = IMAGE_CASES[case](media)
    compare(case, ours, ref, [user({"type": "image"})], images=[image], ref_pil=ref_pil)


def test_exif_orientation_is_applied(ours, media):
    grid = ours(text="<|image|>", images=[str(media / "rotated.jpg")])["image_grid_thw"][0]
    assert grid[1] > grid[2]  # stored 160 wide, 90 high: upright it is tall


@pytest.mark.parametrize("name", ["gray16.png", "rgb16.png"])
def test_16_bit_png_follows_load_image(ours, ref_pil, media, name):
    """16-bit files read as transformers' load_image reads them (the PIL backend); the default
    torchvision backend hands raw 0-65535 values to a /255 rescale, so it is no reference here."""
    got = ours(text="<|image|>", images=[str(media / name)])
    want = ref_pil(text=["<|image|>"], images=[str(media / name)], return_tensors="np")
    np.testing.assert_array_equal(got["image_grid_thw"], want["image_grid_thw"])
    mean, _ = record(
        f"16-bit {name} (path)", "pixel_values", "pil", got["pixel_values"], want["pixel_values"]
    )
    assert mean <= PIL_MEAN_LIMIT


def test_patch_rows_are_the_resized_image(ours):
    """Row order and the (C, T, p, p) feature order, checked without the reference."""
    rgb = np.arange(112 * 168 * 3, dtype=np.uint32).reshape(112, 168, 3) % 251  # needs no resize
    out = ours(text="<|image|>", images=[rgb.astype(np.uint8)])
    s = ours.image_settings
    rows = out["pixel_values"].reshape(-1, 3, 2, 14, 14)
    # the frame repeated over temporal_patch_size
    assert np.array_equal(rows[:, :, 0], rows[:, :, 1])
    pixel = rows[1, :, 0, 0, 0] * np.asarray(s.image_std) * 255 + np.asarray(s.image_mean) * 255
    # row 1: second patch of the first 2x2 block
    np.testing.assert_allclose(pixel, rgb[0, 14], atol=1e-3)


# ---------------------------------------------------------------- videos


VIDEO_FILES = {  # name: (codec, fps, frames, pixel format)
    "clip7fps.mp4": ("libx264", 7, 13, "yuv420p"),
    "clip30fps.mp4": ("libx264", 30, 45, "yuv420p"),
    "one-frame.mov": ("mpeg4", 24, 1, "yuv420p"),
    "clip25fps.mkv": ("libvpx-vp9", 25, 61, "yuv420p"),
    "clip10fps.webm": ("libvpx", 10, 5, "yuv420p"),
    "clip10fps.gif": ("gif", 10, 9, "rgb8"),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {name: write_gradient_video(d / name, *spec) for name, spec in VIDEO_FILES.items()}


@pytest.mark.parametrize("name", VIDEO_FILES)
def test_video_file_matches_reference(ours, ref, videos, name):
    path = videos[name]
    messages = [user({"type": "video", "video": str(path)}, text="What happens?")]
    _, found = ours.media_from_messages(messages)
    got = compare(name, ours, ref, messages, videos=found, ref_videos=[reference_video(path)])
    assert got["mm_token_type_ids"].max() == 2


def test_video_and_images_in_one_prompt(ours, ref, media, videos):
    path = videos["clip30fps.mp4"]
    messages = [
        user(
            {"type": "image", "image": str(media / "wide.jpg")},
            {"type": "video", "video": str(path)},
            {"type": "image", "image": str(media / "tiny.png")},
        )
    ]
    images, found = ours.media_from_messages(messages)
    got = compare(
        "2 images + mp4",
        ours,
        ref,
        messages,
        images=images,
        videos=found,
        ref_videos=[reference_video(path)],
    )
    assert set(np.unique(got["mm_token_type_ids"])) == {0, 1, 2}


@pytest.mark.parametrize(
    "frames,fps,duration", [(900, 2.0, 450.0), (500, 1.25, 400.0), (37, 3.0, None)]
)
def test_decoded_frames_with_metadata(ours, ref, frames, fps, duration):
    """Frames handed over with their fps, including clips past the 300 s cap simulated by
    metadata."""
    clip = np.stack([smooth(12, 16, seed=i % 7) for i in range(frames)])
    metadata = VideoMetadata(total_num_frames=frames, fps=fps, duration=duration)
    compare(
        f"{frames} frames @{fps} fps, {duration} s",
        ours,
        ref,
        [user({"type": "video"})],
        videos=[Video(clip, fps, duration)],
        ref_videos=[(clip, metadata)],
    )


def test_truncated_file_is_sampled_over_the_frames_it_holds(ours, ref, tmp_path):
    """A header promising more frames than decode: sampled as if the header had told the truth."""
    # header first
    whole = write_gradient_video(
        tmp_path / "whole.mp4", "mpeg4", 10, 40, noise=True, movflags="faststart"
    )
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with av.open(str(cut)) as container:
        frames = []
        try:
            frames.extend(f.to_ndarray(format="rgb24") for f in container.decode(video=0))
        except av.error.InvalidDataError:
            pass
    assert 2 < len(frames) < 40
    metadata = VideoMetadata(total_num_frames=len(frames), fps=10.0, duration=len(frames) / 10)
    compare(
        "truncated mp4",
        ours,
        ref,
        [user({"type": "video"})],
        videos=[str(cut)],
        ref_videos=[(np.stack(frames), metadata)],
    )


def test_video_fps_cap_matches_reference_fps(ours, ref, videos):
    path = videos["clip30fps.mp4"]
    got = compare(
        "mp4 at fps=1",
        ours,
        ref,
        [user({"type": "video"})],
        videos=[str(path)],
        ref_videos=[reference_video(path)],
        fps=1,
    )
    assert got["video_grid_thw"][0, 0] == 1


def test_frame_and_pixel_caps(ours, videos, media):
    path = str(videos["clip25fps.mkv"])
    full = ours(text="<|video|>", videos=[path])["video_grid_thw"][0]
    capped = ours(text="<|video|>", videos=[path], max_frames=2, max_pixels=28 * 28)[
        "video_grid_thw"
    ][0]
    assert full[0] == 2 and capped[0] == 1 and capped[1] * capped[2] == 4
    grid = ours(text="<|image|>", images=[str(media / "large.jpg")], max_pixels=28 * 28 * 16)[
        "image_grid_thw"
    ][0]
    assert grid[1] * grid[2] <= 4 * 16


# ---------------------------------------------------------------- bad input


def one_sentence(error: Glm4vError, *names):
    message = str(error.value)
    assert "\n" not in message and message.endswith("."), message
    # no traceback from deep inside
    assert error.value.__suppress_context__ or error.value.__context__ is None
    for name in names:
        assert str(name) in message, message


def test_bad_images(ours, media, tmp_path):
    cases = [
        (str(tmp_path / "missing.jpg"), "missing.jpg"),
        (str(media / "garbage.jpg"), "garbage.jpg"),
        (str(media / "strip.png"), "strip.png"),
        ("https://example.com/cat.jpg", "https://example.com/cat.jpg"),
        (np.zeros((8, 8, 3), np.float32), "float32"),
    ]
    for image, name in cases:
        with pytest.raises(Glm4vError) as error:
            ours(text="<|image|>", images=[image])
        one_sentence(error, name)


def png_header_only(path, width, height):
    """A PNG that claims (width, height) and holds no pixel: PIL checks the size when it opens
    it."""
    import struct
    import zlib

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize(
    "width,height,megapixels", [(10_000, 9_000, "90.0"), (20_000, 20_000, "400.0")]
)
def test_decompression_bomb_is_one_sentence(ours, tmp_path, width, height, megapixels):
    """Past PIL's limit (a warning up to twice it, an error beyond): our error, no warning
    printed."""
    import warnings

    path = png_header_only(tmp_path / "huge.png", width, height)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning escaping would fail the test
        with pytest.raises(Glm4vError) as error:
            ours(text="<|image|>", images=[str(path)])
    one_sentence(error, path, f"{megapixels} megapixels", "decompression bomb")
    assert "site-packages" not in str(error.value)


def test_decompression_bomb_whatever_pils_global_says(ours, tmp_path, monkeypatch):
    """Another library in the process may lift PIL's limit (the glmocr SDK sets it to None on
    import): the refusal is ours all the same."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    path = png_header_only(tmp_path / "huge.png", 10_000, 9_000)
    with pytest.raises(Glm4vError) as error:
        ours(text="<|image|>", images=[str(path)])
    one_sentence(error, path, "90.0 megapixels", "89.5 megapixels", "decompression bomb")


def test_bad_videos(ours, media, tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x01 definitely not a video" * 100)
    no_stream = tmp_path / "silence.wav"
    with wave.open(str(no_stream), "wb") as audio:
        (
            audio.setnchannels(1),
            audio.setsampwidth(2),
            audio.setframerate(8000),
            audio.writeframes(bytes(1600)),
        )
    zeroed = write_gradient_video(tmp_path / "zeroed.mp4", "libx264", 10, 5)
    data = bytearray(zeroed.read_bytes())
    at = data.find(b"mdat")
    size = int.from_bytes(data[at - 4 : at], "big")
    # every frame's payload zeroed: the header survives
    data[at + 4 : at - 4 + size] = bytes(size - 8)
    zeroed.write_bytes(data)
    for video, name in [
        (tmp_path / "missing.mp4", "missing.mp4"),
        (garbage, garbage),
        (no_stream, no_stream),
        (zeroed, zeroed),
        (Video(np.zeros((0, 4, 4, 3), np.uint8), 2), "no frame"),
    ]:
        with pytest.raises(Glm4vError) as error:
            ours(text="<|video|>", videos=[video])
        one_sentence(error, name)
    with pytest.raises(Glm4vError, match="max_frames=1"):
        ours(text="<|video|>", videos=[Video(np.zeros((4, 28, 28, 3), np.uint8), 2)], max_frames=1)


def test_wrong_number_of_media(ours, media):
    image = str(media / "tiny.png")
    for text, images, videos in [
        ("<|image|><|image|>", [image], None),
        ("<|image|>", [image, image], None),
        ("no places", [image], None),
        ("<|video|>", None, None),
        ("x", None, ["v.mp4"]),
    ]:
        with pytest.raises(Glm4vError) as error:
            ours(text=text, images=images, videos=videos)
        one_sentence(error, "place")


# ---------------------------------------------------------------- lean import


def test_processor_never_imports_torch(checkpoints, media, videos):
    script = f"""
import sys
import mlx_glm4v
from mlx_glm4v.inputs.image import smart_resize
from mlx_glm4v.inputs.processor import Processor
p = Processor.from_pretrained({str(checkpoints["v5"][0])!r})
prompt = p.apply_chat_template([{{"role": "user", "content": [{{"type": "image"}}, {{"type": "video"}}]}}])
p(text=prompt, images=[{str(media / "wide.jpg")!r}], videos=[{str(videos["clip7fps.mp4"])!r}])
heavy = [m for m in ("torch", "transformers", "mlx_lm", "mlx", "torchvision") if m in sys.modules]
assert not heavy, heavy
"""  # noqa: E501 (the script as it runs)
    root = Path(__file__).parent.parent
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- GLM-4.6V (Glm46VProcessor)


@pytest.fixture(scope="module")
def glm46v(tmp_path_factory):
    return tiny.saved_processors(tmp_path_factory, "Glm46V", ("v5", "hub", "model type"))


@pytest.fixture(scope="module")
def ours46(glm46v):
    return Processor.from_pretrained(glm46v["v5"][0])


@pytest.fixture(scope="module")
def ref46(glm46v):
    return glm46v["v5"][1]


@pytest.mark.parametrize("layout", ["v5", "hub", "model type"])
def test_glm46v_is_recognised(glm46v, checkpoints, layout):
    path, reference = glm46v[layout]
    assert type(reference).__name__ == "Glm46VProcessor"
    assert type(reference.video_processor).__name__ == "Glm46VVideoProcessor"
    ours = Processor.from_pretrained(path)
    assert (ours.processor_class, ours.video_settings.sampling) == ("Glm46VProcessor", "dynamic")
    clip = np.stack([smooth(12, 16, seed=i % 7) for i in range(50)])
    compare(
        f"glm46v 5 s @10 fps ({layout})",
        ours,
        reference,
        [user({"type": "video"})],
        videos=[Video(clip, 10.0)],
        ref_videos=[(clip, VideoMetadata(total_num_frames=50, fps=10.0))],
    )
    glm4v = Processor.from_pretrained(checkpoints["v5"][0])
    assert (glm4v.processor_class, glm4v.video_settings.sampling) == ("Glm4vProcessor", "fixed")


# (frames, fps, duration): around 30 s, 300 s and 2400 s, fewer frames than wanted, past the
# 640-frame cap
GLM46V_CLIPS = [
    (13, 7.0, None),
    (60, 2.0, 30.0),
    (62, 2.0, 31.0),
    (1365, 30.0, 45.5),
    (300, 1.0, 300.0),
    (301, 1.0, 301.0),
    (1000, 1.0, 1000.0),
    (900, 0.25, 3600.0),
    (599, 29.97, 599 / 29.97),
]


@pytest.mark.parametrize("frames,fps,duration", GLM46V_CLIPS)
def test_glm46v_frames_by_duration(ours46, ref46, frames, fps, duration):
    clip = np.stack([smooth(12, 16, seed=i % 7) for i in range(frames)])
    metadata = VideoMetadata(total_num_frames=frames, fps=fps, duration=duration)
    seconds = "?" if duration is None else f"{duration:g}"
    got = compare(
        f"glm46v {frames} frames @{fps} fps, {seconds} s",
        ours46,
        ref46,
        [user({"type": "video"})],
        videos=[Video(clip, fps, duration)],
        ref_videos=[(clip, metadata)],
    )
    assert " seconds" in ours46.tokenizer.decode(got["input_ids"][0])


def test_glm46v_files_images_and_template(ours46, ref46, media, videos):
    path = videos["clip30fps.mp4"]
    messages = [
        {"role": "system", "content": "Be brief."},
        user(
            {"type": "image", "image": str(media / "wide.jpg")},
            {"type": "video", "video": str(path)},
            {"type": "image", "image": str(media / "rgba.png")},
        ),
    ]
    images, found = ours46.media_from_messages(messages)
    got = compare(
        "glm46v 2 images + mp4",
        ours46,
        ref46,
        messages,
        images=images,
        videos=found,
        ref_videos=[reference_video(path)],
    )
    assert set(np.unique(got["mm_token_type_ids"])) == {0, 1, 2}
    for name in ("clip25fps.mkv", "clip10fps.gif"):
        compare(
            f"glm46v {name}",
            ours46,
            ref46,
            [user({"type": "video"})],
            videos=[str(videos[name])],
            ref_videos=[reference_video(videos[name])],
        )


def test_glm46v_fps_replaces_the_rate(ours46):
    """60 s at 2 fps: all 120 frames by default (2 a second up to 300 s), 30 at fps=0.5."""
    clip = Video(np.stack([smooth(12, 16, seed=i % 7) for i in range(120)]), 2.0, 60.0)
    assert ours46(text="<|video|>", videos=[clip])["video_grid_thw"][0, 0] == 60
    assert ours46(text="<|video|>", videos=[clip], fps=0.5)["video_grid_thw"][0, 0] == 15


def test_glm46v_too_short_clip(ours46, videos):
    """Under 1/6 s the reference samples no frame and fails; a one-sentence error here."""
    with pytest.raises(Glm4vError) as error:
        ours46(text="<|video|>", videos=[str(videos["one-frame.mov"])])
    one_sentence(error, "too short")


# ---------------------------------------------------------------- glmga (GlmgaImage/VideoProcessor)


@pytest.fixture(scope="module")
def glmga(tmp_path_factory):
    """glmga's processors at their own defaults, saved in each layout."""
    return tiny.saved_processors(tmp_path_factory, "Glmga", ("v5", "hub"))


@pytest.fixture(scope="module")
def glmga_expanded(tmp_path_factory):
    """glmga's processors with a patch_expand_factor of 2 and small budgets, so that tiny inputs
    exercise the expanded resize rule and a modest image goes past the budget."""
    small = {"shortest_edge": 12544, "longest_edge": 28 * 28 * 40}
    kwargs = {"size": small, "patch_expand_factor": 2}
    return tiny.saved_processors(
        tmp_path_factory, "Glmga", ("v5",), image_kwargs=kwargs, video_kwargs=kwargs
    )["v5"]


def test_glmga_by_model_type_alone(tmp_path_factory):
    """No class named anywhere: transformers maps the model type to glmga's video processor (it
    has no processor of its own to map to), and so do we."""
    from transformers import AutoVideoProcessor

    path = tiny.saved_processors(tmp_path_factory, "Glmga", ("v5",))["v5"][0]
    for file in ("processor_config.json", "tokenizer_config.json"):
        config = json.loads((path / file).read_text())
        config.pop("processor_class")
        for part in ("image_processor", "video_processor"):
            config.get(part, {}).pop(f"{part}_type", None)
        (path / file).write_text(json.dumps(config))
    (path / "config.json").write_text(json.dumps({"model_type": "glmga"}))
    assert type(AutoVideoProcessor.from_pretrained(path)).__name__ == "GlmgaVideoProcessor"
    ours = Processor.from_pretrained(path)
    assert (ours.processor_class, ours.video_settings.sampling) == ("Glm46VProcessor", "glmga")


@pytest.mark.parametrize("layout", ["v5", "hub"])
def test_glmga_is_recognised(glmga, layout):
    path, reference = glmga[layout]
    assert type(reference).__name__ == "Glm46VProcessor"
    assert type(reference.image_processor).__name__ == "GlmgaImageProcessor"
    assert type(reference.video_processor).__name__ == "GlmgaVideoProcessor"
    ours = Processor.from_pretrained(path)
    assert (ours.processor_class, ours.video_settings.sampling) == ("Glm46VProcessor", "glmga")
    video = reference.video_processor
    assert ours.video_settings.max_pixels == video.size["longest_edge"] == 28 * 28 * 2 * 55790
    assert ours.image_settings.max_pixels == reference.image_processor.size["longest_edge"]
    assert ours.video_settings.max_frames == video.max_frames == 640
    clip = np.stack([smooth(12, 16, seed=i % 7) for i in range(50)])
    compare(
        f"glmga 5 s @10 fps ({layout})",
        ours,
        reference,
        [user({"type": "video"})],
        videos=[Video(clip, 10.0)],
        ref_videos=[(clip, VideoMetadata(total_num_frames=50, fps=10.0))],
    )


GLMGA_IMAGES = {  # name: (height, width)
    "tall": (700, 60),
    "wide": (50, 640),
    "tiny": (9, 13),
    "square": (300, 300),
}


@pytest.mark.parametrize("name", GLMGA_IMAGES)
def test_glmga_images(glmga, glmga_expanded, name):
    rgb = smooth(*GLMGA_IMAGES[name], seed=3)
    for label, (path, reference) in {"defaults": glmga["v5"], "expanded": glmga_expanded}.items():
        ours = Processor.from_pretrained(path)
        got = compare(
            f"glmga {name} image ({label})",
            ours,
            reference,
            [user({"type": "image"})],
            images=[rgb],
        )
        _, h, w = got["image_grid_thw"][0]
        unit = ours.image_settings.merge_size * ours.image_settings.patch_expand_factor
        assert h % unit == 0 and w % unit == 0


def test_glmga_image_past_the_budget(glmga_expanded):
    """A 600x900 image against a 31,360-pixel budget: shrunk to multiples of 56 within it."""
    path, reference = glmga_expanded
    ours = Processor.from_pretrained(path)
    got = compare(
        "glmga 600x900 past the budget",
        ours,
        reference,
        [user({"type": "image"}, {"type": "image"})],
        images=[smooth(600, 900, seed=4), smooth(900, 600, seed=5)],
    )
    for _, h, w in got["image_grid_thw"]:
        assert h * w * 14 * 14 <= ours.image_settings.max_pixels / 2 and h % 4 == w % 4 == 0


@pytest.mark.parametrize(
    "height,width", [(4000, 3000), (3000, 6000), (20000, 150), (30, 5000), (5, 5), (1700, 2200)]
)
def test_glmga_token_counts_of_large_images(glmga, height, width):
    """Patches for images too large to run through both here, as the reference counts them
    (its count ignores patch_expand_factor, so the defaults' factor 1 only)."""
    ours = Processor.from_pretrained(glmga["v5"][0])
    want = glmga["v5"][1].image_processor.get_number_of_image_patches(height, width)
    s = ours.image_settings
    h, w = smart_resize(2, height, width, s, s.max_pixels, "image")
    assert (h // 14) * (w // 14) == want


# (frames, fps, duration): fewer frames than the rate asks, short clips, a frame rate that does
# not divide, long clips past the 640-frame cap
GLMGA_CLIPS = [
    (13, 7.0, None),
    (5, 1.0, 10.0),
    (60, 2.0, 30.0),
    (1365, 30.0, 45.5),
    (599, 29.97, 599 / 29.97),
    (700, 1.0, 700.0),
    (1500, 0.5, 3000.0),
]


@pytest.mark.parametrize("frames,fps,duration", GLMGA_CLIPS)
def test_glmga_frames(glmga, frames, fps, duration):
    path, reference = glmga["v5"]
    ours = Processor.from_pretrained(path)
    clip = np.stack([smooth(12, 16, seed=i % 7) for i in range(frames)])
    metadata = VideoMetadata(total_num_frames=frames, fps=fps, duration=duration)
    got = compare(
        f"glmga {frames} frames @{fps} fps",
        ours,
        reference,
        [user({"type": "video"})],
        videos=[Video(clip, fps, duration)],
        ref_videos=[(clip, metadata)],
    )
    assert got["video_grid_thw"][0, 0] <= 320  # 640 frames at most, in pairs
    assert " seconds" in ours.tokenizer.decode(got["input_ids"][0])


def test_glmga_long_clip_is_capped(glmga):
    ours = Processor.from_pretrained(glmga["v5"][0])
    clip = Video(np.stack([smooth(12, 16, seed=i % 7) for i in range(700)]), 1.0)
    assert ours(text="<|video|>", videos=[clip])["video_grid_thw"][0, 0] == 320


def test_glmga_fps_is_the_references_argument(glmga):
    path, reference = glmga["v5"]
    ours = Processor.from_pretrained(path)
    clip = np.stack([smooth(12, 16, seed=i % 7) for i in range(120)])
    metadata = VideoMetadata(total_num_frames=120, fps=2.0, duration=60.0)
    for fps in (0.5, 3.0):
        compare(
            f"glmga 60 s at fps={fps}",
            ours,
            reference,
            [user({"type": "video"})],
            videos=[Video(clip, 2.0, 60.0)],
            ref_videos=[(clip, metadata)],
            fps=fps,
        )


def test_glmga_files_images_and_expanded_video(glmga, glmga_expanded, media, videos):
    path, reference = glmga["v5"]
    ours = Processor.from_pretrained(path)
    clip = videos["clip30fps.mp4"]
    messages = [
        user(
            {"type": "image", "image": str(media / "wide.jpg")},
            {"type": "video", "video": str(clip)},
            {"type": "image", "image": str(media / "rgba.png")},
        )
    ]
    images, found = ours.media_from_messages(messages)
    got = compare(
        "glmga 2 images + mp4",
        ours,
        reference,
        messages,
        images=images,
        videos=found,
        ref_videos=[reference_video(clip)],
    )
    assert set(np.unique(got["mm_token_type_ids"])) == {0, 1, 2}
    path, reference = glmga_expanded
    frames = np.stack([smooth(100, 150, seed=i % 5) for i in range(24)])
    got = compare(
        "glmga expanded 3 s video",
        Processor.from_pretrained(path),
        reference,
        [user({"type": "video"})],
        videos=[Video(frames, 8.0)],
        ref_videos=[(frames, VideoMetadata(total_num_frames=24, fps=8.0))],
    )
    assert got["video_grid_thw"][0, 1] % 4 == got["video_grid_thw"][0, 2] % 4 == 0


# ---------------------------------------------------------------- GLM-OCR (published settings)


@pytest.fixture(scope="module")
def ocr(tmp_path_factory):
    """(path, transformers' processor) for GLM-OCR's published processor files: its
    preprocessor_config.json alone, its chat template, config.json's model type."""
    path = tmp_path_factory.mktemp("processor-glm-ocr")
    tokenizer = tiny.build_tokenizer(path, special_tokens=tiny.SPECIAL_TOKENS_45V)
    processor = tiny.build_processor(tokenizer, chat_template=tiny.CHAT_TEMPLATE_OCR, kind="Glm46V")
    processor.save_pretrained(path)
    (path / "config.json").write_text(json.dumps({"model_type": "glm_ocr"}))
    return path, tiny.write_published_ocr_processor(path)


@pytest.fixture(scope="module")
def ours_ocr(ocr):
    return Processor.from_pretrained(ocr[0])


def test_glm_ocr_reads_the_published_settings(ocr, ours_ocr):
    _, reference = ocr
    assert type(reference).__name__ == "Glm46VProcessor"
    assert type(reference.image_processor).__name__ == "Glm46VImageProcessor"
    assert ours_ocr.processor_class == "Glm46VProcessor"
    assert ours_ocr.chat_template == tiny.CHAT_TEMPLATE_OCR == reference.chat_template
    published = tiny.GLM_OCR_PREPROCESSOR["size"]
    for ours, theirs in (
        (ours_ocr.image_settings, reference.image_processor),
        (ours_ocr.video_settings, reference.video_processor),
    ):
        assert ours.min_pixels == theirs.size["shortest_edge"] == published["shortest_edge"]
        assert ours.max_pixels == theirs.size["longest_edge"] == published["longest_edge"]
        assert ours.patch_size == theirs.patch_size and ours.merge_size == theirs.merge_size
        assert ours.temporal_patch_size == theirs.temporal_patch_size


OCR_IMAGES = {  # name: (height, width)
    "page": (1100, 850),
    "receipt": (1200, 180),
    "text line": (40, 900),
    "tiny": (10, 12),
}


@pytest.mark.parametrize("name", OCR_IMAGES)
def test_glm_ocr_images(ocr, ours_ocr, name):
    got = compare(
        f"glm_ocr {name}",
        ours_ocr,
        ocr[1],
        [user({"type": "image"}, text="Text Recognition:")],
        images=[smooth(*OCR_IMAGES[name], seed=6)],
    )
    assert (got["input_ids"] == ours_ocr.image_token_id).sum() == got["image_grid_thw"].prod() // 4


# grids transformers' Glm46VImageProcessor gives for GLM-OCR's published settings on blank
# images of these (width, height), as a public port's test records them: 6000x4000 reaches the
# 6,144-token ceiling, 100x100 the floor
OCR_GRIDS = [
    (6000, 4000, (1, 128, 192)),
    (4000, 3000, (1, 134, 180)),
    (3000, 3000, (1, 156, 156)),
    (5000, 4000, (1, 140, 174)),
    (1700, 2200, (1, 158, 122)),
    (100, 100, (1, 8, 8)),
]


@pytest.mark.parametrize("width,height,grid", OCR_GRIDS)
def test_glm_ocr_grids_of_large_pages(ocr, ours_ocr, width, height, grid):
    """Large pages, too large to run through both here: the grid from our resize rule equals
    the recorded one and transformers' own patch count."""
    s = ours_ocr.image_settings
    h, w = smart_resize(2, height, width, s, s.max_pixels, "page")
    assert (1, h // 14, w // 14) == grid
    assert (h // 14) * (w // 14) == ocr[1].image_processor.get_number_of_image_patches(
        height, width
    )


def test_glm_ocr_video_uses_the_image_settings(ocr, ours_ocr):
    clip = np.stack([smooth(40, 60, seed=i % 7) for i in range(30)])
    compare(
        "glm_ocr 3 s video",
        ours_ocr,
        ocr[1],
        [user({"type": "video"})],
        videos=[Video(clip, 10.0)],
        ref_videos=[(clip, VideoMetadata(total_num_frames=30, fps=10.0))],
    )


def test_glm_ocr_nothink_switch(ocr, ours_ocr):
    """enable_thinking=False appends the /nothink token to each user turn and opens the reply
    with an empty thinking block; the user's own trailing /nothink is not doubled."""
    nothink, think = (ours_ocr.convert_tokens_to_ids(t) for t in ("/nothink", "</think>"))
    page = smooth(120, 90, seed=7)
    messages = [
        user({"type": "image"}, text="Text Recognition:"),
        {"role": "assistant", "content": "<think>a page</think>Hello world"},
        user(text="Table Recognition:"),
    ]
    got = compare(
        "glm_ocr /nothink",
        ours_ocr,
        ocr[1],
        messages,
        images=[page],
        template_kwargs={"enable_thinking": False},
    )
    ids = got["input_ids"][0].tolist()
    assert ids.count(nothink) == 2 and ids[-2:] == [think, ours_ocr.tokenizer.encode("\n")[-1]]
    plain = compare("glm_ocr thinking", ours_ocr, ocr[1], messages, images=[page])
    assert nothink not in plain["input_ids"][0].tolist()
    # Message text is data (test_text_is_data.py): a /nothink the user typed stays text, so the
    # template, not seeing its own token at the end, adds it; thinking is off all the same.
    # transformers reads the typed one as the control token instead and adds none.
    typed = [user({"type": "image"}, text="Text Recognition: /nothink")]
    prompt = ours_ocr.apply_chat_template(typed, enable_thinking=False)
    ids = ours_ocr(prompt, images=[page])["input_ids"][0].tolist()
    assert ids.count(nothink) == 1 and "Recognition: /nothink/nothink<|assistant|>" in unmark(
        prompt
    )


def test_glm_ocr_tool_responses_hold_images(ocr, ours_ocr, media):
    """A tool's reply with text and images in one <tool_response>: each image expanded where the
    tool returned it, pixels and ids as transformers' processor makes them."""
    call = {"function": {"name": "crop", "arguments": {"box": "[0, 0, 500, 500]"}}}
    messages = [
        user({"type": "image", "image": str(media / "wide.jpg")}, text="Read the table."),
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {
            "role": "tool",
            "content": [
                {"type": "text", "text": "The crop:"},
                {"type": "image", "image": str(media / "square.png")},
                {"type": "text", "text": "and the header:"},
                {"type": "image", "image": str(media / "rotated.jpg")},
            ],
        },
        {"role": "tool", "content": "done"},
    ]
    tools = [{"type": "function", "function": {"name": "crop", "parameters": {}}}]
    images, _ = ours_ocr.media_from_messages(messages)
    assert images == [str(media / n) for n in ("wide.jpg", "square.png", "rotated.jpg")]
    got = compare(
        "glm_ocr tool response with images",
        ours_ocr,
        ocr[1],
        messages,
        images=images,
        template_kwargs={"tools": tools},
    )
    text = ours_ocr.tokenizer.decode(got["input_ids"][0])
    assert text.count("<tool_response>") == 2 and "<|observation|>" in text
    assert len(got["image_grid_thw"]) == 3
    together = ours_ocr.process_messages(messages, template_kwargs={"tools": tools})
    for key, value in got.items():
        np.testing.assert_array_equal(together[key], value)


def test_pixel_budget_per_call_is_the_reference_size(ours, ref, media):
    """`min_pixels`/`max_pixels` per call (the server's `mm_processor_kwargs`) count one frame's
    pixels; they are transformers' `size` shortest/longest edge over the temporal patch."""
    t = ours.image_settings.temporal_patch_size
    prompt = ours.apply_chat_template([user({"type": "image"})])
    grids = {}
    for name, budget in [("tiny.png", {"min_pixels": 28 * 28 * 30}), ("wide.jpg", {})]:
        budget = {**budget, "max_pixels": 28 * 28 * 40}
        got = ours(text=prompt, images=[str(media / name)], **budget)
        size = {
            "shortest_edge": budget.get("min_pixels", 0) * t
            or ref.image_processor.size["shortest_edge"],
            "longest_edge": budget["max_pixels"] * t,
        }
        want = ref(text=[prompt], images=[str(media / name)], return_tensors="np", size=size)
        np.testing.assert_array_equal(got["image_grid_thw"], want["image_grid_thw"])
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
        assert np.abs(got["pixel_values"] - want["pixel_values"]).max() <= MAX_LIMIT
        grids[name] = got["image_grid_thw"][0]
    plain = ours(text=prompt, images=[str(media / "tiny.png")])["image_grid_thw"][0]
    assert plain.prod() < grids["tiny.png"].prod()  # the request's min_pixels took effect
