r"""In-process measurements for bench.py, each run in its own process and printed as one JSON
line.

    python benchmarks/probe.py env
    python benchmarks/probe.py roofline [--rows 16384 --cols 8192 --repeats 20]
    python benchmarks/probe.py session --model CKPT --image IMG [--max-tokens N]
    python benchmarks/probe.py stages --tool ours|mlx-vlm --model CKPT --image IMG ... \
        [--max-tokens N]
    # python -X importtime, summed
    python benchmarks/probe.py imports -- -m mlx_glm4v.cli generate ...
    python benchmarks/probe.py ab --model CKPT --image IMG [--rounds N --max-tokens N]

`stages` times one generation piece by piece: imports, loading, preprocessing, then the time to
the first token (vision tower + text prefill), decoding; afterwards the vision tower alone on the
same pixels, so that text prefill = time to first token - vision tower. It also returns the
greedy tokens (for the cross-check between the two tools) and which heavy packages ended up
imported. Nothing here imports mlx or either tool before it is timed.

`ab` loads both tools into one process and alternates them, round by round, on the same prompt:
each tool's own `stream_generate`, split at the first token. The prompt's wall time is each
tool's own statistic (prompt tokens / prompt tokens/s, preprocessing excluded, as in bench.py);
its CPU time (user + system of the process) runs from the call to the first token less the
tool's preprocessing timed alone. Then each vision tower alone on the same pixels. CPU time is
what load from other processes moves least (with OPENBLAS_NUM_THREADS=1 it is the work done;
with more BLAS threads it also counts their spin-waiting); one process running both tools, a
quiet moment helps neither more than the other.
"""

import argparse
import json
import os
import platform
import sys
import time

HEAVY_MODULES = (
    "torch",
    "torchvision",
    "transformers",
    "cv2",
    "scipy",
    "pandas",
    "datasets",
    "mlx_lm",
    "mlx_vlm",
    "PIL",
    "av",
    "jinja2",
    "huggingface_hub",
    "tokenizers",
)


def emit(obj):
    print("@@PROBE " + json.dumps(obj), flush=True)


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        import subprocess

        try:
            return (
                subprocess.run(
                    ["sysctl", "-n", "machdep.cpu.brand_string"],
                    capture_output=True,
                    text=True,
                    check=False,
                ).stdout.strip()
                or platform.processor()
            )
        except OSError:
            pass
    return platform.processor() or platform.machine()


def ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return float("nan")


def cmd_env(args):
    from importlib import metadata

    import mlx.core as mx

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    metal = bool(getattr(mx, "metal", None) and mx.metal.is_available())
    emit(
        dict(
            cpu=cpu_model(),
            cores=os.cpu_count(),
            ram_gb=round(ram_gb(), 1),
            platform=platform.platform(),
            python=platform.python_version(),
            mlx=mx.__version__,
            device=str(mx.default_device()),
            backend="metal" if metal else "cpu",
            mlx_vlm=version("mlx-vlm"),
            mlx_lm=version("mlx-lm"),
            mlx_glm4v=version("mlx-glm4v"),
            torch=version("torch"),
            transformers=version("transformers"),
            ld_preload=os.environ.get("LD_PRELOAD", ""),
        )
    )


def _bandwidth(fn, nbytes: int, repeats: int) -> float:
    import mlx.core as mx

    mx.eval(fn())  # warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    times.sort()
    return nbytes / times[len(times) // 2] / 1e9  # median, GB/s


def cmd_roofline(args):
    """GB/s of a large matrix-vector product per weight format: what decoding one token does."""
    import mlx.core as mx

    def matvec(fmt):
        w = mx.random.normal((args.rows, args.cols)) * 0.02
        x = mx.random.normal((args.cols,))
        if fmt == "bfloat16":
            w, x = w.astype(mx.bfloat16), x.astype(mx.bfloat16)
        if fmt == "4bit":
            wq, scales, biases = mx.quantize(w.astype(mx.bfloat16), group_size=64, bits=4)
            xq = x.astype(mx.bfloat16)[None]
            mx.eval(wq, scales, biases, xq)
            return _bandwidth(
                lambda: mx.quantized_matmul(
                    xq, wq, scales, biases, transpose=True, group_size=64, bits=4
                ),
                wq.nbytes + scales.nbytes + biases.nbytes,
                args.repeats,
            )
        mx.eval(w, x)
        return _bandwidth(lambda: w @ x, w.nbytes, args.repeats)

    out = {fmt: matvec(fmt) for fmt in ("float32", "bfloat16", "4bit")}
    emit({"gb_per_s": out, "rows": args.rows, "cols": args.cols, "repeats": args.repeats})


def modules_loaded() -> list:
    return [m for m in HEAVY_MODULES if m in sys.modules]


def cmd_session(args):
    """Time to first token of a first question about an image, a follow-up question, and the same
    image asked again after reset(), in one process with one ChatSession."""
    from mlx_glm4v.checkpoints.loader import load
    from mlx_glm4v.generation.chat import ChatSession

    model, processor = load(args.model)
    session = ChatSession(model, processor, max_tokens=args.max_tokens, ignore_eos=True)

    def ask(text, images=()):
        t = time.perf_counter()
        first, n, last = None, 0, None
        try:
            for r in session.ask(text, list(images)):
                if first is None:
                    first = time.perf_counter() - t
                n, last = r.generation_tokens, r
        except Exception as e:  # report, and go on with the other turns
            return dict(error=f"{type(e).__name__}: {e}")
        return dict(
            ttft_s=first,
            prompt_tokens_run=session.tokens_processed,
            generation_tokens=n,
            generation_tps=last.generation_tps if last else None,
        )

    out = {"first": ask(args.prompt, [args.image]), "second": ask(args.followup)}
    session.reset()
    out["again_after_reset"] = ask(args.prompt, [args.image])
    emit(out)


def stages_ours(args):
    import mlx.core as mx

    t = time.perf_counter()
    from mlx_glm4v.checkpoints.loader import load
    from mlx_glm4v.generation.generate import stream_generate

    t_import = time.perf_counter() - t

    t = time.perf_counter()
    model, processor = load(args.model)
    t_load = time.perf_counter() - t
    weights_gb = mx.get_active_memory() / 1e9

    t = time.perf_counter()
    tokens, t_first, last = [], None, None
    for r in stream_generate(
        model,
        processor,
        args.prompt,
        args.image,
        args.video,
        max_tokens=args.max_tokens,
        ignore_eos=True,
    ):
        if t_first is None:
            t_first = time.perf_counter() - t
        if r.token is not None:
            tokens.append(r.token)
        last = r
    t_total = time.perf_counter() - t
    modules = modules_loaded()

    from mlx_glm4v.generation.messages import build_messages

    messages = build_messages(args.prompt, args.image, args.video)
    t = time.perf_counter()
    inputs = processor.process_messages(messages)
    t_pre = time.perf_counter() - t
    mx.clear_cache()
    mx.reset_peak_memory()
    t = time.perf_counter()
    image, video = model.encode_media(
        inputs.get("pixel_values"),
        inputs.get("image_grid_thw"),
        inputs.get("pixel_values_videos"),
        inputs.get("video_grid_thw"),
    )
    mx.eval([f for f in (image, video) if f is not None])
    t_vision = time.perf_counter() - t
    return dict(
        import_s=t_import,
        load_s=t_load,
        first_token_s=t_first,
        total_generate_s=t_total,
        preprocess_s=t_pre,
        vision_s=t_vision,
        prompt_tokens=last.prompt_tokens,
        prompt_tps=last.prompt_tps,
        generation_tokens=last.generation_tokens,
        generation_tps=last.generation_tps,
        peak_memory_gb=last.peak_memory,
        weights_gb=weights_gb,
        vision_peak_gb=mx.get_peak_memory() / 1e9,
        tokens=tokens,
        modules=modules,
    )


def stages_mlx_vlm(args):
    import mlx.core as mx

    t = time.perf_counter()
    from mlx_vlm import load
    from mlx_vlm.generate import stream_generate
    from mlx_vlm.prompt_utils import apply_chat_template
    from mlx_vlm.utils import prepare_inputs

    t_import = time.perf_counter() - t

    t = time.perf_counter()
    model, processor = load(args.model)
    t_load = time.perf_counter() - t
    weights_gb = mx.get_active_memory() / 1e9

    images = list(args.image)
    t = time.perf_counter()
    prompt = apply_chat_template(processor, model.config, args.prompt, num_images=len(images))
    tokens, t_first, last = [], None, None
    tokenizer = processor.tokenizer
    tokenizer.stopping_criteria.reset(model.config.eos_token_id)
    for r in stream_generate(
        model, processor, prompt, images, max_tokens=args.max_tokens, temperature=0.0
    ):
        if t_first is None:
            t_first = time.perf_counter() - t
        if r.token is not None and r.generation_tokens:
            tokens.append(int(r.token))
        last = r
    t_total = time.perf_counter() - t
    modules = modules_loaded()
    tokens = [int(x) for x in (last.token_ids or tokens)]

    t = time.perf_counter()
    inputs = prepare_inputs(
        processor,
        images=images,
        prompts=prompt,
        image_token_index=getattr(model.config, "image_token_index", None),
    )
    t_pre = time.perf_counter() - t
    mx.clear_cache()
    mx.reset_peak_memory()
    t = time.perf_counter()
    pixels = inputs["pixel_values"].astype(model.vision_tower.patch_embed.proj.weight.dtype)
    mx.eval(model.vision_tower(pixels, inputs["image_grid_thw"], output_hidden_states=False))
    t_vision = time.perf_counter() - t
    n = last.generation_tokens
    return dict(
        import_s=t_import,
        load_s=t_load,
        first_token_s=t_first,
        total_generate_s=t_total,
        preprocess_s=t_pre,
        vision_s=t_vision,
        prompt_tokens=last.prompt_tokens,
        prompt_tps=last.prompt_tps,
        generation_tokens=n,
        # mlx-vlm counts n tokens over the n-1 steps after the first; report (n-1)/time as ours does
        generation_tps=last.generation_tps * (n - 1) / n if n > 1 else 0.0,
        peak_memory_gb=last.peak_memory,
        weights_gb=weights_gb,
        vision_peak_gb=mx.get_peak_memory() / 1e9,
        tokens=tokens,
        modules=modules,
    )


def cmd_imports(args):
    """Run a Python command line under -X importtime; the top-level imports by cumulative time."""
    import subprocess

    cmd = [sys.executable, "-X", "importtime", *args.command]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    roots = {}
    for line in proc.stderr.splitlines():
        m = line.split("|")
        if not line.startswith("import time:") or len(m) != 3 or not m[1].strip().isdigit():
            continue
        name = m[2].rstrip()
        if name.startswith("  "):  # nested: counted in its top-level import's cumulative time
            continue
        root = name.strip().split(".")[0]
        roots[root] = roots.get(root, 0) + int(m[1]) / 1e6
    top = sorted(roots.items(), key=lambda kv: -kv[1])
    emit({"rc": proc.returncode, "total_s": sum(roots.values()), "top": top[: args.top]})


def ours_inputs(processor, prompt, images):
    """What `stream_generate` prepares before its clock starts: template, images, patches."""
    from mlx_glm4v.generation.messages import build_messages

    return processor.process_messages(build_messages(prompt, images))


def cmd_ab(args):
    import statistics

    import mlx.core as mx
    import numpy as np
    from mlx_vlm import load as vlm_load
    from mlx_vlm.generate import stream_generate as vlm_generate
    from mlx_vlm.generate.common import generation_stream as vlm_stream
    from mlx_vlm.prompt_utils import apply_chat_template
    from mlx_vlm.utils import prepare_inputs

    from mlx_glm4v.checkpoints.loader import load as ours_load
    from mlx_glm4v.generation.generate import generation_stream as ours_stream
    from mlx_glm4v.generation.generate import stream_generate as ours_generate

    model, processor = ours_load(args.model)
    vlm_model, vlm_processor = vlm_load(args.model)
    vlm_prompt = apply_chat_template(
        vlm_processor, vlm_model.config, args.prompt, num_images=len(args.image)
    )
    inputs = ours_inputs(processor, args.prompt, args.image)
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    vlm_pixels = mx.array(pixels).astype(vlm_model.vision_tower.patch_embed.proj.weight.dtype)

    def clock():
        return time.perf_counter(), time.process_time()

    def since(start):
        now = clock()
        return now[0] - start[0], now[1] - start[1]

    def run(responses, preprocess):
        start, first = clock(), None
        for r in responses:
            if first is None:
                first = clock()
            last = r
        (_, total_cpu), (decode_s, decode_cpu) = since(start), since(first)
        start = clock()
        preprocess()
        _, preprocess_cpu = since(start)
        return dict(
            prompt_s=last.prompt_tokens / last.prompt_tps,
            prompt_cpu_s=total_cpu - decode_cpu - preprocess_cpu,
            decode_s=decode_s,
            decode_cpu_s=decode_cpu,
            tokens=last.generation_tokens,
        )

    def vision(fn):
        for stream in (ours_stream, vlm_stream):  # mlx-vlm queues one step more than it hands out
            mx.synchronize(stream)
        start = clock()
        mx.eval(fn())
        return dict(zip(("vision_s", "vision_cpu_s"), since(start)))

    def ours():
        out = run(
            ours_generate(
                model,
                processor,
                args.prompt,
                args.image,
                max_tokens=args.max_tokens,
                ignore_eos=True,
            ),
            lambda: ours_inputs(processor, args.prompt, args.image),
        )
        return {**out, **vision(lambda: model.visual(pixels, np.asarray(grid)))}

    def theirs():
        vlm_processor.tokenizer.stopping_criteria.reset(vlm_model.config.eos_token_id)
        out = run(
            vlm_generate(
                vlm_model,
                vlm_processor,
                vlm_prompt,
                args.image,
                max_tokens=args.max_tokens,
                temperature=0.0,
            ),
            lambda: prepare_inputs(
                vlm_processor,
                images=args.image,
                prompts=vlm_prompt,
                image_token_index=getattr(vlm_model.config, "image_token_index", None),
            ),
        )
        return {
            **out,
            **vision(
                lambda: vlm_model.vision_tower(
                    vlm_pixels, mx.array(grid), output_hidden_states=False
                )
            ),
        }

    tools = {"mlx-glm4v": ours, "mlx-vlm": theirs}
    runs = {name: [] for name in tools}
    for fn in tools.values():  # warm-up: first calls, buffers
        fn()
    for i in range(args.rounds):
        for name in list(tools) if i % 2 == 0 else list(tools)[::-1]:
            runs[name].append(tools[name]())
    keys = [k for k in runs["mlx-glm4v"][0] if k != "tokens"]
    out = {
        name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in runs.items()
    }
    out["ratios"] = {k: out["mlx-glm4v"][k] / out["mlx-vlm"][k] for k in keys}
    out["rounds"], out["tokens"] = (
        args.rounds,
        {name: rs[-1]["tokens"] for name, rs in runs.items()},
    )
    emit(out)


def cmd_stages(args):
    out = stages_ours(args) if args.tool == "ours" else stages_mlx_vlm(args)
    ttft = out["prompt_tokens"] / out["prompt_tps"] if out["prompt_tps"] else float("nan")
    out["ttft_s"] = ttft
    out["text_prefill_s"] = ttft - out["vision_s"]
    out["preprocess_in_generate_s"] = out["first_token_s"] - ttft
    out["decode_s"] = out["total_generate_s"] - out["first_token_s"]
    out["ttft_loaded_s"] = out["load_s"] + out["first_token_s"]
    emit(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env")
    p = sub.add_parser("roofline")
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--cols", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=20)
    p = sub.add_parser("imports")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("command", nargs=argparse.REMAINDER, help="after --: the arguments to python")
    for name in ("session", "stages", "ab"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True)
        p.add_argument("--prompt", default="Describe this image in detail.")
        p.add_argument("--max-tokens", type=int, default=100)
        if name == "session":
            p.add_argument("--image", required=True)
            p.add_argument("--followup", default="What colour is the square on the left?")
        elif name == "ab":
            p.add_argument("--image", action="append", required=True)
            p.add_argument("--rounds", type=int, default=5)
        else:
            p.add_argument("--tool", choices=("ours", "mlx-vlm"), required=True)
            p.add_argument("--image", action="append", default=[])
            p.add_argument("--video", action="append", default=[])
    args = ap.parse_args(argv)
    if args.cmd == "imports" and args.command[:1] == ["--"]:
        args.command = args.command[1:]
    commands = {
        "env": cmd_env,
        "roofline": cmd_roofline,
        "session": cmd_session,
        "stages": cmd_stages,
        "imports": cmd_imports,
        "ab": cmd_ab,
    }
    commands[args.cmd](args)


if __name__ == "__main__":
    main()
