"""`mlx-glm4v finetune` against mlx-vlm's trainer: LoRA on the same checkpoint and data, whole
processes, seconds per step and MLX peak memory; and QLoRA on the 4-bit conversion against LoRA
on the float checkpoint.

    python benchmarks/finetune_bench.py                      # ~120M random GLM-4.1V, 336x336
    python benchmarks/finetune_bench.py --vocab 0            # its small vocabulary instead
    python benchmarks/finetune_bench.py --steps 8 --json-out finetune.json
    python benchmarks/finetune_bench.py --rounds 2           # ours, mlx-vlm, ours, mlx-vlm
    python benchmarks/finetune_bench.py --size tiny --steps 2  # a quick look

The checkpoint's embedding and lm_head have the published checkpoints' 151,552 rows by default
(`--vocab`; the tokenizer stays make_checkpoint.py's small BPE, see there): a training step's
head and its logits are then a real checkpoint's size. `--vocab 0` gives them the tokenizer's
~340 rows (the shape of the first measurements).

mlx-vlm is not a dependency of the test environment: give its Python with `--vlm-python` (a
venv made with `python3 -m venv /work/venv-vlm && /work/venv-vlm/bin/pip install
mlx-vlm==0.7.10`, the version of the other benchmarks); without one only our rows are measured.

The same conversations for both (an image in every record, a question and an answer), batch size
1, LoRA rank 8 / alpha 16 on the decoder's q, k, v, o, gate_up and down projections (both
tools' default targets), AdamW, gradient checkpointing on for both (`--no-grad-checkpoint`
turns it off). Each tool reports its own per-step figures: ours in `train_log.jsonl` (the step
and, within it, the reading of its data), mlx-vlm through a training callback (`step_time`, with
its data time apart). The first `--skip` steps are left out (compilation of the first shapes,
caches filling); the table gives medians of the rest, their fastest (steadier on a shared
machine) and the largest peak. On Linux OpenBLAS
is preloaded into both (`LD_PRELOAD`), as in bench.py.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_checkpoint  # noqa: E402

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
ROOT = Path(__file__).resolve().parents[1]

# run inside mlx-vlm's Python: its own `train` entry with a callback that prints each report
VLM_DRIVER = """
import json, sys
from mlx_vlm.train import parse_args, run
from mlx_vlm.trainer.common.callbacks import TrainingCallback

class Print(TrainingCallback):
    def on_train_loss_report(self, info):
        print("REPORT " + json.dumps(info), flush=True)

args, settings = parse_args(sys.argv[1:])
run(args, settings, Print())
"""


def picture(size: int, seed: int) -> Image.Image:
    """A smooth random picture (noise would be as costly, but less like a photograph)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


def write_data(root: Path, records: int, size: int):
    """The same conversations twice: ours (the image as a content part) and mlx-vlm's (an
    `images` column beside text messages)."""
    ours, theirs = root / "ours", root / "vlm"
    ours.mkdir(parents=True, exist_ok=True)
    theirs.mkdir(parents=True, exist_ok=True)
    lines, vlm_lines = [], []
    for i in range(records):
        image = root / f"image{i}.png"
        picture(size, i).save(image)
        question, answer = f"What does picture {i} show?", f"Picture {i} shows colours, {i} times."
        lines.append(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": str(image)}},
                            {"type": "text", "text": question},
                        ],
                    },
                    {"role": "assistant", "content": answer},
                ]
            }
        )
        vlm_lines.append(
            {
                "images": [str(image)],
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ],
            }
        )
    for folder, rows in ((ours, lines), (theirs, vlm_lines)):
        text = "".join(json.dumps(r) + "\n" for r in rows)
        (folder / "train.jsonl").write_text(text)
    return ours, theirs


def run(command, env, log_name: Path):
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    log_name.write_text(result.stdout + "\n---- stderr\n" + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{command[:4]} failed; see {log_name}:\n{result.stderr[-2000:]}")
    return result.stdout


def ours(checkpoint, data, out: Path, steps: int, gc: bool, env) -> list:
    command = [sys.executable, "-m", "mlx_glm4v", "finetune", "--model", str(checkpoint),
               "--data", str(data), "--adapter-path", str(out), "--iters", str(steps),
               "--batch-size", "1", "--lora-rank", "8", "--lora-alpha", "16",
               "--lora-keys", ",".join(TARGETS), "--learning-rate", "1e-4",
               "--steps-per-report", "1", "--save-every", str(10**6)]  # fmt: skip
    run(command + (["--grad-checkpoint"] if gc else []), env, out.with_suffix(".log"))
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [
        {"step": r["step"], "seconds": r["seconds"], "data_seconds": r["data_seconds"],
         "peak_gb": r["peak_memory_gb"], "loss": r["loss"]}
        for r in rows
    ]  # fmt: skip


def mlx_vlm(python, checkpoint, data, out: Path, steps: int, gc: bool, env) -> list:
    command = [python, "-c", VLM_DRIVER, "--model", str(checkpoint), "--data", str(data),
               "--iters", str(steps), "--batch-size", "1", "--lora-rank", "8",
               "--lora-alpha", "16", "--target-modules", *TARGETS, "--learning-rate", "1e-4",
               "--steps-per-report", "1", "--steps-per-save", str(10**6),
               "--output-path", str(out)]  # fmt: skip
    if gc:
        command.append("--grad-checkpoint")
    stdout = run(command, env, out.with_suffix(".log"))
    rows = [json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("REPORT ")]
    return [
        {"step": r["iteration"], "seconds": r["step_time"] + r["data_time_per_step"],
         "data_seconds": r["data_time_per_step"], "peak_gb": r["peak_memory"],
         "loss": r["train_loss"]}
        for r in rows
    ]  # fmt: skip


def summary(rows: list, skip: int) -> dict:
    kept = [r for r in rows if r["step"] > skip] or rows
    return {
        "seconds_per_step": statistics.median(r["seconds"] for r in kept),
        "fastest_step": min(r["seconds"] for r in kept),
        "compute_seconds_per_step": statistics.median(
            r["seconds"] - r["data_seconds"] for r in kept
        ),
        "peak_gb": max(r["peak_gb"] for r in rows),
        "first_loss": rows[0]["loss"],
        "last_loss": rows[-1]["loss"],
        "steps": len(rows),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(make_checkpoint.SHAPES), default="bench")
    ap.add_argument(
        "--vocab",
        type=int,
        default=make_checkpoint.PUBLISHED_VOCAB,
        help="Rows of the random checkpoint's embedding and lm_head; 0 for the tokenizer's size.",
    )
    ap.add_argument("--checkpoint", help="A float checkpoint to use instead of a random one.")
    ap.add_argument("--image-size", type=int, default=336)
    ap.add_argument("--records", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--skip", type=int, default=2, help="First steps left out of the medians.")
    ap.add_argument(
        "--qlora-steps",
        type=int,
        default=3,
        help="QLoRA's steps, 0 for none (its peak is the figure; MLX's CPU quantized backward "
        "is slow).",
    )
    ap.add_argument(
        "--rounds", type=int, default=1, help="Runs of each tool, interleaved (ours, mlx-vlm, ...)."
    )
    ap.add_argument("--no-grad-checkpoint", action="store_true")
    ap.add_argument("--vlm-python", default="/work/venv-vlm/bin/python")
    ap.add_argument("--blas", choices=("openblas", "bundled"), default="openblas")
    ap.add_argument("--work", help="Where to build (default: a temporary directory).")
    ap.add_argument("--json-out")
    a = ap.parse_args(argv)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if sys.platform == "linux" and a.blas == "openblas":
        if not Path(OPENBLAS).exists():
            raise SystemExit(f"{OPENBLAS} not found; apt-get install libopenblas0-pthread")
        env["LD_PRELOAD"] = OPENBLAS
    work = Path(a.work or tempfile.mkdtemp(prefix="finetune-bench-"))
    name = f"ckpt-{a.size}" + (f"-vocab{a.vocab}" if a.vocab else "")
    checkpoint = Path(a.checkpoint) if a.checkpoint else work / name
    if not a.checkpoint and not (checkpoint / "config.json").exists():
        make_checkpoint.build(checkpoint, a.size, vocab=a.vocab or None)
    quantized = work / f"{checkpoint.name}-4bit"
    if a.qlora_steps and not (quantized / "config.json").exists():
        command = [sys.executable, "-m", "mlx_glm4v", "convert", "--hf-path", str(checkpoint),
                   "--mlx-path", str(quantized), "-q", "--q-bits", "4"]  # fmt: skip
        run(command, env, work / "convert.log")
    ours_data, vlm_data = write_data(work / "data", a.records, a.image_size)
    gc = not a.no_grad_checkpoint
    vlm = Path(a.vlm_python).exists()
    results = {"settings": vars(a), "checkpoint": str(checkpoint), "rounds": []}
    for i in range(a.rounds):  # interleaved, so that the machine's other load falls on both
        one = {}
        rows = ours(checkpoint, ours_data, work / f"ours{i}", a.steps, gc, env)
        one["mlx-glm4v"] = summary(rows, a.skip)
        if vlm:
            rows = mlx_vlm(a.vlm_python, checkpoint, vlm_data, work / f"vlm{i}", a.steps, gc, env)
            one["mlx-vlm"] = summary(rows, a.skip)
        results["rounds"].append(one)
        print(f"round {i + 1}:")
        print_table(one)
    if a.qlora_steps:
        rows = ours(quantized, ours_data, work / "qlora", a.qlora_steps, gc, env)
        results["qlora"] = summary(rows, min(a.skip, a.qlora_steps - 1))
        lora = max(r["mlx-glm4v"]["peak_gb"] for r in results["rounds"])
        ratio = results["qlora"]["peak_gb"] / lora
        print(f"\nQLoRA (4-bit): {results['qlora']['seconds_per_step']:.2f} s per step, peak "
              f"{results['qlora']['peak_gb']:.3f} GB, {ratio:.2f}x LoRA's on the float checkpoint "
              f"(target <= 0.5)")  # fmt: skip
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(results, indent=2))


def print_table(results: dict):
    tools = [t for t in ("mlx-glm4v", "mlx-vlm") if t in results]
    print("| | " + " | ".join(tools) + " |")
    print("|---" * (len(tools) + 1) + "|")
    for key, label in (
        ("seconds_per_step", "seconds per step"),
        ("fastest_step", "fastest step (s)"),
        ("compute_seconds_per_step", "of which compute"),
        ("peak_gb", "peak memory (GB)"),
        ("first_loss", "loss, first step"),
        ("last_loss", "loss, last step"),
    ):
        print(f"| {label} | " + " | ".join(f"{results[t][key]:.3f}" for t in tools) + " |")
    if "mlx-vlm" in results:
        ours, theirs = results["mlx-glm4v"], results["mlx-vlm"]
        time = ours["seconds_per_step"] / theirs["seconds_per_step"]
        peak = ours["peak_gb"] / theirs["peak_gb"]
        print(
            f"\nours / mlx-vlm: step time {time:.2f}x (target <= 1.0), "
            f"peak memory {peak:.2f}x (<= 0.9)"
        )


if __name__ == "__main__":
    main()
