"""Pixels for the layout detector: transformers' `PPDocLayoutV3ImageProcessor` with numpy.

The page is stretched to a fixed size (800x800 by default) with torch's uint8 bicubic *without*
antialiasing (what the processor asks for, to approximate `cv2.resize`): four taps at Keys'
a = -0.75, taps past the border folded onto the edge pixel, weights in fixed point, the columns
first and uint8 between the passes; then divided by 255 (mean 0, std 1).
"""

import numpy as np

from .image import load_image

SIZE = (800, 800)


def _cubic(x: np.ndarray) -> np.ndarray:
    a, x = -0.75, np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _weights(n_in: int, n_out: int):
    """Source indices (n_out, 4), integer weights and their precision in bits."""
    real = (n_in / n_out) * (np.arange(n_out) + 0.5) - 0.5
    start = np.floor(real).astype(np.int64) - 1
    t = real - np.floor(real)
    w = _cubic(np.stack([1 + t, t, 1 - t, 2 - t], axis=1))
    first = np.clip(start, 0, n_in - 1)
    merged = np.zeros((n_out, 4))
    for k in range(4):  # a tap past the border adds its weight to the edge pixel's
        slot = np.clip(start + k, 0, n_in - 1) - first
        np.add.at(merged, (np.arange(n_out), slot), w[:, k])
    bits = 0  # the most bits that keep twice the largest weight below 2**15
    while bits < 22 and int(0.5 + merged.max() * (1 << (bits + 1))) < (1 << 15):
        bits += 1
    fixed = merged * (1 << bits)
    fixed = np.trunc(fixed + np.where(fixed < 0, -0.5, 0.5)).astype(np.int64)
    return np.minimum(first[:, None] + np.arange(4), n_in - 1), fixed, bits


def _resample(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    x = np.moveaxis(x, axis, 0)
    index, w, bits = _weights(x.shape[0], n_out)
    acc = np.zeros((n_out,) + x.shape[1:], np.int64)
    for k in range(4):
        acc += x[index[:, k]].astype(np.int64) * w[:, k].reshape((-1,) + (1,) * (x.ndim - 1))
    out = np.clip((acc + (1 << (bits - 1))) >> bits, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def resize_bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) uint8 -> (height, width, C) uint8, as torch's `interpolate(..., "bicubic",
    antialias=False)` on a uint8 tensor."""
    if image.shape[1] != width:
        image = _resample(image, width, axis=1)
    if image.shape[0] != height:
        image = _resample(image, height, axis=0)
    return image


def layout_pixels(image, size: tuple = SIZE):
    """A page (path, PIL image or array) -> ((1, height, width, 3) float32 channels-last pixels,
    the page's (height, width))."""
    rgb = load_image(image)
    resized = resize_bicubic(rgb, *size)
    return (resized.astype(np.float32) / np.float32(255.0))[None], rgb.shape[:2]
