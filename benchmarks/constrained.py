r"""Structured output's cost: decode tokens/s under a nested JSON schema against the same rows
free, with 1 and 8 rows in the engine; the host's mask time per token (p50, p99); compile time
per schema.

    # the ~120M bench checkpoint (built if missing)
    python benchmarks/constrained.py
    # a tiny checkpoint, a few tokens (what the test runs)
    python benchmarks/constrained.py --tiny
    python benchmarks/constrained.py --checkpoint DIR --max-tokens 128 --rounds 3 \
        --json-out out.json

The schema asks for at least 40 items, so no row completes it within --max-tokens: constrained
and free rows both run exactly --max-tokens tokens, and the figures compare like with like. The
bench checkpoint's end-of-sequence logits are pinned low (make_checkpoint.py), so free rows never
stop early either. Mask time is the host's: filling a step's bitmask for all its constrained rows
(llguidance), divided by the rows; applying it is a few `mx` ops inside the step's graph, and the
step's forward pass runs while the host fills. Run with OpenBLAS on Linux
(LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3) for figures worth reading.
"""

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import make_checkpoint  # noqa: E402

ITEM = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "qty", "box"],
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "qty": {"type": "integer", "minimum": 1, "maximum": 999},
        "box": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 1000},
            "minItems": 4,
            "maxItems": 4,
        },
        "tags": {"type": "array", "items": {"enum": ["food", "drink", "other"]}, "maxItems": 2},
    },
}
NESTED = {
    "type": "object",
    "additionalProperties": False,
    "required": ["vendor", "items"],
    "properties": {
        "vendor": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "maxLength": 16},
                "date": {"type": "string", "format": "date"},
            },
        },
        "items": {"type": "array", "items": ITEM, "minItems": 40},
    },
}
PROMPTS = [
    "Read this receipt.",
    "List what was bought.",
    "Extract the items as JSON.",
    "What is on the bill?",
    "Fill the form from the receipt.",
    "Give the totals.",
    "Transcribe the receipt.",
    "Which shop is it?",
]


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def run_rows(model, processor, rows: int, constraint, max_tokens: int, mask_times: list) -> float:
    """Decode tokens/s of `rows` requests decoded together: tokens after each row's first, over the
    time from the first row's first token to the last row's end."""
    from mlx_glm4v.generation.messages import build_messages
    from mlx_glm4v.generation.settings import GenerationSettings
    from mlx_glm4v.serving.engine import Engine, Request

    settings = GenerationSettings(max_tokens=max_tokens, constraint=constraint)
    engine = Engine(model, processor, max_concurrency=rows, prefix_cache_bytes=0)
    try:
        inputs = [
            processor.process_messages(build_messages(PROMPTS[i % len(PROMPTS)]))
            for i in range(rows)
        ]
        # all rows prefilled before decoding starts, so that every step carries them all
        handles = [engine.submit(Request(x, settings, seed=i)) for i, x in enumerate(inputs)]
        seen = [[] for _ in handles]  # per row: (time, event), read as the events arrive

        def read(h, out):
            out.extend((time.perf_counter(), e) for e in h)

        readers = [threading.Thread(target=read, args=(h, out)) for h, out in zip(handles, seen)]
        for t in readers:
            t.start()
        for t in readers:
            t.join()
        firsts, ends, tokens = [], [], 0
        for events in seen:
            timed = [t for t, e in events if e.token is not None]
            firsts.append(timed[0])
            ends.append(events[-1][0])
            last = events[-1][1]
            if last.finish_reason != "length":
                raise SystemExit(
                    f"a row ended with {last.finish_reason!r} before --max-tokens: "
                    f"{last.error or ''}"
                )
            tokens += len(timed) - 1
    finally:
        engine.close()
    return tokens / (max(ends) - max(firsts))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--checkpoint", help="a GLM-4.1V checkpoint (default: build the random bench one)"
    )
    ap.add_argument("--tiny", action="store_true", help="a tiny checkpoint and a few tokens")
    ap.add_argument("--work", default=str(HERE.parent / ".bench" / "work"))
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)

    from schemas import SCHEMAS

    import mlx_glm4v.generation.constrain as constrain
    from mlx_glm4v.checkpoints.loader import load
    from mlx_glm4v.generation.constrain import Constraint, compile_seconds

    size = "tiny" if args.tiny else "bench"
    path = Path(args.checkpoint) if args.checkpoint else Path(args.work) / f"constrained-{size}"
    if not args.checkpoint and not (path / "config.json").exists():
        make_checkpoint.build(path, size)
    max_tokens = min(args.max_tokens, 24) if args.tiny else args.max_tokens
    model, processor = load(str(path))

    mask_times: list = []
    fill = constrain.fill_masks

    def timed_fill(rows):
        start = time.perf_counter()
        out = fill(rows)
        mask_times.append((time.perf_counter() - start) / len(rows))
        return out

    constrain.fill_masks = timed_fill
    schema = Constraint("json_schema", NESTED)
    results = {
        "checkpoint": str(path),
        "max_tokens": max_tokens,
        "rounds": args.rounds,
        "vocab": model.config.text_config.vocab_size,
    }
    run_rows(model, processor, 1, schema, 8, [])  # warm-up: kernels, the llguidance tokenizer
    for rows in (1, 8):
        free, constrained = [], []
        for _ in range(args.rounds):  # alternating, so drifts in the machine's speed hit both alike
            free.append(run_rows(model, processor, rows, None, max_tokens, mask_times))
            constrained.append(run_rows(model, processor, rows, schema, max_tokens, mask_times))
        results[f"rows_{rows}"] = {
            "free_tps": statistics.median(free),
            "schema_tps": statistics.median(constrained),
            "ratio": statistics.median(constrained) / statistics.median(free),
        }
    constrain.fill_masks = fill
    results["mask_ms_per_token"] = {
        "p50": 1e3 * percentile(mask_times, 0.5),
        "p99": 1e3 * percentile(mask_times, 0.99),
        "steps": len(mask_times),
    }
    compile_s = [compile_seconds(Constraint("json_schema", s)) for s in SCHEMAS + [NESTED]]
    results["compile_ms"] = {
        "schemas": len(compile_s),
        "p50": 1e3 * percentile(compile_s, 0.5),
        "max": 1e3 * max(compile_s),
        "nested": 1e3 * compile_s[-1],
    }
    lines = [
        f"checkpoint {path} (vocab {results['vocab']}), "
        f"{max_tokens} tokens per row, {args.rounds} rounds"
    ]
    for rows in (1, 8):
        r = results[f"rows_{rows}"]
        lines.append(
            f"{rows} row(s): free {r['free_tps']:.1f} tok/s, nested schema {r['schema_tps']:.1f} "
            f"tok/s ({r['ratio']:.2f}x)"
        )
    m, c = results["mask_ms_per_token"], results["compile_ms"]
    lines.append(
        f"mask fill per token: p50 {m['p50']:.3f} ms, p99 {m['p99']:.3f} ms ({m['steps']} steps)"
    )
    lines.append(
        f"compile per schema ({c['schemas']}): p50 {c['p50']:.2f} ms, max {c['max']:.2f} ms, "
        f"nested {c['nested']:.2f} ms"
    )
    print("\n".join(lines))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
