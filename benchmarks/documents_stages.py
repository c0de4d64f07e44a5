"""Where `mlx-glm4v ocr`'s time goes, stage by stage, on the PDF and checkpoints that
`documents_bench.py` builds (run that first, or pass --work where it built them).

    python benchmarks/documents_stages.py --work /tmp/ocr-bench

Each stage's function is wrapped with a timer and the document read once in this process:
seconds summed per stage (the layout thread's stages overlap the engine's), the tokens prompted
and generated, and the vision tower's attention scores (heads x patches^2 x blocks per image:
the exponentials a softmax computes, which MLX's CPU backend runs on one core).
"""

import argparse
import functools
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from mlx_glm4v.checkpoints.loader import load
from mlx_glm4v.documents import layout, pipeline
from mlx_glm4v.inputs.processor import Processor
from mlx_glm4v.models.model import Model
from mlx_glm4v.serving.engine import Engine

SECONDS, CALLS = defaultdict(float), Counter()
STAGES = [  # (owner, attribute, stage)
    (pipeline, "render_pages", "render a page (pypdfium2)"),
    (layout, "layout_pixels", "detector: resize + normalise"),
    (layout.Layout, "forward", "detector: model (engine thread)"),
    (layout, "detections", "detector: post-processing"),
    (pipeline, "crop", "crop a region"),
    (pipeline, "prepare", "resize + JPEG round trip"),
    (Processor, "process_messages", "processor (patches, prompt)"),
    (Model, "run_vision_piece", "engine: vision tower"),
    (Engine, "_embed", "engine: embed the prompt"),
    (Engine, "_prefill", "engine: prefill (vision included)"),
    (Engine, "_decode", "engine: decode steps"),
]


def timed(fn, stage: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SECONDS[stage] += time.perf_counter() - start
            CALLS[stage] += 1

    return wrapper


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/ocr-bench"))
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    for owner, name, stage in STAGES:
        setattr(owner, name, timed(getattr(owner, name), stage))
    start = time.perf_counter()
    model, processor = load(str(args.work / "ocr"))
    detector = layout.load_layout(str(args.work / "layout"))
    loaded = time.perf_counter()
    grids = []
    submit = pipeline.Reader._submit

    def counted(reader, picture, prompt):
        handle = submit(reader, picture, prompt)
        grids.append(np.asarray(handle.request.inputs["image_grid_thw"]).reshape(-1, 3))
        return handle

    pipeline.Reader._submit = counted
    settings = pipeline.OcrSettings(max_tokens=args.max_tokens)
    with pipeline.Reader(model, processor, detector, settings) as reader:
        document = reader.read([args.work / "doc.pdf"])[0]
        stats = reader.engine.stats
    read = time.perf_counter() - loaded
    print(f"load {loaded - start:.2f} s, read {read:.2f} s ({len(document.pages)} pages)")
    for _, _, stage in STAGES:
        share = 100 * SECONDS[stage] / read
        print(f"  {stage:<36}{SECONDS[stage]:>8.2f} s {share:>5.1f}% {CALLS[stage]:>6} calls")
    vision = model.config.vision_config
    patches = np.concatenate(grids).prod(axis=1) if grids else np.zeros(0)
    scores = int((patches.astype(np.int64) ** 2).sum()) * vision.num_heads * vision.depth
    print(
        f"regions {len(grids)}, prompt tokens {document.usage[0]}, generated {document.usage[1]}"
        f" (decode steps {stats.decode_steps}, {stats.decode_rows / max(1, stats.decode_steps):.1f}"
        f" rows a step), vision patches {int(patches.sum())}, attention scores {scores / 1e6:.0f} M"
    )


if __name__ == "__main__":
    main()
