"""The layout detector as a page reader: an image in, its regions out in reading order."""

import mlx.core as mx
import numpy as np

from ..checkpoints.layout import LAYOUT_MODEL, load_layout_model
from ..inputs.layout_image import layout_pixels
from .regions import detections, regions


class Layout:
    """`Layout(...)(image)` -> `Region`s (label, score, box, polygon, order), read first first."""

    def __init__(self, model, input_size: tuple, id2label: dict):
        self.model, self.input_size, self.id2label = model, input_size, id2label

    def raw(self, image):
        """(the model's outputs for one page, the page's (height, width))."""
        pixels, page_size = layout_pixels(image, self.input_size)
        out = self.model(mx.array(pixels))
        mx.eval(out.logits, out.pred_boxes, out.order_logits, out.out_masks)
        return out, page_size

    def forward(self, pixels: np.ndarray) -> list:
        """The model's outputs for one page's pixels, as numpy arrays (the MLX part of `detect`)."""
        out = self.model(mx.array(pixels))
        return [
            np.array(a[0]) for a in (out.logits, out.pred_boxes, out.order_logits, out.out_masks)
        ]

    def detect(self, image, threshold: float = 0.5, run=None) -> dict:
        """transformers' post-processed result for one page (arrays, `polygon_points`).
        `run(fn, *args)` runs the model's part where MLX is used (a shared engine's thread:
        `Engine.call`); by default here."""
        pixels, page_size = layout_pixels(image, self.input_size)
        arrays = run(self.forward, pixels) if run is not None else self.forward(pixels)
        return detections(*arrays, page_size, self.input_size, threshold)

    def __call__(self, image, threshold: float = 0.5, thresholds: dict | None = None) -> list:
        """Regions scoring at least `threshold` (and their label's entry in `thresholds`)."""
        return regions(self.detect(image, threshold), self.id2label, thresholds)


def load_layout(path_or_repo: str = LAYOUT_MODEL) -> Layout:
    """PP-DocLayoutV3 from a local directory or a hub id."""
    return Layout(*load_layout_model(path_or_repo))
