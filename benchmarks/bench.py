"""mlx-glm4v against mlx-vlm: the same checkpoint, inputs and backend, whole processes,
interleaved.

    # build a ~120M random GLM-4.1V, all cases, 3 rounds
    python benchmarks/bench.py
    python benchmarks/bench.py --cases image-f32 --rounds 5 --json-out results.json
    # take an existing float32 checkpoint instead
    python benchmarks/bench.py --checkpoint DIR
    # a tiny checkpoint and a few tokens (what CI runs)
    python benchmarks/bench.py --tiny

Each run is a fresh process: `mlx-glm4v generate --json` for ours and, when mlx-vlm is
installed in the same Python, `python -m mlx_vlm.generate --verbose` for mlx-vlm, A and B in
turn (which goes first alternates by round), after a warm-up that reads every file once and
starts each tool once. From each run: prompt tokens/s (vision tower included), generation
tokens/s, time to first token without loading (prompt tokens / prompt tokens/s: both tools time
the prompt from the prepared inputs to the first token) and from the start of the process (wall
time less decoding: imports, loading, preprocessing and the prompt, and the exit), our load time
(`load_s`), MLX's peak memory, the process's max RSS (wait4), the whole-process wall time
measured here around the process, its CPU time (user + system, wait4: steadier than wall time
on a busy machine), and what is left of the wall time besides the prompt and decoding. The
table gives medians over the rounds and the ratios ours/mlx-vlm with the targets of issues #7
and #10 (no single-stream figure below mlx-vlm's).

mlx-vlm's generation tokens/s counts n tokens over the n-1 steps after the first; it is
rescaled to (n-1)/time, which is what mlx-glm4v reports. Neither stops early: the random
checkpoint's end-of-sequence logits are pinned (see make_checkpoint.py), and the token counts
and prompt lengths of the two tools are checked to be equal.

Cases: image-f32, image-bf16, image-4bit (one 448x448 image; bfloat16 and 4-bit come from each
tool's own converter, 4-bit with the rest in bfloat16 as from the published weights),
multi-image (three images, float32), video (60 s at 24 fps, sampled at 2 fps; ours only, mlx-vlm
has no native GLM-4.1V video), session (ours, one process: a first question about the image, a
follow-up, and the same image again after reset()), stages (one in-process generation per tool
timed piece by piece, `python -X importtime` of each command line, and the greedy tokens of the
two compared, also on a twin checkpoint whose wider text weights make them vary), ab (both tools
in one process, alternating for --rounds: the prompt, decoding and the vision tower, wall and
CPU time; steadier than whole processes on a busy machine, see probe.py).

Roofline: a large matrix-vector product is timed in the same run and backend for float32,
bfloat16 and 4-bit weights; decode bandwidth = weight bytes read per token (the text decoder
and lm_head in the format used; not the embedding table) x generation tokens/s, given as a
percentage of the fastest of those mat-vecs and of the mat-vec in the case's own format.

On Linux, MLX's CPU wheel bundles a reference BLAS about 200x slower than OpenBLAS for float32
matrix products. With `apt-get install libopenblas0-pthread`, `--blas auto` (the default) finds
it and preloads it (LD_PRELOAD) into every process of both tools; `--blas bundled` keeps MLX's.

On a CPU, bfloat16 and 4-bit products have no fast path in MLX: with OpenBLAS one run of the
~120M checkpoint takes about 7 s in float32, 30 s in bfloat16 and over 3 minutes in 4-bit, the
video case about 50 s; `--cases image-4bit --rounds 1` keeps the 4-bit case affordable there.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_checkpoint  # noqa: E402

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
ALL_CASES = (
    "image-f32",
    "image-bf16",
    "image-4bit",
    "multi-image",
    "video",
    "session",
    "stages",
    "ab",
)
PROMPT = "Describe this image in detail."
MULTI_PROMPT = "What is different between these images? Compare them."
VIDEO_PROMPT = "What happens in this video?"
FOLLOWUP = "What colour is the square on the left?"

# Targets of issues #7 and #10 (ours / mlx-vlm): (metric, "min" or "max", bound).
TARGETS = {
    "image-f32": {
        "prompt_tps": ("min", 1.25),
        "generation_tps": ("min", 1.05),
        "peak_memory_gb": ("max", 0.9),
        "wall_s": ("max", 0.8),
        "ttft_s": ("max", 1.0),
        "ttft_start_s": ("max", 1.0),
    },
    "image-bf16": {
        "prompt_tps": ("min", 1.0),
        "generation_tps": ("min", 1.0),
        "peak_memory_gb": ("max", 1.0),
        "wall_s": ("max", 1.0),
        "ttft_s": ("max", 1.0),
        "ttft_start_s": ("max", 1.0),
    },
}
TARGETS["image-4bit"] = TARGETS["image-bf16"]
TARGETS["multi-image"] = TARGETS["image-bf16"]


# ---------------------------------------------------------------- inputs


def make_image(path: Path, width: int, height: int, seed: int):
    """A picture with gradients, stripes and a few solid shapes (not noise: resizing and patches
    behave as on a photo)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack(
        [x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), ((x + y) % 64) * 4], -1
    )
    for _ in range(4):
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        img[y0 : y0 + height // 4, x0 : x0 + width // 4] = rng.integers(0, 256, 3)
    Image.fromarray(img.astype(np.uint8)).save(path)


def make_video(path: Path, seconds: float, fps: int, size: int):
    """An MPEG-4 clip of a square moving over a gradient, written with PyAV."""
    import av
    import numpy as np

    y, x = np.mgrid[0:size, 0:size]
    background = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 96)], -1).astype(
        np.uint8
    )
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        side = size // 4
        for i in range(int(seconds * fps)):
            frame = background.copy()
            t = i / (seconds * fps)
            x0, y0 = int(t * (size - side)), int((0.5 + 0.4 * np.sin(6.28 * t)) * (size - side))
            frame[y0 : y0 + side, x0 : x0 + side] = (220, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ---------------------------------------------------------------- processes


class Runner:
    def __init__(self, python: str, env: dict, log):
        self.python, self.env, self.log = python, env, log
        script = Path(python).parent / "mlx-glm4v"
        self.ours = [str(script)] if script.exists() else [python, "-m", "mlx_glm4v.cli"]

    def run(self, cmd: list, timeout: float = 3600) -> dict:
        """Run `cmd`; its output, exit status, wall seconds and max RSS (GB) of that process
        alone."""
        out_path = Path(self.env["BENCH_TMP"]) / "out.txt"
        with open(out_path, "w+b") as out:
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env)
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            wall = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            text = out.read().decode("utf-8", "replace")
        # ru_maxrss is KiB on Linux, bytes on macOS; GB here are 1e9 bytes, as MLX's peak memory
        rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9
        if proc.returncode != 0:
            self.log(f"  command failed ({proc.returncode}): {' '.join(cmd)}\n{text[-3000:]}")
        return dict(
            rc=proc.returncode,
            output=text,
            wall_s=wall,
            max_rss_gb=rss,
            cpu_s=usage.ru_utime + usage.ru_stime,
        )

    def probe(self, *args) -> dict:
        r = self.run([self.python, str(HERE / "probe.py"), *map(str, args)])
        for line in r["output"].splitlines():
            if line.startswith("@@PROBE "):
                return json.loads(line[len("@@PROBE ") :])
        raise RuntimeError(f"probe {args[0]} failed:\n{r['output'][-3000:]}")


def gen_args(prompt, images, videos, max_tokens, repeat_option=True):
    """Options of either CLI: ours repeats --image per file, mlx-vlm takes `--image A B C`
    (repeated, it keeps only the last)."""
    args = ["--prompt", prompt, "--max-tokens", str(max_tokens)]
    for flag, files in (("--image", images), ("--video", videos)):
        if files and repeat_option:
            for f in files:
                args += [flag, str(f)]
        elif files:
            args += [flag, *map(str, files)]
    return args


def run_ours(runner, model, prompt, images, videos, max_tokens) -> dict:
    r = runner.run(
        runner.ours
        + ["generate", "--model", str(model), "--json", "--ignore-eos", "--temp", "0"]
        + gen_args(prompt, images, videos, max_tokens)
    )
    if r["rc"] != 0:
        return dict(error=r["output"][-2000:])
    data = json.loads([line for line in r["output"].splitlines() if line.startswith("{")][-1])
    return dict(
        metrics(
            data["prompt_tokens"],
            data["prompt_tps"],
            data["generation_tokens"],
            data["generation_tps"],
            data["peak_memory_gb"],
            r,
        ),
        load_s=data.get("load_s"),
    )


VLM_PATTERNS = {
    "prompt": re.compile(r"^Prompt: (\d+) tokens, ([\d.]+) tokens-per-sec", re.M),
    "generation": re.compile(r"^Generation: (\d+) tokens, ([\d.]+) tokens-per-sec", re.M),
    "peak": re.compile(r"^Peak memory: ([\d.]+) GB", re.M),
}


def run_mlx_vlm(runner, model, prompt, images, max_tokens) -> dict:
    r = runner.run(
        [
            runner.python,
            "-m",
            "mlx_vlm.generate",
            "--model",
            str(model),
            "--temperature",
            "0",
            "--verbose",
        ]
        + gen_args(prompt, images, [], max_tokens, repeat_option=False)
    )
    found = {k: p.findall(r["output"]) for k, p in VLM_PATTERNS.items()}
    if r["rc"] != 0 or not all(found.values()):
        return dict(error=r["output"][-2000:])
    (pt, ptps), (gt, gtps), peak = found["prompt"][-1], found["generation"][-1], found["peak"][-1]
    n = int(gt)
    # mlx-vlm: n tokens / time of the n-1 steps after the first; ours: (n-1) / the same time
    gtps = float(gtps) * (n - 1) / n if n > 1 else 0.0
    return metrics(int(pt), float(ptps), n, gtps, float(peak), r)


def metrics(prompt_tokens, prompt_tps, generation_tokens, generation_tps, peak, r) -> dict:
    ttft = prompt_tokens / prompt_tps if prompt_tps else float("nan")
    decode = (generation_tokens - 1) / generation_tps if generation_tps else 0.0
    return dict(
        prompt_tokens=prompt_tokens,
        prompt_tps=prompt_tps,
        generation_tokens=generation_tokens,
        generation_tps=generation_tps,
        ttft_s=ttft,
        ttft_start_s=r["wall_s"] - decode,
        peak_memory_gb=peak,
        max_rss_gb=r["max_rss_gb"],
        wall_s=r["wall_s"],
        cpu_s=r["cpu_s"],
        overhead_s=r["wall_s"] - ttft - decode,
    )


# ---------------------------------------------------------------- checkpoints


def safetensors_bytes(path: Path, keep) -> int:
    """Bytes of the tensors whose name passes `keep`, read from the safetensors headers only."""
    total = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        header.pop("__metadata__", None)
        total += sum(
            v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if keep(k)
        )
    return total


def decode_weight_bytes(path: Path) -> int:
    """Weights read to decode one token: the text decoder and lm_head, not the embedding table.
    Works for transformers' names, ours and mlx-vlm's."""
    return safetensors_bytes(
        path, lambda k: ("language_model" in k or "lm_head" in k) and "embed_tokens" not in k
    )


def decode_weight_format(path: Path) -> str:
    """float32, bfloat16 (or float16) or 4bit: the format most of the decode weights are stored
    in."""
    sizes = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        header.pop("__metadata__", None)
        for k, v in header.items():
            if "language_model" in k or "lm_head" in k:
                sizes[v["dtype"]] = (
                    sizes.get(v["dtype"], 0) + v["data_offsets"][1] - v["data_offsets"][0]
                )
    dtype = max(sizes, key=sizes.get) if sizes else "F32"
    return {"U32": "4bit", "BF16": "bfloat16", "F16": "bfloat16"}.get(dtype, "float32")


def convert(runner, tool, src, dst, extra, log) -> Path | None:
    newest_source = max(f.stat().st_mtime for f in Path(src).iterdir())
    if (dst / "config.json").exists() and (dst / "config.json").stat().st_mtime >= newest_source:
        return dst  # converted from this very checkpoint before
    if dst.exists():
        shutil.rmtree(dst)
    cmd = (
        runner.ours + ["convert", "--hf-path", str(src), "--mlx-path", str(dst)]
        if tool == "ours"
        else [
            runner.python,
            "-m",
            "mlx_vlm",
            "convert",
            "--hf-path",
            str(src),
            "--mlx-path",
            str(dst),
        ]
    )
    r = runner.run(cmd + extra)
    if r["rc"] != 0:
        log(f"  {tool} convert {' '.join(extra)} failed; that case is skipped for {tool}.")
        return None
    return dst


# ---------------------------------------------------------------- report


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}"


def summarize(runs: list) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[-1].get("error", "no run") if runs else "no run"}
    keys = [k for k in ok[0] if isinstance(ok[0][k], (int, float))]
    out = {k: median([r[k] for r in ok]) for k in keys}
    out["runs"] = len(ok)
    out["generation_tokens_all"] = sorted({r["generation_tokens"] for r in ok})
    return out


METRICS = [
    ("prompt_tokens", "prompt tok", 0),
    ("prompt_tps", "prompt tok/s", 1),
    ("generation_tokens", "gen tok", 0),
    ("generation_tps", "gen tok/s", 2),
    ("ttft_s", "TTFT s", 2),
    ("ttft_start_s", "TTFT from start s", 2),
    ("load_s", "load s", 2),
    ("peak_memory_gb", "MLX peak GB", 3),
    ("max_rss_gb", "max RSS GB", 3),
    ("wall_s", "wall s", 2),
    ("cpu_s", "CPU s", 2),
    ("overhead_s", "start-up+exit s", 2),
    ("decode_weight_bytes", "decode MB/token", 0),
    ("decode_gb_per_s", "decode GB/s", 2),
    ("roofline_pct", "roofline %", 1),
    ("roofline_same_format_pct", "% of same-format mat-vec", 1),
]
RATIOS = [
    ("prompt_tps", "prompt tok/s"),
    ("generation_tps", "gen tok/s"),
    ("ttft_s", "TTFT"),
    ("ttft_start_s", "TTFT from start"),
    ("peak_memory_gb", "MLX peak"),
    ("max_rss_gb", "max RSS"),
    ("wall_s", "wall"),
    ("cpu_s", "CPU"),
]


def report(results: dict, header: str) -> str:
    lines = [header, ""]
    lines.append("| case | tool | " + " | ".join(m[1] for m in METRICS) + " |")
    lines.append("|---|---|" + "---|" * len(METRICS))
    for case, tools in results["cases"].items():
        for tool, s in tools.items():
            if "error" in s:
                lines.append(
                    f"| {case} | {tool} | error: {s['error'].strip().splitlines()[-1][:100]} |"
                )
                continue
            cells = []
            for key, _, digits in METRICS:
                v = s.get(key)
                if key == "decode_weight_bytes" and v is not None:
                    v = v / 1e6
                cells.append(fmt(int(round(v)) if digits == 0 and v is not None else v, digits))
            lines.append(f"| {case} | {tool} | " + " | ".join(cells) + " |")
    ratio_rows = []
    for case, tools in results["cases"].items():
        a, b = tools.get("mlx-glm4v"), tools.get("mlx-vlm")
        if not a or not b or "error" in a or "error" in b:
            continue
        cells = []
        for key, _ in RATIOS:
            if not b.get(key):
                cells.append("-")
                continue
            ratio = a[key] / b[key]
            target = TARGETS.get(case, {}).get(key)
            mark = ""
            if target:
                kind, bound = target
                met = ratio >= bound if kind == "min" else ratio <= bound
                mark = f" ({'>=' if kind == 'min' else '<='}{bound:g} {'ok' if met else 'MISSED'})"
            cells.append(f"{ratio:.2f}{mark}")
        ratio_rows.append(f"| {case} | " + " | ".join(cells) + " |")
    if ratio_rows:
        lines += [
            "",
            "Ratios ours / mlx-vlm (medians; targets of issues #7 and #10 in brackets):",
            "",
            "| case | " + " | ".join(r[1] for r in RATIOS) + " |",
            "|---|" + "---|" * len(RATIOS),
        ]
        lines += ratio_rows
    if results.get("session"):
        s = results["session"]
        lines += ["", "Second question (mlx-glm4v, one process, ChatSession):", ""]
        if "error" in s:
            lines.append("error: " + s["error"].strip().splitlines()[-1])
        else:
            first = s["first"].get("ttft_s")
            lines += ["| turn | TTFT s | prompt tokens run | ratio to first |", "|---|---|---|---|"]
            for name, label in (
                ("first", "image + question"),
                ("second", "follow-up question"),
                ("again_after_reset", "reset(), same image + question"),
            ):
                t = s[name]
                if "error" in t:
                    lines.append(f"| {label} | error: {t['error'][:120]} | | |")
                    continue
                ratio = t["ttft_s"] / first if first else None
                lines.append(
                    f"| {label} | {t['ttft_s']:.3f} | {t['prompt_tokens_run']} | {fmt(ratio, 3)}"
                    + (" (target <= 0.10)" if name == "second" else "")
                    + " |"
                )
    if results.get("stages"):
        st = results["stages"]
        tools = [t for t in ("mlx-glm4v", "mlx-vlm") if t in st and "error" not in st[t]]
        rows = [
            ("import_s", "imports"),
            ("load_s", "load weights + processor"),
            ("preprocess_in_generate_s", "preprocessing (template, image, patches)"),
            ("vision_s", "vision tower (timed alone)"),
            ("text_prefill_s", "text prefill (TTFT - vision)"),
            ("ttft_s", "time to first token"),
            ("ttft_loaded_s", "time to first token, loading included"),
            ("decode_s", "decode"),
        ]
        lines += [
            "",
            "Stages of one generation in one process (seconds):",
            "",
            "| stage | " + " | ".join(tools) + " |",
            "|---|" + "---|" * len(tools),
        ]
        rows += [
            ("weights_gb", "MLX memory after loading, GB"),
            ("peak_memory_gb", "MLX peak of the generation, GB"),
            ("vision_peak_gb", "MLX peak of the vision tower alone, GB"),
        ]
        for key, label in rows:
            lines.append(f"| {label} | " + " | ".join(fmt(st[t].get(key), 3) for t in tools) + " |")
        lines.append(
            "| heavy modules imported | "
            + " | ".join(", ".join(st[t]["modules"]) for t in tools)
            + " |"
        )
        imports = {t: st[t].get("imports") for t in tools if "top" in (st[t].get("imports") or {})}
        if imports:
            lines += [
                "",
                "Imports of each command line (python -X importtime, top-level packages, seconds):",
                "",
            ]
            for t, imp in imports.items():
                lines.append(
                    f"- {t}: total {imp['total_s']:.2f}; "
                    + ", ".join(f"{name} {sec:.2f}" for name, sec in imp["top"][:8])
                )
        if "tokens_match" in st:
            lines += ["", f"Greedy tokens, ours vs mlx-vlm: {st['tokens_match']}"]
    if results.get("ab"):
        ab = results["ab"]
        if "error" in ab:
            lines += ["", "One process, both tools: error: " + ab["error"].strip().splitlines()[-1]]
        else:
            lines += [
                "",
                f"Both tools in one process, alternating ({ab['rounds']} round(s), medians, "
                f"seconds; {ab['tokens']['mlx-glm4v']} tokens decoded; CPU = user + system of the "
                "process):",
                "",
                "| | mlx-glm4v | mlx-vlm | ratio |",
                "|---|---|---|---|",
            ]
            for key, label in (
                ("prompt_s", "prompt (each tool's statistic)"),
                ("prompt_cpu_s", "prompt, CPU"),
                ("decode_s", "decode"),
                ("decode_cpu_s", "decode, CPU"),
                ("vision_s", "vision tower alone"),
                ("vision_cpu_s", "vision tower alone, CPU"),
            ):
                lines.append(
                    f"| {label} | {ab['mlx-glm4v'][key]:.3f} | {ab['mlx-vlm'][key]:.3f} | "
                    f"{ab['ratios'][key]:.3f} |"
                )
    if results.get("roofline"):
        lines += [
            "",
            "Matrix-vector bandwidth (GB/s): "
            + ", ".join(f"{k} {v:.2f}" for k, v in results["roofline"]["gb_per_s"].items())
            + f" ([{results['roofline']['rows']} x {results['roofline']['cols']}] @ vector, "
            f"median of {results['roofline']['repeats']}). Roofline % = decode MB/token x gen "
            f"tok/s against the fastest ({results['roofline']['reference']}); the last column "
            "against the mat-vec of the case's own format.",
        ]
    for note in results.get("notes", []):
        lines.append("Note: " + note)
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def blas_env(choice: str, env: dict, log) -> str:
    if sys.platform != "linux":
        return "Accelerate (macOS)" if sys.platform == "darwin" else "bundled"
    have = Path(OPENBLAS).exists()
    if choice == "openblas" and not have:
        raise SystemExit(
            f"--blas openblas: {OPENBLAS} not found; apt-get install libopenblas0-pthread"
        )
    if choice == "openblas" or (choice == "auto" and have):
        env["LD_PRELOAD"] = OPENBLAS
        log(f"note: OpenBLAS preloaded into both tools (LD_PRELOAD={OPENBLAS})")
        return "OpenBLAS (LD_PRELOAD)"
    env.pop("LD_PRELOAD", None)
    if choice == "auto":
        log(
            "note: MLX's bundled reference BLAS (slow); "
            "apt-get install libopenblas0-pthread for OpenBLAS"
        )
    return "MLX bundled reference BLAS"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    ap.add_argument(
        "--cases", default=",".join(ALL_CASES), help=f"comma-separated, of {', '.join(ALL_CASES)}"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--warmup",
        type=int,
        default=1,
        help=(
            "untimed one-token runs of each tool first, after reading every file once (disk cache)"
        ),
    )
    ap.add_argument("--max-tokens", type=int, default=100)
    ap.add_argument(
        "--checkpoint", help="an existing float32 GLM-4.1V checkpoint (default: build a random one)"
    )
    ap.add_argument(
        "--work",
        default=str(HERE.parent / ".bench" / "work"),
        help="where checkpoints and media go",
    )
    ap.add_argument("--blas", choices=("auto", "openblas", "bundled"), default="auto")
    ap.add_argument(
        "--openblas", action="store_const", const="openblas", dest="blas", help="= --blas openblas"
    )
    ap.add_argument("--python", default=sys.executable, help="the Python both tools run in")
    ap.add_argument(
        "--no-mlx-vlm", action="store_true", help="ours only, even if mlx-vlm is installed"
    )
    ap.add_argument(
        "--tiny", action="store_true", help="tiny checkpoint and inputs, a few tokens (CI)"
    )
    ap.add_argument("--json-out", help="write every run and the summary here")
    args = ap.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(args.cases) - set(ALL_CASES)
    if unknown:
        ap.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    if args.tiny and "--max-tokens" not in (argv if argv is not None else sys.argv):
        args.max_tokens = 4
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ, BENCH_TMP=str(work), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false"
    )
    blas = blas_env(args.blas, env, log)
    runner = Runner(args.python, env, log)
    info = runner.probe("env")
    use_vlm = bool(info["mlx_vlm"]) and not args.no_mlx_vlm
    if not use_vlm:
        log(
            "note: mlx-vlm is not installed in this Python (or --no-mlx-vlm): ours only, no ratios."
        )
    notes = []
    if info.get("torch"):
        notes.append(
            f"torch {info['torch']} is installed in this environment (a Mac user's has none)."
        )

    # checkpoint and media
    size = "tiny" if args.tiny else "bench"
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
    else:
        ckpt = work / f"ckpt-{size}-f32"
        if not (ckpt / "config.json").exists():
            log(f"building a random {size} checkpoint in {ckpt}")
            make_checkpoint.build(ckpt, size)
    params = (
        make_checkpoint.parameter_count(ckpt) if (ckpt / "model.safetensors").exists() else None
    )
    media = work / f"media-{size}"
    media.mkdir(exist_ok=True)
    side = 56 if args.tiny else 448
    image = media / "image.png"
    extra_images = [media / "image2.png", media / "image3.png"]
    if not image.exists():
        make_image(image, side, side, 0)
        make_image(extra_images[0], side * 3 // 4 if not args.tiny else 56, side, 1)
        make_image(
            extra_images[1],
            side * 3 // 4 if not args.tiny else 28,
            side * 3 // 4 if not args.tiny else 56,
            2,
        )
    video = media / "video.mp4"
    if "video" in args.cases and not video.exists():
        if args.tiny:
            make_video(video, 2, 4, 56)
        else:
            make_video(video, 60, 24, 224)

    try:
        rev = subprocess.run(
            ["git", "-C", str(HERE.parent), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        rev = ""
    header = (
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM, "
        f"{info['platform']}; Python {info['python']}; MLX {info['mlx']} ({info['backend']} "
        f"backend, {info['device']}); BLAS: {blas}; mlx-glm4v "
        f"{info['mlx_glm4v']}{f' ({rev})' if rev else ''}, mlx-vlm "
        f"{info['mlx_vlm'] or 'not installed'}, torch {info['torch'] or 'not installed'}.\n"
        f"Checkpoint: {ckpt.name}, random GLM-4.1V, {params / 1e6:.1f}M parameters; "
        f"{args.rounds} round(s), {args.max_tokens} generated tokens, greedy, medians."
    )

    # cases -> {tool: (model dir, prompt, images, videos)}
    plans = {}
    vlm = use_vlm
    if "image-f32" in args.cases:
        plans["image-f32"] = {"mlx-glm4v": (ckpt, PROMPT, [image], [])}
        if vlm:
            plans["image-f32"]["mlx-vlm"] = (ckpt, PROMPT, [image], [])
    for case, extra in (
        ("image-bf16", ["--dtype", "bfloat16"]),
        ("image-4bit", ["-q", "--q-bits", "4", "--q-group-size", "64", "--dtype", "bfloat16"]),
    ):
        if case not in args.cases:
            continue
        tag = case.split("-")[1]
        plans[case] = {}
        ours = convert(runner, "ours", ckpt, work / f"{ckpt.name}-ours-{tag}", extra, log)
        if ours:
            plans[case]["mlx-glm4v"] = (ours, PROMPT, [image], [])
        else:
            notes.append(f"{case}: `mlx-glm4v convert {' '.join(extra)}` failed; ours skipped.")
        if vlm:
            theirs = convert(runner, "mlx-vlm", ckpt, work / f"{ckpt.name}-vlm-{tag}", extra, log)
            if theirs:
                plans[case]["mlx-vlm"] = (theirs, PROMPT, [image], [])
            else:
                notes.append(
                    f"{case}: `mlx_vlm convert {' '.join(extra)}` failed; mlx-vlm skipped."
                )
    if "multi-image" in args.cases:
        plans["multi-image"] = {"mlx-glm4v": (ckpt, MULTI_PROMPT, [image] + extra_images, [])}
        if vlm:
            plans["multi-image"]["mlx-vlm"] = (ckpt, MULTI_PROMPT, [image] + extra_images, [])
    if "video" in args.cases:
        plans["video"] = {"mlx-glm4v": (ckpt, VIDEO_PROMPT, [], [video])}

    def run(tool, plan, max_tokens=args.max_tokens):
        model, prompt, images, videos = plan
        if tool == "mlx-glm4v":
            return run_ours(runner, model, prompt, images, videos, max_tokens)
        return run_mlx_vlm(runner, model, prompt, images, max_tokens)

    raw = {case: {tool: [] for tool in tools} for case, tools in plans.items()}
    if args.warmup and plans:
        # the page cache holds every checkpoint and input; each tool has started once (bytecode
        # caches, shared libraries): the timed runs then all start alike
        log(f"warm-up: files read, {args.warmup} untimed one-token run(s) of each tool")
        for tools in plans.values():
            for model, _, images, videos in tools.values():
                for f in [*Path(model).iterdir(), *images, *videos]:
                    if f.is_file():
                        f.read_bytes()
        first = next(iter(plans.values()))
        for _ in range(args.warmup):
            for tool, plan in first.items():
                run(tool, (plan[0], plan[1], plan[2][:1], []), max_tokens=1)
    for rnd in range(args.rounds):
        for case, tools in plans.items():
            order = list(tools) if rnd % 2 == 0 else list(tools)[::-1]
            for tool in order:
                r = run(tool, tools[tool])
                raw[case][tool].append(r)
                brief = (
                    "error"
                    if "error" in r
                    else f"prompt {r['prompt_tps']:.1f} tok/s, gen {r['generation_tps']:.2f} "
                    f"tok/s, wall {r['wall_s']:.2f} s"
                )
                log(f"round {rnd + 1}/{args.rounds} {case} {tool}: {brief}")

    results = {
        "machine": info,
        "revision": rev,
        "blas": blas,
        "checkpoint": str(ckpt),
        "parameters": params,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "cases": {},
        "raw": raw,
        "notes": notes,
    }

    rows, cols = (1024, 1024) if args.tiny else (16384, 8192)
    roof = runner.probe(
        "roofline", "--rows", rows, "--cols", cols, "--repeats", 5 if args.tiny else 20
    )
    roof["reference"] = max(roof["gb_per_s"], key=roof["gb_per_s"].get)
    results["roofline"] = roof
    reference_bw = results["roofline"]["gb_per_s"][results["roofline"]["reference"]] * 1e9

    for case, tools in raw.items():
        results["cases"][case] = {}
        for tool, runs in tools.items():
            s = summarize(runs)
            if "error" not in s:
                model = plans[case][tool][0]
                s["decode_weight_bytes"] = decode_weight_bytes(model)
                s["decode_gb_per_s"] = s["decode_weight_bytes"] * s["generation_tps"] / 1e9
                s["roofline_pct"] = 100 * s["decode_gb_per_s"] * 1e9 / reference_bw
                fmt_ = s["weight_format"] = decode_weight_format(model)
                s["roofline_same_format_pct"] = (
                    100 * s["decode_gb_per_s"] / results["roofline"]["gb_per_s"][fmt_]
                )
                if len(s["generation_tokens_all"]) > 1 or s["generation_tokens_all"] != [
                    args.max_tokens
                ]:
                    notes.append(
                        f"{case} {tool}: generated {s['generation_tokens_all']} tokens, "
                        f"not {args.max_tokens}: the runs are not comparable."
                    )
            results["cases"][case][tool] = s
        counts = {
            t: s.get("prompt_tokens") for t, s in results["cases"][case].items() if "error" not in s
        }
        if len(set(counts.values())) > 1:
            notes.append(
                f"{case}: the tools' prompts differ in length {counts}: not the same input."
            )

    if "session" in args.cases:
        log("session: first question, follow-up, same image after reset (ours)")
        try:
            results["session"] = runner.probe(
                "session",
                "--model",
                ckpt,
                "--image",
                image,
                "--prompt",
                PROMPT,
                "--followup",
                FOLLOWUP,
                "--max-tokens",
                min(args.max_tokens, 20),
            )
        except RuntimeError as e:
            results["session"] = {"error": str(e)}

    if "ab" in args.cases and vlm:
        log(f"ab: both tools in one process, alternating, {args.rounds} round(s)")
        try:
            results["ab"] = runner.probe(
                "ab",
                "--model",
                ckpt,
                "--image",
                image,
                "--prompt",
                PROMPT,
                "--max-tokens",
                min(args.max_tokens, 30),
                "--rounds",
                args.rounds,
            )
        except RuntimeError as e:
            results["ab"] = {"error": str(e)}
    elif "ab" in args.cases:
        notes.append("ab: needs mlx-vlm in this Python; skipped.")

    if "stages" in args.cases:
        log("stages: one generation per tool, timed piece by piece")
        st = {}
        for tool in ("mlx-glm4v", "mlx-vlm") if vlm else ("mlx-glm4v",):
            try:
                st[tool] = runner.probe(
                    "stages",
                    "--tool",
                    "ours" if tool == "mlx-glm4v" else "mlx-vlm",
                    "--model",
                    ckpt,
                    "--image",
                    image,
                    "--prompt",
                    PROMPT,
                    "--max-tokens",
                    min(args.max_tokens, 30),
                )
            except RuntimeError as e:
                st[tool] = {"error": str(e)}
        if vlm and all("error" not in st[t] for t in st):
            a, b = st["mlx-glm4v"]["tokens"], st["mlx-vlm"]["tokens"]
            st["tokens_match"] = describe_match(a, b, "this checkpoint")
            # the benchmark's weights (std 0.02) make a random model repeat one token; a twin with
            # wider text weights produces varied tokens, a real test of agreement
            # (text std 0.1); on the main image and on a 336x336 one, whose 24x24 patches need no
            # interpolation of the vision tower's position embeddings
            varied = work / f"ckpt-{size}-f32-varied"
            if not (varied / "config.json").exists():
                make_checkpoint.build(varied, size, text_std=0.1)
            native = media / "image-336.png"
            if not native.exists():
                make_image(native, 336, 336, 3)
            for picture in (image, native):
                toks = {}
                for tool in ("ours", "mlx-vlm"):
                    toks[tool] = runner.probe(
                        "stages",
                        "--tool",
                        tool,
                        "--model",
                        varied,
                        "--image",
                        picture,
                        "--prompt",
                        PROMPT,
                        "--max-tokens",
                        min(args.max_tokens, 30),
                    )["tokens"]
                st["tokens_match"] += "; " + describe_match(
                    toks["ours"], toks["mlx-vlm"], f"a twin with text std 0.1, {picture.name}"
                )
        # what each command line imports before it can start (python -X importtime, one token)
        cli = {
            "mlx-glm4v": [
                "-m",
                "mlx_glm4v.cli",
                "generate",
                "--model",
                ckpt,
                "--json",
                "--image",
                image,
            ],
            "mlx-vlm": [
                "-m",
                "mlx_vlm.generate",
                "--model",
                ckpt,
                "--temperature",
                "0",
                "--image",
                image,
            ],
        }
        for tool in st:
            if tool in cli and "error" not in st[tool]:
                try:
                    st[tool]["imports"] = runner.probe(
                        "imports", "--", *cli[tool], "--prompt", PROMPT, "--max-tokens", 1
                    )
                except RuntimeError as e:
                    st[tool]["imports"] = {"error": str(e)}
        results["stages"] = st

    text = report(results, header)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2, default=str))
    return results


def describe_match(a, b, what) -> str:
    n = min(len(a), len(b))
    same = next((i for i in range(n) if a[i] != b[i]), n)
    distinct = len(set(a))
    if same == n and len(a) == len(b):
        return f"identical on {what} ({n} tokens, {distinct} distinct)"
    return (
        f"DIFFER on {what} from token {same} of {n} (ours {a[same : same + 5]}, "
        f"mlx-vlm {b[same : same + 5]})"
    )


if __name__ == "__main__":
    main()
