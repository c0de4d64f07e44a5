"""The GLM-OCR pipeline end to end: the `glmocr` SDK (self-hosted: transformers' PP-DocLayoutV3
on torch) with an OCR server as its backend, against `mlx-glm4v ocr` (one process).

    python benchmarks/documents_bench.py                 # build everything, run both, a table
    python benchmarks/documents_bench.py --backend ours  # the SDK's backend: our own `serve`
    python benchmarks/documents_bench.py --json-out r.json
    python benchmarks/documents_bench.py --tiny --backend ours    # tests' checkpoint, 2 pages (CI)

Built here, under --work: a 10-page PDF (pages drawn with PIL: a title, text, a 5x4 table, a
numbered formula, a figure, closing lines, on a textured ground; written losslessly, so that the
SDK's PyMuPDF and our pypdfium2 render the same pixels), a random GLM-OCR-shaped checkpoint
built with transformers (text hidden 256 x 4 layers, head_dim 64; vision hidden 256 x 4
blocks; 8M parameters; its MTP layer left out, see `for_mlx_vlm`) and a tiny PP-DocLayoutV3
(tests/layouts.py: its heads solved to find seven regions on page 1; on the other pages its
random features give 3-6 regions of several labels).

Each pipeline is timed whole, from its process's start to its exit (loading included; the
SDK's OCR server is started and loaded before, and its start is not counted): pages per minute.
Peak memory is the sum of the processes' peak resident sets (VmHWM, or wait4's ru_maxrss). The
random checkpoint rarely stops early, so every region's reply runs to --max-tokens in both
pipelines. The SDK's backend is mlx-vlm's server from the virtual environment --vlm-python
(`--backend vlm`, the route the SDK's README gives for Macs), else our `serve` (`--backend ours`).
"""

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
REGIONS = [  # what the detector is solved to find on page 1 (reading order, fractions)
    ("paragraph_title", (0.08, 0.04, 0.6, 0.08)),
    ("text", (0.08, 0.10, 0.9, 0.30)),
    ("table", (0.08, 0.35, 0.9, 0.57)),
    ("display_formula", (0.15, 0.60, 0.7, 0.66)),
    ("formula_number", (0.75, 0.60, 0.9, 0.66)),
    ("image", (0.25, 0.68, 0.75, 0.92)),
    ("text", (0.08, 0.94, 0.9, 0.98)),
]


def page(i: int) -> Image.Image:
    rng = np.random.RandomState(0)
    im = Image.fromarray(rng.randint(200, 256, (1400, 1100, 3)).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.text((100, 60), f"Section {i + 1}", fill="black")
    for k in range(8):
        words = " ".join(f"word{(i * 7 + k * 3 + j) % 50}" for j in range(9))
        d.text((100, 150 + 24 * k), words, fill="black")
    for r in range(5):
        for c in range(4):
            x, y = 100 + 220 * c, 500 + 50 * r
            d.rectangle((x, y, x + 220, y + 50), outline="black")
            d.text((x + 10, y + 15), f"{i}.{r}.{c}", fill="black")
    d.text((300, 860), f"x_{i} = (a + b)^2 / {i + 2}", fill="black")
    d.text((900, 860), f"({i + 1})", fill="black")
    d.ellipse((300, 960, 800, 1280), fill=(40 + 20 * i, 90, 160))
    for k in range(2):
        d.text((100, 1320 + 24 * k), f"closing line {k} of page {i + 1}", fill="black")
    return im


def build(work: Path, pages: int, tiny: bool = False):
    """The PDF, the GLM-OCR checkpoint (`tiny`: the tests' size) and the layout detector under
    `work` (kept if there)."""
    from layouts import scripted_layout
    from tiny import build_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    pdf = work / "doc.pdf"
    if not pdf.exists():
        drawn = [page(i).quantize(256) for i in range(pages)]  # a palette: Flate, lossless
        buf = io.BytesIO()
        drawn[0].save(buf, "PDF", save_all=True, append_images=drawn[1:], resolution=200)
        pdf.write_bytes(buf.getvalue())
    if not (work / "ocr" / "config.json").exists():
        text = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, head_dim=64)
        text.update(num_attention_heads=4, num_key_value_heads=2)
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}
        text["rope_parameters"] = {**rope, "mrope_section": [8, 12, 12]}  # GLM-OCR's, halved
        vision = dict(hidden_size=256, depth=4, num_heads=4, intermediate_size=512)
        build_checkpoint(
            work / "ocr",
            family="glm_ocr",
            text_overrides=None if tiny else text,
            vision_overrides=None if tiny else {**vision, "out_hidden_size": 256},
        )
        for_mlx_vlm(work / "ocr")
    if not (work / "layout" / "config.json").exists():
        first = page(0).quantize(256).convert("RGB")
        scripted_layout(work / "layout", REGIONS, first)
    return pdf


def for_mlx_vlm(path: Path):
    """What mlx-vlm 0.7.10 loads: its glm_ocr VisionConfig takes the vision config's keys as
    they are and refuses the `rope_parameters` transformers 5 writes there (TypeError), and it
    refuses the multi-token-prediction layer's tensors ("Received 16 parameters not in model");
    both pipelines read this same copy (no MTP layer: neither drafts with it)."""
    from safetensors.numpy import load_file, save_file

    config = json.loads((path / "config.json").read_text())
    config["vision_config"].pop("rope_parameters", None)
    layers = config["text_config"]["num_hidden_layers"]
    config["text_config"]["num_nextn_predict_layers"] = 0
    (path / "config.json").write_text(json.dumps(config, indent=2))
    weights = load_file(path / "model.safetensors")
    kept = {k: v for k, v in weights.items() if f".layers.{layers}." not in k}
    save_file(kept, str(path / "model.safetensors"), metadata={"format": "pt"})


def peak_rss(pid: int) -> int:
    """A running process's peak resident set in bytes (Linux's VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_timed(cmd, env, log: Path) -> tuple:
    """(seconds, peak RSS in bytes) of a whole process; a failure ends the benchmark."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        sys.exit(f"{cmd[:4]} failed; see {log}")
    return seconds, usage.ru_maxrss * 1024


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd, env, log: Path, port: int, timeout: float = 600):
    import httpx

    out = log.open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    return None


def sdk_script(work: Path, port: int, model: str, max_tokens: int, out: Path) -> Path:
    import glmocr
    import yaml

    base = yaml.safe_load((Path(glmocr.__file__).parent / "config.yaml").read_text())
    pipeline = base["pipeline"]
    pipeline["maas"]["enabled"] = False
    pipeline["ocr_api"].update(api_host="127.0.0.1", api_port=port, model=model)
    pipeline["page_loader"]["max_tokens"] = max_tokens
    pipeline["layout"].update(model_dir=str(work / "layout"), device="cpu")
    config = work / "glmocr.yaml"
    config.write_text(yaml.safe_dump(base))
    script = work / "sdk_run.py"
    script.write_text(
        "from glmocr import GlmOcr\n"
        f"with GlmOcr(config_path={str(config)!r}, mode='selfhosted') as parser:\n"
        f"    result = parser.parse({str(work / 'doc.pdf')!r}, save_layout_visualization=False)\n"
        f"    result.save({str(out)!r}, save_layout_visualization=False)\n"
    )
    return script


def count_regions(json_file: Path) -> int:
    return sum(len(p) for p in json.loads(json_file.read_text()))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/ocr-bench"))
    p.add_argument("--pages", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--backend", choices=("vlm", "ours"), default="vlm")
    p.add_argument("--vlm-python", default="/work/venv-vlm/bin/python")
    p.add_argument("--json-out", type=Path)
    p.add_argument("--tiny", action="store_true", help="the tests' checkpoint size")
    args = p.parse_args()
    pdf = build(args.work, args.pages, args.tiny)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if Path(OPENBLAS).exists():
        env["LD_PRELOAD"] = OPENBLAS
    results, n = {}, args.pages

    # (a) the SDK with a separate OCR server
    port = free_port()
    ckpt = str(args.work / "ocr")
    if args.backend == "vlm":
        server_cmd = [args.vlm_python, "-m", "mlx_vlm.server", "--model", ckpt]
        server_cmd += ["--host", "127.0.0.1", "--port", str(port)]
    else:
        server_cmd = [sys.executable, "-m", "mlx_glm4v", "serve", "--model", ckpt]
        server_cmd += ["--port", str(port)]
    server = start_server(server_cmd, env, args.work / "server.log", port)
    if server is None:
        sys.exit(f"the {args.backend} server did not start; see {args.work / 'server.log'}")
    out_sdk = args.work / "out_sdk"
    script = sdk_script(args.work, port, ckpt, args.max_tokens, out_sdk)
    try:
        seconds, rss = run_timed([sys.executable, str(script)], env, args.work / "sdk.log")
        server_rss = peak_rss(server.pid)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    regions = count_regions(out_sdk / "doc" / "doc.json")
    results["sdk"] = dict(
        backend=args.backend,
        seconds=seconds,
        pages_per_min=60 * n / seconds,
        peak_rss_mb=(rss + server_rss) / 2**20,
        sdk_rss_mb=rss / 2**20,
        server_rss_mb=server_rss / 2**20,
        regions=regions,
    )

    # (b) mlx-glm4v ocr
    out_ours = args.work / "out_ours"
    cmd = [sys.executable, "-m", "mlx_glm4v", "ocr", str(pdf), "-o", str(out_ours)]
    cmd += ["--model", ckpt, "--layout-model", str(args.work / "layout")]
    cmd += ["--max-tokens", str(args.max_tokens)]
    seconds, rss = run_timed(cmd, env, args.work / "ours.log")
    results["ours"] = dict(
        seconds=seconds,
        pages_per_min=60 * n / seconds,
        peak_rss_mb=rss / 2**20,
        regions=count_regions(out_ours / "doc.json"),
    )
    a, b = results["sdk"], results["ours"]
    results["speedup"] = b["pages_per_min"] / a["pages_per_min"]
    results["memory_ratio"] = b["peak_rss_mb"] / a["peak_rss_mb"]
    results["same_markdown"] = (out_ours / "doc.md").read_text() == (
        out_sdk / "doc" / "doc.md"
    ).read_text()
    print(f"{'pipeline':<34}{'s':>8}{'pages/min':>11}{'peak MB':>9}{'regions':>9}")
    label = f"glmocr SDK + {'mlx-vlm' if args.backend == 'vlm' else 'mlx-glm4v serve'}"
    for name, r in ((label, a), ("mlx-glm4v ocr", b)):
        row = f"{name:<34}{r['seconds']:>8.1f}{r['pages_per_min']:>11.1f}"
        print(row + f"{r['peak_rss_mb']:>9.0f}{r['regions']:>9}")
    print(
        f"speed-up {results['speedup']:.2f}x (target >= 2), memory {results['memory_ratio']:.2f}"
        f" of the two processes (target <= 1), same Markdown: {results['same_markdown']}"
    )
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
