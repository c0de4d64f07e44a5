"""Peak MLX memory and time of the vision tower on one image of a given size, one JSON line per
size.

The pixel rows are random (values do not change the cost) for a 4:3 image of about N megapixels,
so sizes past the processor's own cap (4.8 MP with GLM-4.1V's settings) can be measured too.

    python benchmarks/vision_memory.py CKPT --megapixels 1 4 9.6
"""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlx_glm4v.checkpoints.loader import load_model  # noqa: E402


def grid_for(megapixels: float, patch: int = 14, merge: int = 2):
    """(rows, cols) of patches, both even, for a 4:3 image of about `megapixels`."""
    patches = megapixels * 1e6 / patch**2
    rows = round((patches * 3 / 4) ** 0.5 / merge) * merge
    cols = round(patches / rows / merge) * merge
    return rows, cols


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--megapixels", type=float, nargs="+", default=[1, 4, 9.6])
    args = parser.parse_args()
    model = load_model(args.model)
    cfg = model.config.vision_config
    features = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    weights = mx.get_active_memory()
    for mp in args.megapixels:
        h, w = grid_for(mp, cfg.patch_size, cfg.spatial_merge_size)
        rows = np.random.default_rng(0).standard_normal((h * w, features), dtype=np.float32)
        grid = np.array([[1, h, w]])
        mx.clear_cache()
        mx.reset_peak_memory()
        start = time.perf_counter()
        out = model.encode_frames(rows, grid)
        mx.eval(out)
        seconds = time.perf_counter() - start
        print(
            json.dumps(
                {
                    "megapixels": round(h * w * cfg.patch_size**2 / 1e6, 2),
                    "patches": h * w,
                    "tokens": out.shape[0],
                    "peak_gb": round(mx.get_peak_memory() / 1e9, 2),
                    "weights_gb": round(weights / 1e9, 2),
                    "seconds": round(seconds, 1),
                }
            ),
            flush=True,
        )
        del out


if __name__ == "__main__":
    main()
