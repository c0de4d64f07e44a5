"""Pixels for the vision tower: reading images, `smart_resize`, bicubic resize, normalize,
patchify.

Mirrors transformers' `Glm4vImageProcessor` (the torchvision backend it picks by default) with
PIL and numpy. The resize is torch's own uint8 arithmetic (antialiased bicubic, integer weights,
the horizontal pass first), so pixels are equal to the reference's, not merely close: PIL's
filter is the same curve but keeps more bits of each weight, and Pillow runs the vertical pass
first when the height shrinks by a larger factor than the width, which moved pixels by up to 25
grey levels.
"""

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import Glm4vError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class PixelSettings:
    """One processor's settings, read from the checkpoint (image or video section)."""

    min_pixels: int
    max_pixels: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    rescale_factor: float = 1 / 255
    # glmga: target sizes are multiples of patch*merge*patch_expand_factor (the patches stay
    # patch_size wide, so the grid grows by that factor)
    patch_expand_factor: int = 1
    fps: float = 2  # videos only: frames sampled per second
    max_duration: float = 300  # videos only: longer clips get a fixed number of frames
    max_frames: int = 640  # videos only (glmga): the most frames sampled from a clip
    # videos only: "fixed" rate (Glm4vVideoProcessor), "dynamic", by duration
    # (Glm46VVideoProcessor), or "glmga" (GlmgaVideoProcessor: `fps` up to `max_frames`)
    sampling: str = "fixed"

    @classmethod
    def from_dict(cls, d: dict, default_max_pixels: int) -> "PixelSettings":
        size = d.get("size") or {}
        keys = (
            "patch_size",
            "temporal_patch_size",
            "merge_size",
            "image_mean",
            "image_std",
            "rescale_factor",
            "patch_expand_factor",
            "fps",
            "max_duration",
            "max_frames",
        )
        return cls(
            min_pixels=size.get("shortest_edge", 112 * 112),
            max_pixels=size.get("longest_edge", default_max_pixels),
            **{k: d[k] for k in keys if d.get(k) is not None},
        )


def existing_file(source, kind: str) -> Path:
    """The local file behind `source`; URLs are refused because nothing is downloaded here."""
    text = str(source)
    if text.startswith(("http://", "https://")):
        raise Glm4vError(
            f"{text}: only local {kind} files are read; download it and pass the path."
        )
    path = Path(text.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise Glm4vError(f"{path}: no such {kind} file.")
    return path


def load_image(image) -> np.ndarray:
    """(H, W, 3) uint8 RGB, read the way the reference reads each kind of input.

    Files: EXIF orientation applied, alpha dropped (transformers' `load_image` and torchvision's
    `decode_image` agree on this). PIL images and arrays: transparency composited onto white.
    """
    if isinstance(image, (str, Path)):
        path = existing_file(image, "image")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    if im.width * im.height > BOMB_PIXELS:  # whatever PIL's global says now
                        raise Glm4vError(_bomb_message(path, im.width * im.height))
                    return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            found = re.search(r"\((\d+) pixels\)", str(e))
            raise Glm4vError(_bomb_message(path, int(found.group(1)) if found else None)) from None
        except (OSError, ValueError, SyntaxError) as e:
            raise Glm4vError(f"{path} is not a readable image ({e}).") from None
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(white, image.convert("RGBA")).convert("RGB"))
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise Glm4vError(
        f"an image must be a file path, a PIL image or a numpy array, not {type(image).__name__}."
    )


BOMB_PIXELS = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS


def _bomb_message(path: Path, pixels) -> str:
    """Images past PIL's default safe size (89 MP): one sentence instead of PIL's message, which
    in the warning's case comes with a site-packages path. The limit is ours, not PIL's global,
    which other libraries in the process may lift (the glmocr SDK sets it to None)."""
    size = f" of {pixels / 1e6:,.1f} megapixels" if pixels else ""
    limit = BOMB_PIXELS / 1e6
    return (
        f"{path} is an image{size}, more than the {limit:,.1f} megapixels PIL opens safely (it "
        "could be a decompression bomb); scale it down first."
    )


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    """Channels first or last (first wins when ambiguous, as in the reference), 1, 3 or 4
    channels."""
    if a.dtype != np.uint8:
        raise Glm4vError(f"an image array must be uint8 (0-255), not {a.dtype}.")
    if a.ndim == 2:
        a = a[..., None]
    elif a.ndim == 3 and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise Glm4vError(
            f"an image array must be (H, W), or (H, W, C) or (C, H, W) with 1, 3 or 4 channels, "
            f"not {a.shape}."
        )
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    if a.shape[-1] == 4:
        # torchvision's arithmetic: float blend onto white, then scaled by 255.999 and truncated
        x = a.astype(np.float32) * np.float32(1 / 255)
        rgb = x[..., :3] * x[..., 3:] + (np.float32(1) - x[..., 3:])
        return (rgb * np.float32(255.999)).astype(np.uint8)
    return a


def smart_resize(
    num_frames: int, height: int, width: int, s: PixelSettings, max_pixels: int, name: str
):
    """The reference's target (height, width): multiples of patch*merge (times glmga's
    patch_expand_factor), t*h*w within the budget."""
    factor = s.patch_size * s.merge_size * s.patch_expand_factor
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    ratio = max(height, width) / min(height, width)
    if ratio > 200:
        raise Glm4vError(
            f"{name}: the aspect ratio {ratio:.0f}:1 is beyond the 200:1 the model accepts."
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / s.temporal_patch_size) * s.temporal_patch_size
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < s.min_pixels:
        beta = math.sqrt(s.min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(T, H, W, C) uint8 -> (T, height, width, C): torchvision's antialiased bicubic on uint8
    tensors."""
    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack([_resize_frame(f, height, width) for f in frames])


def _resize_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Two separable passes as torch's CPU kernel runs them: columns first, rounded to uint8,
    then rows."""
    if frame.shape[1] != width:
        frame = _resample(frame, width, axis=1)
    if frame.shape[0] != height:
        frame = _resample(frame, height, axis=0)
    return frame


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic with a = -0.5, torch's antialiasing filter."""
    a, x = -0.5, np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _int16_weights(n_in: int, n_out: int):
    """Taps ([n_out, K] source indices), int16-range weights and their precision in bits,
    computed as torch's `_compute_index_ranges_int16_weights` does (float64, normalised, then
    fixed point)."""
    scale = n_in / n_out
    support = 2.0 * max(scale, 1.0)
    taps = int(math.ceil(support)) * 2 + 1
    center = scale * (np.arange(n_out) + 0.5)
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)
    count = np.clip(np.minimum((center + support + 0.5).astype(np.int64), n_in) - first, 0, taps)
    k = np.arange(taps)
    w = _bicubic((first[:, None] + k - center[:, None] + 0.5) / max(scale, 1.0))
    w = np.where(k < count[:, None], w, 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total != 0, w / np.where(total != 0, total, 1.0), w)
    bits = 0  # the most bits that keep twice the largest weight below 2**15
    while bits < 22 and int(0.5 + w.max() * (1 << (bits + 1))) < (1 << 15):
        bits += 1
    w = w * (1 << bits)
    w = np.trunc(w + np.where(w < 0, -0.5, 0.5)).astype(np.int32)  # rounded half away from zero
    return np.minimum(first[:, None] + k, n_in - 1), w, bits


def _resample(x: np.ndarray, n_out: int, axis: int, block: int = 16) -> np.ndarray:
    """Resize axis 0 (rows) or 1 (columns) of (H, W, C) uint8 `x`: the sum of each output's taps
    times their integer weights, rounded, shifted and clamped. `block` rows at a time, so the
    int32 sums stay in cache; columns gather whole pixels, channels interleaved, without a
    transpose."""
    H, W, C = x.shape
    index, weights, bits = _int16_weights(x.shape[axis], n_out)
    flat = x.reshape(H, W * C)
    if axis == 1:
        taps = (index[:, :, None] * C + np.arange(C)).transpose(1, 0, 2).reshape(index.shape[1], -1)
        per_tap = np.repeat(weights.T, C, axis=1)  # [K, n_out * C]
        rows, shape = H, (H, n_out, C)

        def term(start, stop, k):
            return flat[start:stop, taps[k]], per_tap[k]
    else:
        rows, shape = n_out, (n_out, W, C)

        def term(start, stop, k):
            return flat[index[start:stop, k]], weights[start:stop, k, None]

    out = np.empty((rows, shape[1] * C), np.uint8)
    used = [k for k in range(weights.shape[1]) if weights[:, k].any()]
    acc, product = np.empty((2, min(block, rows), out.shape[1]), np.int32)
    for start in range(0, rows, block):
        stop = min(start + block, rows)
        a, t = acc[: stop - start], product[: stop - start]
        a.fill(1 << (bits - 1))
        for k in used:
            np.multiply(*term(start, stop, k), out=t)
            a += t
        np.right_shift(a, bits, out=a)
        out[start:stop] = np.clip(a, 0, 255)
    return out.reshape(shape)


def patchify(frames: np.ndarray, s: PixelSettings):
    """(T, H, W, 3) uint8, T a multiple of temporal_patch_size -> (rows, C*tp*p*p) float32 and
    (t, h, w).

    Rows run over (t, h/merge, w/merge, merge, merge) so that each merge x merge block is
    contiguous; features are ordered (C, tp, p, p) like the patch-embedding convolution's weight.
    """
    scale = np.float32(1 / s.rescale_factor)
    mean = np.asarray(s.image_mean, np.float32) * scale
    std = np.asarray(s.image_std, np.float32) * scale
    x = (frames.astype(np.float32) - mean) / std
    T, H, W, C = x.shape
    p, m, tp = s.patch_size, s.merge_size, s.temporal_patch_size
    gt, gh, gw = T // tp, H // p, W // p
    x = x.reshape(gt, tp, gh // m, m, p, gw // m, m, p, C).transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return x.reshape(gt * gh * gw, C * tp * p * p), (gt, gh, gw)


def image_patches(image, s: PixelSettings, max_pixels: int | None = None, name: str = "image"):
    """pixel_values rows and grid (1, h, w) for one image, its frame repeated over
    temporal_patch_size."""
    rgb = load_image(image)
    budget = (
        s.max_pixels
        if max_pixels is None
        else min(s.max_pixels, max_pixels * s.temporal_patch_size)
    )
    h, w = smart_resize(s.temporal_patch_size, *rgb.shape[:2], s, budget, name)
    frame = resize(rgb[None], h, w)
    return patchify(np.repeat(frame, s.temporal_patch_size, axis=0), s)
