"""LoRA on GLM-4.5V's routed experts: PEFT's two file forms to and from ours.

Ours is mlx-lm's `LoRASwitchLinear` on each of `switch_mlp`'s stacked projections (gate, up,
down): `lora_a` [experts, r, in], `lora_b` [experts, out, r]. PEFT writes two forms:

- transformers 5's (peft >= 0.18, `target_parameters`): one parameter wrapper per fused tensor,
  `experts.gate_up_proj` [E, 2I, H] (gate rows first) and `experts.down_proj` [E, H, I], nested
  when both are adapted (`experts.base_layer.lora_A.weight` is the inner, gate_up's;
  `experts.lora_A.weight` the outer, down's). `lora_A` is [r * E, in], expert e's rows
  e*r..(e+1)*r; `lora_B` is [out, r * E], expert e's columns e, e+E, e+2E... (peft's
  `ParamWrapper.get_delta_weight`). MLP names (gate_proj, up_proj, down_proj) given to peft on
  transformers 5 become these, gate_up at twice the rank and alpha.
- transformers 4's (LlamaFactory and ms-swift adapters of GLM-4.5V/4.6V): every expert a linear
  layer, `experts.N.gate_proj.lora_A.weight` [r, H] and so on.

One LoRA on the fused gate_up is two on gate and up sharing A: B's rows split. Two on gate and up
are one on gate_up at the summed rank: A's stacked, B's block-diagonal (peft's
`PeftConcatenate`). Both are exact.
"""

import re

import mlx.core as mx

from ..errors import Glm4vError

# transformers 5: model.language_model.layers.N.mlp.experts(.base_layer)*
FUSED = re.compile(r"(.*\.mlp\.experts)((?:\.base_layer)*)")
# transformers 4: model.language_model.layers.N.mlp.experts.E.gate_proj
PER_EXPERT = re.compile(r"(.*\.mlp\.)experts\.(\d+)\.(gate_proj|up_proj|down_proj)")


def pattern_value(patterns: dict, key: str, default):
    """PEFT's `get_pattern_key`: the value of the first pattern matching the end of `key`."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def switch_path(experts: str, proj: str) -> str:
    """Our stacked projection's path for a transformers experts module path (ours already)."""
    return f"{experts.removesuffix('experts')}switch_mlp.{proj}"


def which_fused(file, config: dict, wrappers: dict) -> dict:
    """{wrapper module path: "gate_up_proj" or "down_proj"} for one layer's wrappers."""
    if len(wrappers) == 2:
        (one, p), (other, q) = wrappers.items()
        # down maps I -> H, gate_up H -> 2I: down's output is gate_up's input, never the reverse
        down = one if p["lora_B"].shape[0] == q["lora_A"].shape[1] else other
        return {m: "down_proj" if m == down else "gate_up_proj" for m in wrappers}
    names = {t.rpartition(".")[2] for t in config.get("target_parameters") or []}
    (module,) = wrappers
    if len(names) != 1 or not names <= {"gate_up_proj", "down_proj"}:
        raise Glm4vError(
            f"{file}: {module!r} adapts one fused expert tensor, but target_parameters "
            f"({', '.join(sorted(names)) or 'none'}) do not say which."
        )
    return {module: names.pop()}


def from_fused(file, config: dict, experts: str, name: str, p: dict) -> dict:
    """PEFT's wrapper of `experts`.`name` (transformers' path) as {our path: (a, b, scale)}."""
    key = f"{experts}.{name}"
    if "lora_magnitude_vector" in p:
        raise Glm4vError(f"{file}: {key!r} has a DoRA magnitude; DoRA does not reach the experts.")
    a, b = p["lora_A"], p["lora_B"]
    r = pattern_value(config.get("rank_pattern"), key, config.get("r", 8))
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] % r or b.shape[1] != a.shape[0]:
        raise Glm4vError(
            f"{file}: {key!r} has LoRA factors {list(a.shape)} and {list(b.shape)}, expected "
            f"[rank {r} x experts, in] and [out, rank {r} x experts]."
        )
    n = a.shape[0] // r
    a = a.reshape(n, r, a.shape[1])
    b = b.reshape(b.shape[0], r, n).transpose(2, 0, 1)
    scale = peft_scale(config, key, r)
    if name == "down_proj":
        return {"down_proj": (a, b, scale)}
    gate, up = mx.split(b, 2, axis=1)
    return {"gate_proj": (a, gate, scale), "up_proj": (a, up, scale)}


def peft_scale(config: dict, key: str, rank: int) -> float:
    """PEFT's `scaling` of a module or parameter (transformers' path): its alpha
    (`alpha_pattern` first) over the rank, or over its square root with `use_rslora`."""
    alpha = pattern_value(config.get("alpha_pattern"), key, config.get("lora_alpha", 8))
    return alpha / (rank**0.5 if config.get("use_rslora") else rank)


def stack_experts(file, path: str, experts: dict) -> tuple:
    """Per-expert (a [r, in], b [out, r], scale), expert index -> one, as stacked (a, b, scale);
    the scales, if they differ, folded into b."""
    missing = sorted(set(range(max(experts) + 1)) - set(experts))
    if missing:
        raise Glm4vError(f"{file}: expert {missing[0]} of {path!r} has no LoRA tensors.")
    ranks = {a.shape[0] for a, _, _ in experts.values()}
    if len(ranks) > 1:
        raise Glm4vError(f"{file}: the experts of {path!r} have different ranks {sorted(ranks)}.")
    scale = experts[0][2]
    a = mx.stack([experts[e][0] for e in range(len(experts))])
    b = mx.stack([experts[e][1] * (experts[e][2] / scale) for e in range(len(experts))])
    return a, b, scale


def to_fused(parts: dict) -> dict:
    """Our expert layers of one MoE layer, {"gate_proj": (a, b, scale), ...}, as PEFT's
    {"gate_up_proj" / "down_proj": (lora_A [r*E, in], lora_B [out, r*E], rank, alpha)}."""
    out = {}
    if "down_proj" in parts:
        a, b, scale = parts["down_proj"]
        out["down_proj"] = (*_peft_factors(a, b), a.shape[1], scale * a.shape[1])
    halves = [parts.get(p) for p in ("gate_proj", "up_proj")]
    present = [h for h in halves if h is not None]
    if present:
        scale = present[0][2]
        widths = [h[1].shape[1] if h else None for h in halves]
        width = next(w for w in widths if w)  # gate and up are equally wide
        rank = sum(h[0].shape[1] for h in present)
        n = present[0][0].shape[0]
        a = mx.concatenate([h[0] for h in present], axis=1)
        b = mx.zeros((n, 2 * width, rank), dtype=present[0][1].dtype)
        col = 0
        for i, h in enumerate(halves):
            if h is None:
                continue
            r = h[0].shape[1]
            b[:, i * width : (i + 1) * width, col : col + r] = h[1] * (h[2] / scale)
            col += r
        out["gate_up_proj"] = (*_peft_factors(a, b), rank, scale * rank)
    return out


def _peft_factors(a: mx.array, b: mx.array) -> tuple:
    """Ours a [E, r, in], b [E, out, r] as PEFT's lora_A [r*E, in], lora_B [out, r*E]."""
    n, r, width = a.shape
    return a.reshape(n * r, width), b.transpose(1, 2, 0).reshape(b.shape[1], r * n)
