"""Run by test_distributed.py under `mlx.launch`: load a checkpoint split over the ranks, run
every case of a plan, and write what rank 0 saw (and each rank's layout) to the output folder.

Also imported by the test itself to compute the single-process answers with the same code.
"""

import gc
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

NEW_TOKENS = 6


def run_case(
    model, inputs: dict, new_tokens: int = NEW_TOKENS, temp: float = 0.0, seed: int = 0
) -> dict:
    """Logits of the whole prompt (float32), then `new_tokens` tokens: greedy, or sampled at `temp`
    from the seed (through mlx-lm's sampler, as generation does)."""
    from mlx_glm4v.models.mlxlm import make_sampler

    inputs = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    logits = np.array(model(**inputs).astype(mx.float32))
    mx.random.seed(seed)
    sampler = make_sampler(temp=temp)
    cache = model.make_cache()
    step = model(**inputs, cache=cache)[:, -1]
    tokens = []
    for _ in range(new_tokens):
        token = sampler(step - mx.logsumexp(step, axis=-1, keepdims=True))
        tokens.append(np.array(token))
        step = model(token[:, None], cache=cache)[:, -1]
    return {"logits": logits, "tokens": np.stack(tokens, axis=1)}


def main(plan_file: str):
    from mlx_glm4v.serving import distributed

    group = distributed.launched()
    rank = group.rank()
    for item in json.loads(Path(plan_file).read_text()):
        out = Path(item["out"])
        gc.collect()  # the previous model gone
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        model, _, layout = distributed.load(item["checkpoint"], group, mode=item.get("mode"))
        peak = mx.get_peak_memory() - before
        (out / f"rank{rank}.json").write_text(
            json.dumps({**layout.__dict__, "peak_load_bytes": peak, "describe": layout.describe()})
        )
        results = {}
        for case in item["cases"]:
            inputs = dict(np.load(case["inputs"]))
            result = run_case(model, inputs, temp=case.get("temp", 0.0), seed=case.get("seed", 0))
            for key, value in result.items():
                results[f"{case['name']}/{key}"] = value
        np.savez(out / f"results{rank}.npz", **results)
        del model


if __name__ == "__main__":
    main(sys.argv[1])
