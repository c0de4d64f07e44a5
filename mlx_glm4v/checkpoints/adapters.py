"""Adapters from files: read, check, put into a model, fuse.

Two forms are read. Ours is mlx-lm's: `adapters.safetensors` (tensors under our module paths,
`lora_a` [in, r], `lora_b` [r, out], DoRA's magnitude `m` [out]; any other tensor replaces the
model's own) and `adapter_config.json` (`fine_tune_type`, `lora_parameters` with `rank`,
`scale`, `dropout`, `keys`). PEFT's is what transformers+peft, LlamaFactory and ms-swift write:
`adapter_model.safetensors` (`base_model.model.<transformers path>.lora_A.weight` [r, in],
`lora_B.weight` [out, r], `lora_magnitude_vector` [out]; `modules_to_save` copies whole) and
`adapter_config.json` (`r`, `lora_alpha`, `use_rslora`, `use_dora`, `alpha_pattern`,
`target_modules`). Both become one `Adapter`; the layers are mlx-lm's `LoRALinear` and
`DoRALinear`, which take float and quantized bases alike (QLoRA).
"""

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import Glm4vError
from ..models.mlxlm import DoRALinear, LoRALinear
from ..models.model import WEIGHT_PREFIXES, checkpoint_name

OURS = "adapters.safetensors"
PEFT = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
LORA_LEAVES = ("lora_a", "lora_b", "m")
ADAPTED = (LoRALinear, DoRALinear)


@dataclass
class LowRank:
    """One adapted linear layer: y = W x + scale * B A x (DoRA: rescaled to the magnitude m)."""

    a: mx.array  # [in, r]
    b: mx.array  # [r, out]
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


def peft_scale(config: dict, module: str, rank: int) -> float:
    """PEFT's `scaling` of a module (transformers' path): its alpha (`alpha_pattern` first) over
    the rank, or over its square root with `use_rslora`."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _peft(path: Path, config: dict, tensors: dict) -> Adapter:
    file = path / CONFIG
    if config.get("peft_type", "LORA") != "LORA":
        raise Glm4vError(f"{file}: peft_type {config['peft_type']!r} is not LORA.")
    if config.get("fan_in_fan_out"):
        raise Glm4vError(f"{file}: fan_in_fan_out adapters (GPT-2's Conv1D) do not fit GLM-V.")
    targets = config.get("target_modules") or []
    regex = isinstance(targets, str)
    adapter = Adapter(path, targets=[targets] if regex else list(targets), regex=regex)
    adapter.dropout = float(config.get("lora_dropout") or 0.0)
    parts = {}
    for name, value in tensors.items():
        key = name.removeprefix(PEFT_PREFIX).replace(".modules_to_save.default", "")
        match = re.fullmatch(
            r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)(\.weight)?", key
        )
        if match is None:
            if ".lora_" in key:
                raise Glm4vError(f"{path / PEFT}: {name!r} is a kind of LoRA tensor not supported.")
            adapter.tensors[checkpoint_name(key)] = value
            continue
        module, leaf = match[1], match[2].split(".")[0]
        parts.setdefault(module, {})[leaf] = value
    for module, p in parts.items():
        if "lora_A" not in p or "lora_B" not in p:
            raise Glm4vError(f"{path / PEFT}: {module!r} lacks lora_A or lora_B.")
        a, b = p["lora_A"].T, p["lora_B"].T
        scale = peft_scale(config, module, a.shape[1])
        ours = checkpoint_name(module + ".")[:-1]
        adapter.layers[ours] = LowRank(a, b, scale, p.get("lora_magnitude_vector"))
    return adapter


def _linear_shape(layer: nn.Module) -> tuple:
    """(out, in) of a float or quantized linear layer."""
    out, width = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        width = width * 32 // layer.bits
    return out, width


def check_adapter(model: nn.Module, adapter: Adapter):
    """Every adapted layer a linear layer of this model with matching shapes, every replaced
    tensor one of its parameters with its shape, every asked-for target some layer's name."""
    modules = dict(model.named_modules())
    file = adapter.path / (OURS if (adapter.path / OURS).exists() else PEFT)
    for name, low in adapter.layers.items():
        layer = modules.get(name)
        if layer is None:
            raise Glm4vError(f"{file}: {name!r} is not a layer of this model.")
        if not isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
            raise Glm4vError(f"{file}: {name!r} is a {type(layer).__name__}, not a linear layer.")
        out, width = _linear_shape(layer)
        r = low.rank
        if low.a.shape != (width, r) or low.b.shape != (r, out):
            raise Glm4vError(
                f"{file}: {name!r} has low-rank factors {list(low.a.shape)} and "
                f"{list(low.b.shape)}, expected [{width}, r] and [r, {out}] (the layer is "
                f"{width} -> {out})."
            )
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
    linear = [
        hf_name(p) if peft else p
        for p, m in modules.items()
        if isinstance(m, (nn.Linear, nn.QuantizedLinear))
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


def hf_name(path: str) -> str:
    """Our module or parameter path under transformers' names (what PEFT's files use)."""
    for theirs, ours in WEIGHT_PREFIXES[:2]:
        if path.startswith(ours):
            return theirs + path[len(ours) :]
    return path


def low_rank_layer(base: nn.Module, low: LowRank, dropout: float = 0.0) -> nn.Module:
    """mlx-lm's LoRA (DoRA with a magnitude) layer around `base`, holding `low`'s factors."""
    kind = DoRALinear if low.m is not None else LoRALinear
    layer = kind.from_base(base, r=low.rank, dropout=dropout, scale=low.scale)
    dtype = base.scales.dtype if isinstance(base, nn.QuantizedLinear) else base.weight.dtype
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
    if swapped:
        model.update_modules(tree_unflatten(swapped))
    if adapter.tensors:
        params = dict(tree_flatten(model.parameters()))
        model.load_weights(
            [(k, v.astype(params[k].dtype)) for k, v in adapter.tensors.items()], strict=False
        )
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
    """A float weight [out, in] with `low` folded in, by the same arithmetic as `fuse`."""
    out, width = weight.shape
    base = nn.Linear(width, out, bias=False)
    base.weight = weight
    return low_rank_layer(base, low).fuse().weight
