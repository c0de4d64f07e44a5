"""GLM-OCR: mlx-glm4v against mlx-vlm on the same checkpoint, page image and backend.

    # a GLM-OCR-shaped random checkpoint (published widths, fewer layers), 5 rounds
    python benchmarks/ocr_bench.py
    # the published shapes (0.9B parameters; float32 needs about 4 GB and patience on a CPU)
    python benchmarks/ocr_bench.py --size full
    # mlx-vlm installed in another Python: both tools run there (ours from this source tree)
    python benchmarks/ocr_bench.py --python /path/to/venv-vlm/bin/python

The checkpoint is built by transformers (`GlmOcrForConditionalGeneration`, random weights) in the
hub's layout: one safetensors file with the multi-token-prediction layer after the last decoder
layer, GLM-OCR's published preprocessor_config.json. Widths are the published ones (text 1536,
16 heads of 128, 8 KV heads, M-RoPE [16, 24, 24] over the whole head; vision 1024 wide, 16
heads; vocabulary 59,392); `--size bench` keeps 4 text and 4 vision layers of the published 16
and 24. The end tokens' rows of the head are zeroed so neither tool stops early (ours also runs
with --ignore-eos; the token counts are checked equal), and so are the rows past the
tokenizer's 2,000-odd ids (mlx-vlm cannot detokenize them). The page: a white 476x616 sheet of
dark text-like strokes in lines and a table, 374 image tokens.

Ours runs on the hub layout; mlx-vlm on the same weights without the MTP layer beside it (it
removes the layer only at the published depth, `layers.16`). Each run is a fresh process
(bench.py's Runner), ours and mlx-vlm's in turn, the first of a round alternating. Memory
above the weights: MLX's peak less the bytes of the weights the tool holds (ours: the model and
the MTP layer's own tensors, not the checkpoint's copies of the embeddings and head; mlx-vlm
drops the MTP layer). Targets (issue 25): prefill and decode at
least 1.0x mlx-vlm's, memory above the weights at most 0.9x.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402
import make_checkpoint  # noqa: E402

PROMPT = "Text Recognition:"
PAGE = (476, 616)  # width, height: multiples of 28, so no resize
SIZES = {"bench": (4, 4), "full": (16, 24)}  # (text layers, vision layers)
PREPROCESSOR = {
    "size": {"shortest_edge": 12544, "longest_edge": 9633792},
    "do_rescale": True,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Glm46VImageProcessor",
    "processor_class": "Glm46VProcessor",
}
TARGETS = {
    "prompt_tps": ("min", 1.0),
    "generation_tps": ("min", 1.0),
    "above_weights_gb": ("max", 0.9),
}


def build(path: Path, size: str, seed: int = 0) -> Path:
    """A random GLM-OCR checkpoint of `size` written by transformers in the hub's layout."""
    import torch
    import transformers as tf
    from safetensors.torch import load_file, save_file

    path.mkdir(parents=True, exist_ok=True)
    ids = make_checkpoint.build_tokenizer(path, 2000)
    text_layers, vision_layers = SIZES[size]
    eos = [ids[t] for t in make_checkpoint.EOS_TOKENS]
    tokens = dict(
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"],
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
    )
    text = dict(
        vocab_size=59392,
        hidden_size=1536,
        intermediate_size=4608,
        num_hidden_layers=text_layers,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 1.0,
            "mrope_section": [16, 24, 24],
        },
        num_nextn_predict_layers=1,
        eos_token_id=eos,
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(depth=vision_layers, hidden_size=1024, num_heads=16, intermediate_size=4096)
    config = tf.GlmOcrConfig(text_config=text, vision_config=vision, **tokens)
    torch.manual_seed(seed)
    model = tf.GlmOcrForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        model.lm_head.weight[eos] = 0.0
        # ids past the tokenizer's (the published vocabulary is wider than this one) never win
        model.lm_head.weight[ids["vocab_size"] :] = 0.0
        mtp = {
            f"model.language_model.layers.{text_layers}.{k}": v.clone()
            for k, v in model.model.language_model.layers[-1].state_dict().items()
        }
        prefix = f"model.language_model.layers.{text_layers}."
        h = text["hidden_size"]
        for name in ("enorm", "hnorm", "shared_head.norm"):
            mtp[f"{prefix}{name}.weight"] = 1 + 0.1 * torch.randn(h)
        mtp[f"{prefix}eh_proj.weight"] = 0.02 * torch.randn(h, 2 * h)
        mtp[f"{prefix}embed_tokens.weight"] = model.model.language_model.embed_tokens.weight
        mtp[f"{prefix}shared_head.head.weight"] = model.lm_head.weight
    model.save_pretrained(path, max_shard_size="100GB")
    weights = load_file(path / "model.safetensors")
    weights.update({k: v.contiguous().clone() for k, v in mtp.items()})
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    saved = json.loads((path / "config.json").read_text())
    # mlx-vlm's names for the image markers (its defaults are the real vocabulary's ids)
    saved.update(
        vision_start_token_id=tokens["image_start_token_id"],
        vision_end_token_id=tokens["image_end_token_id"],
        image_token_index=tokens["image_token_id"],
        video_token_index=tokens["video_token_id"],
    )
    # as published: mlx-vlm's vision config takes no rope_parameters (transformers 5 writes them)
    saved["vision_config"].pop("rope_parameters", None)
    (path / "config.json").write_text(json.dumps(saved, indent=2))
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    (path / "chat_template.jinja").write_text(make_checkpoint.CHAT_TEMPLATE)
    return path


def make_page(path: Path, seed: int = 0):
    """A white page of dark strokes in text lines, a heading and a ruled table."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    width, height = PAGE
    page = Image.new("RGB", PAGE, "white")
    draw = ImageDraw.Draw(page)
    draw.rectangle([60, 40, 420, 70], fill=(20, 20, 20))
    y = 110
    while y < height - 260:
        x = 60
        while x < width - 80:
            w = int(rng.integers(18, 70))
            draw.rectangle([x, y, min(x + w, width - 60), y + 11], fill=(30, 30, 40))
            x += w + int(rng.integers(8, 14))
        y += 24
    top = height - 230
    for r in range(6):
        draw.line([60, top + 32 * r, width - 60, top + 32 * r], fill=(0, 0, 0), width=2)
    for c in range(5):
        x = 60 + c * (width - 120) // 4
        draw.line([x, top, x, top + 160], fill=(0, 0, 0), width=2)
        for r in range(5):
            draw.rectangle([x + 10, top + 32 * r + 10, x + 60, top + 32 * r + 20], fill=(40,) * 3)
    page.save(path)


def without_mtp(path: Path) -> Path:
    """The same checkpoint without its MTP layer, beside it: mlx-vlm drops the layer only at
    the published depth (`layers.16`), so a scaled-down hub layout fails its load."""
    from safetensors.numpy import load_file, save_file

    out = path.with_name(path.name + "-no-mtp")
    if (out / "model.safetensors").exists():
        return out
    out.mkdir(exist_ok=True)
    layers = json.loads((path / "config.json").read_text())["text_config"]["num_hidden_layers"]
    mtp = f"language_model.layers.{layers}."
    weights = {k: v for k, v in load_file(path / "model.safetensors").items() if mtp not in k}
    for f in path.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def held_weight_bytes(path: Path, tool: str) -> int:
    """The checkpoint's bytes each tool keeps: ours drops only the MTP layer's copies of the
    embeddings and head; mlx-vlm drops the whole MTP layer."""
    layers = json.loads((path / "config.json").read_text())["text_config"]["num_hidden_layers"]
    mtp = f"language_model.layers.{layers}."
    copies = (mtp + "embed_tokens.", mtp + "shared_head.head.")
    if tool == "mlx-glm4v":
        return bench.safetensors_bytes(path, lambda k: not any(c in k for c in copies))
    return bench.safetensors_bytes(path, lambda k: mtp not in k)


def spread(runs: dict, key: str) -> str:
    """The rounds' range for each tool and of the ratio within a round (the tools ran back to
    back, so a round's ratio is what the machine's load shifts least)."""
    ours, theirs = [x[key] for x in runs["mlx-glm4v"]], [x[key] for x in runs["mlx-vlm"]]
    ratios = [a / b for a, b in zip(ours, theirs) if b]
    return (
        f"{min(ours):.3f}-{max(ours):.3f}; {min(theirs):.3f}-{max(theirs):.3f}; "
        f"{min(ratios):.2f}-{max(ratios):.2f}x"
    )


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--size", choices=sorted(SIZES), default="bench")
    ap.add_argument("--checkpoint", help="a GLM-OCR checkpoint to use instead of building one")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mlx-glm4v-ocr"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--blas", choices=("auto", "openblas", "bundled"), default="auto")
    ap.add_argument("--python", default=sys.executable, help="the Python both tools run in")
    ap.add_argument("--json-out", help="write every run and the summary here")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "BENCH_TMP": str(work)}
    # ours from this source tree, whichever Python runs it
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    backend = bench.blas_env(args.blas, env, log)
    if args.checkpoint:
        model = Path(args.checkpoint)
    else:
        model = work / f"glm-ocr-{args.size}"
        if not (model / "model.safetensors").exists():
            log(f"building a random GLM-OCR checkpoint ({args.size}) in {model}")
            build(model, args.size)
    stripped = without_mtp(model)
    page = work / "page.png"
    make_page(page)
    runner = bench.Runner(args.python, env, log)
    runs = {"mlx-glm4v": [], "mlx-vlm": []}

    def once(tool):
        if tool == "mlx-glm4v":
            return bench.run_ours(runner, model, PROMPT, [page], [], args.max_tokens)
        return bench.run_mlx_vlm(runner, stripped, PROMPT, [page], args.max_tokens)

    log("warm-up: each tool once")
    for tool in runs:
        result = once(tool)
        if "error" in result:
            raise SystemExit(f"{tool} failed:\n{result['error']}")
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for tool in order:
            result = once(tool)
            if "error" in result:
                raise SystemExit(f"{tool} failed:\n{result['error']}")
            result["above_weights_gb"] = (
                result["peak_memory_gb"] - held_weight_bytes(model, tool) / 1e9
            )
            runs[tool].append(result)
            log(
                f"round {r + 1} {tool}: prompt {result['prompt_tokens']} tokens at "
                f"{result['prompt_tps']:.1f}/s, decode {result['generation_tps']:.2f} tokens/s, "
                f"peak {result['peak_memory_gb']:.3f} GB ({result['above_weights_gb']:.3f} above "
                "the weights)"
            )
    counts = {
        t: {(x["prompt_tokens"], x["generation_tokens"]) for x in rs} for t, rs in runs.items()
    }
    if counts["mlx-glm4v"] != counts["mlx-vlm"]:
        raise SystemExit(f"the tools ran different token counts: {counts}")
    summary = {
        t: {k: statistics.median(x[k] for x in rs) for k in TARGETS} for t, rs in runs.items()
    }
    lines = [
        f"GLM-OCR ({args.size}), {backend}, page {PAGE[0]}x{PAGE[1]}, "
        f"{runs['mlx-glm4v'][0]['prompt_tokens']} prompt tokens, "
        f"{runs['mlx-glm4v'][0]['generation_tokens']} generated, medians of {args.rounds}",
        "| | mlx-glm4v | mlx-vlm | ratio | target | spread (ours; mlx-vlm; ratio by round) |",
        "|---|---|---|---|---|---|",
    ]
    ok = True
    for key, (kind, bound) in TARGETS.items():
        a, b = summary["mlx-glm4v"][key], summary["mlx-vlm"][key]
        ratio = a / b if b else float("nan")
        met = ratio >= bound if kind == "min" else ratio <= bound
        ok &= met
        target = f"{'>=' if kind == 'min' else '<='} {bound} {'ok' if met else 'MISSED'}"
        lines.append(
            f"| {key} | {a:.3f} | {b:.3f} | {ratio:.2f}x | {target} | {spread(runs, key)} |"
        )
    print("\n".join(lines))
    result = {"runs": runs, "summary": summary, "targets_met": ok}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
