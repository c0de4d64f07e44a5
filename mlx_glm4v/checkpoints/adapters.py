"""Adapters from files: read, check, put into a model, fuse.

Two forms are read. Ours is mlx-lm's: `adapters.safetensors` (tensors under our module paths,
`lora_a` [in, r], `lora_b` [r, out], DoRA's magnitude `m` [out]; any other tensor replaces the
model's own) and `adapter_config.json` (`fine_tune_type`, `lora_parameters` with `rank`,
`scale`, `dropout`, `keys`). PEFT's is what transformers+peft, LlamaFactory and ms-swift write:
`adapter_model.safetensors` (`base_model.model.<transformers path>.lora_A.weight` [r, in],
`lora_B.weight` [out, r], `lora_magnitude_vector` [out]; `modules_to_save` copies whole) and
`adapter_config.json` (`r`, `lora_alpha`, `use_rslora`, `use_dora`, `alpha_pattern`,
`target_modules`). Both become one `Adapter`; the layers are mlx-lm's `LoRALinear` and
`DoRALinear`, which take float and quantized bases alike (QLoRA), and `LoRASwitchLinear` on
GLM-4.5V's routed experts (PEFT's forms of those: expert_lora.py).
"""

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import Glm4vError
from ..models.mlxlm import (
    DoRALinear,
    LoRALinear,
    LoRASwitchLinear,
    QuantizedSwitchLinear,
    SwitchLinear,
)
from ..models.model import WEIGHT_PREFIXES, checkpoint_name
from .expert_lora import (
    FUSED,
    PER_EXPERT,
    from_fused,
    peft_scale,
    stack_experts,
    switch_path,
    which_fused,
)

OURS = "adapters.safetensors"
PEFT = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
LORA_LEAVES = ("lora_a", "lora_b", "m")
ADAPTED = (LoRALinear, DoRALinear, LoRASwitchLinear)
LINEAR = (nn.Linear, nn.QuantizedLinear)
SWITCH = (SwitchLinear, QuantizedSwitchLinear)  # the routed experts' stacked projections


@dataclass
class LowRank:
    """One adapted layer: y = W x + scale * B A x (DoRA: rescaled to the magnitude m). A linear
    layer's factors are a [in, r] and b [r, out]; the routed experts' (LoRASwitchLinear's)
    a [experts, r, in] and b [experts, out, r]."""

    a: mx.array
    b: mx.array
    scale: float
    m: Optional[mx.array] = None  # [out]: DoRA's magnitude

    @property
    def rank(self) -> int:
        return self.a.shape[1]


@dataclass
class Adapter:
    path: Path
    layers: dict = field(default_factory=dict)  # module path -> LowRank
    tensors: dict = field(default_factory=dict)  # parameter path -> replacement (full tuning)
    targets: list = field(default_factory=list)  # module names the config asks for
    parameters: list = field(default_factory=list)  # PEFT's target_parameters (fused experts)
    regex: bool = False  # PEFT's target_modules given as one regex string
    dropout: float = 0.0
    digest: str = ""  # of the files' bytes: what tells two adapters apart (prefix cache, names)

    @property
    def dora(self) -> bool:
        return any(low.m is not None for low in self.layers.values())


def _read_json(file: Path) -> dict:
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise Glm4vError(f"{file} could not be read: {e}.") from None
    if not isinstance(config, dict):
        raise Glm4vError(f"{file} is not a JSON object.")
    return config


def _read_tensors(file: Path) -> dict:
    try:
        return mx.load(str(file))
    except Exception as e:
        raise Glm4vError(f"{file} could not be read as safetensors: {e}.") from None


def read_adapter(path) -> Adapter:
    """The adapter in directory `path`, ours or PEFT's, not yet checked against a model."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise Glm4vError(f"the adapter directory {path} does not exist.")
    if not (path / CONFIG).exists():
        raise Glm4vError(f"{path} has no {CONFIG}, so it is not an adapter directory.")
    config = _read_json(path / CONFIG)
    if (path / OURS).exists():
        adapter = _ours(path, config, _read_tensors(path / OURS))
        files = [path / CONFIG, path / OURS]
    elif (path / PEFT).exists():
        adapter = _peft(path, config, _read_tensors(path / PEFT))
        files = [path / CONFIG, path / PEFT]
    else:
        raise Glm4vError(f"{path} has neither {OURS} nor {PEFT}.")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    adapter.digest = digest.hexdigest()[:16]
    return adapter


def _ours(path: Path, config: dict, tensors: dict) -> Adapter:
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora", "full"):
        raise Glm4vError(
            f"{path / CONFIG}: fine_tune_type {kind!r} is not one of lora, dora, full."
        )
    params = config.get("lora_parameters") or {}
    if kind != "full" and not isinstance(params.get("scale"), (int, float)):
        raise Glm4vError(f"{path / CONFIG}: lora_parameters.scale is missing or not a number.")
    adapter = Adapter(path, targets=list(params.get("keys") or []))
    adapter.dropout = float(params.get("dropout") or 0.0)
    parts = {}
    for name, value in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf in LORA_LEAVES and kind != "full":
            parts.setdefault(module, {})[leaf] = value
        else:
            adapter.tensors[name] = value
    for module, p in parts.items():
        if "lora_a" not in p or "lora_b" not in p:
            raise Glm4vError(f"{path / OURS}: {module!r} lacks lora_a or lora_b.")
        adapter.layers[module] = LowRank(p["lora_a"], p["lora_b"], params["scale"], p.get("m"))
    return adapter


def _peft(path: Path, config: dict, tensors: dict) -> Adapter:
    file = path / CONFIG
    if config.get("peft_type", "LORA") != "LORA":
        raise Glm4vError(f"{file}: peft_type {config['peft_type']!r} is not LORA.")
    if config.get("fan_in_fan_out"):
        raise Glm4vError(f"{file}: fan_in_fan_out adapters (GPT-2's Conv1D) do not fit GLM-V.")
    targets = config.get("target_modules") or []
    regex = isinstance(targets, str)
    adapter = Adapter(path, targets=[targets] if regex else list(targets), regex=regex)
    adapter.parameters = list(config.get("target_parameters") or [])
    adapter.dropout = float(config.get("lora_dropout") or 0.0)
    parts, fused, experts = {}, {}, {}
    for name, value in tensors.items():
        key = name.removeprefix(PEFT_PREFIX).replace(".modules_to_save.default", "")
        match = re.fullmatch(
            r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)(\.weight)?", key
        )
        if match is None:
            if ".lora_" in key:
                raise Glm4vError(
                    f"{path / PEFT}: {name!r} is a LoRA tensor of a kind mlx-glm4v does not read."
                )
            adapter.tensors[checkpoint_name(key)] = value
            continue
        module, leaf = match[1], match[2].split(".")[0]
        if FUSED.fullmatch(module):  # transformers 5's fused experts
            fused.setdefault(FUSED.fullmatch(module)[1], {}).setdefault(module, {})[leaf] = value
        else:
            parts.setdefault(module, {})[leaf] = value
    for module, p in parts.items():
        if "lora_A" not in p or "lora_B" not in p:
            raise Glm4vError(f"{path / PEFT}: {module!r} lacks lora_A or lora_B.")
        scale = peft_scale(config, module, p["lora_A"].shape[0])
        ours = checkpoint_name(module + ".")[:-1]
        if m := PER_EXPERT.fullmatch(ours):  # transformers 4's experts, one layer each
            if "lora_magnitude_vector" in p:
                raise Glm4vError(
                    f"{path / PEFT}: {module!r} has a DoRA magnitude; DoRA does not reach the "
                    "experts."
                )
            stacked = switch_path(f"{m[1]}experts", m[3])
            experts.setdefault(stacked, {})[int(m[2])] = (p["lora_A"], p["lora_B"], scale)
            continue
        a, b = p["lora_A"].T, p["lora_B"].T
        adapter.layers[ours] = LowRank(a, b, scale, p.get("lora_magnitude_vector"))
    for stacked, per_expert in experts.items():
        adapter.layers[stacked] = LowRank(*stack_experts(path / PEFT, stacked, per_expert))
    for module, wrappers in fused.items():
        for wrapper, p in wrappers.items():
            if "lora_A" not in p or "lora_B" not in p:
                raise Glm4vError(f"{path / PEFT}: {wrapper!r} lacks lora_A or lora_B.")
        for wrapper, name in which_fused(path / PEFT, config, wrappers).items():
            found = from_fused(path / PEFT, config, module, name, wrappers[wrapper])
            for proj, factors in found.items():
                ours = switch_path(checkpoint_name(module + ".")[:-1], proj)
                adapter.layers[ours] = LowRank(*factors)
    return adapter


def _linear_shape(layer: nn.Module) -> tuple:
    """(out, in) of a float or quantized linear layer."""
    out, width = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        width = width * 32 // layer.bits
    return out, width


def _expected(layer: nn.Module, r: int) -> tuple:
    """The shapes of a rank-`r` adapter's a and b for `layer`, in words, and the layer's."""
    if isinstance(layer, SWITCH):
        n, out, width = layer.num_experts, layer.output_dims, layer.input_dims
        words = f"[{n}, r, {width}] and [{n}, {out}, r]", f"{n} experts of {width} -> {out}"
        return (n, r, width), (n, out, r), *words
    out, width = _linear_shape(layer)
    return (width, r), (r, out), f"[{width}, r] and [r, {out}]", f"{width} -> {out}"


def check_adapter(model: nn.Module, adapter: Adapter):
    """Every adapted layer a linear layer of this model with matching shapes, every replaced
    tensor one of its parameters with its shape, every asked-for target some layer's name."""
    modules = dict(model.named_modules())
    file = adapter.path / (OURS if (adapter.path / OURS).exists() else PEFT)
    for name, low in adapter.layers.items():
        layer = modules.get(name)
        if layer is None:
            raise Glm4vError(f"{file}: {name!r} is not a layer of this model.")
        if not isinstance(layer, LINEAR + SWITCH):
            raise Glm4vError(f"{file}: {name!r} is a {type(layer).__name__}, not a linear layer.")
        a, b, shapes, what = _expected(layer, low.rank)
        if low.a.shape != a or low.b.shape != b:
            raise Glm4vError(
                f"{file}: {name!r} has low-rank factors {list(low.a.shape)} and "
                f"{list(low.b.shape)}, expected {shapes} (the layer is {what})."
            )
        if low.m is not None and isinstance(layer, SWITCH):
            raise Glm4vError(
                f"{file}: {name!r} has a DoRA magnitude; DoRA does not reach the experts."
            )
        out = b[-1]
        if low.m is not None and low.m.shape != (out,):
            raise Glm4vError(
                f"{file}: {name!r} has a magnitude of shape {list(low.m.shape)}, expected [{out}]."
            )
    params = dict(tree_flatten(model.parameters()))
    for name, value in adapter.tensors.items():
        if name not in params:
            raise Glm4vError(f"{file}: {name!r} is not a parameter of this model.")
        if value.shape != params[name].shape:
            raise Glm4vError(
                f"{file}: {name!r} has shape {list(value.shape)}, expected "
                f"{list(params[name].shape)}."
            )
    peft = not (adapter.path / OURS).exists()
    linear = [hf_name(p) if peft else p for p, m in modules.items() if isinstance(m, LINEAR)]
    # the experts' projections answer to their per-expert names (transformers 4's layers)
    linear += [
        hf_name(p).replace(".switch_mlp.", ".experts.") if peft else p
        for p, m in modules.items()
        if isinstance(m, SWITCH)
    ]
    for target in adapter.targets:
        if target == "all-linear" or not isinstance(target, str):
            continue
        # PEFT's rule: a list names modules by their path's end, a string is a regex of the path
        regex = target if len(adapter.targets) == 1 and peft and adapter.regex else None
        regex = regex or rf"(.*\.)?{re.escape(target)}"
        if not any(re.fullmatch(regex, p) for p in linear):
            raise Glm4vError(
                f"{adapter.path / CONFIG}: target module {target!r} names no linear layer of "
                "this model."
            )
    experts = any(isinstance(m, SWITCH) for m in modules.values())
    for target in adapter.parameters:
        if not experts or target.rpartition(".")[2] not in ("gate_up_proj", "down_proj"):
            raise Glm4vError(
                f"{adapter.path / CONFIG}: target parameter {target!r} names no expert tensor "
                "of this model (gate_up_proj or down_proj of a mixture-of-experts layer)."
            )


def hf_name(path: str) -> str:
    """Our module or parameter path under transformers' names (what PEFT's files use)."""
    for theirs, ours in WEIGHT_PREFIXES[:2]:
        if path.startswith(ours):
            return theirs + path[len(ours) :]
    return path


def low_rank_layer(base: nn.Module, low: LowRank, dropout: float = 0.0) -> nn.Module:
    """mlx-lm's LoRA (DoRA with a magnitude; LoRASwitchLinear on the experts) layer around
    `base`, holding `low`'s factors."""
    kind = DoRALinear if low.m is not None else LoRALinear
    kind = LoRASwitchLinear if isinstance(base, SWITCH) else kind
    layer = kind.from_base(base, r=low.rank, dropout=dropout, scale=low.scale)
    dtype = base.scales.dtype if "scales" in base else base.weight.dtype
    layer.lora_a, layer.lora_b = low.a.astype(dtype), low.b.astype(dtype)
    if low.m is not None:
        layer.m = low.m.astype(mx.float32)
    return layer


def apply_adapter(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Put `adapter` into `model` (checked first): its layers swapped in, its tensors loaded."""
    check_adapter(model, adapter)
    modules = dict(model.named_modules())
    swapped = [
        (name, low_rank_layer(modules[name], low, adapter.dropout))
        for name, low in adapter.layers.items()
    ]
    for _, layer in swapped:  # dropout on only where the model trains
        layer.train(model.training)
    if swapped:
        model.update_modules(tree_unflatten(swapped))
    params = dict(tree_flatten(model.parameters()))
    tensors = [(k, v.astype(params[k].dtype)) for k, v in adapter.tensors.items()]
    if tensors:
        model.load_weights(tensors, strict=False)
    # read now, on this thread: the adapter is small, and an array left to be read from its file
    # cannot be evaluated on another thread's stream (the server loads on one, runs on another)
    factors = [(layer.lora_a, layer.lora_b, getattr(layer, "m", None)) for _, layer in swapped]
    mx.eval(factors, [v for _, v in tensors])
    return model


def load_adapter(model: nn.Module, path) -> Adapter:
    """Read the adapter in `path` and put it into `model`; returns what was read."""
    adapter = read_adapter(path)
    apply_adapter(model, adapter)
    return adapter


def fuse(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Every LoRA/DoRA layer folded into its base: a quantized base is dequantized, fused and
    quantized again with its settings unless `dequantize` (mlx-lm's fuse)."""
    fused = [
        (n, m.fuse(dequantize=dequantize))
        for n, m in model.named_modules()
        if isinstance(m, ADAPTED)
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model


def fused_weight(weight: mx.array, low: LowRank) -> mx.array:
    """A float weight [out, in] (the experts' [experts, out, in]) with `low` folded in, by the
    same arithmetic as `fuse`."""
    if weight.ndim == 3:
        base = SwitchLinear(weight.shape[2], weight.shape[1], weight.shape[0], bias=False)
    else:
        base = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    base.weight = weight
    return low_rank_layer(base, low).fuse().weight
