"""Adapters for training: which layers get LoRA or DoRA, writing them, and PEFT's form out.

Layers are named as PEFT and LlamaFactory name them, which are transformers' module names and
ours alike: q_proj, k_proj, v_proj, o_proj, gate_up_proj and down_proj in the dense decoder
(gate_proj, up_proj and down_proj in the dense layers, shared experts and routed experts of
the mixture-of-experts one; the routed experts get mlx-lm's `LoRASwitchLinear`, and DoRA, which
neither mlx-lm nor PEFT has for them, leaves them alone). `vision` adds every linear layer of
the vision tower and its merger (qkv, proj, gate_proj, up_proj,
down_proj). Full fine-tuning trains every parameter. Reading adapters back, fusing them and
PEFT's files in are the checkpoints wing's (checkpoints/adapters.py): generate, chat, serve
and convert load them there.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..checkpoints.adapters import (
    ADAPTED,
    CONFIG,
    LINEAR,
    OURS,
    PEFT,
    PEFT_PREFIX,
    SWITCH,
    hf_name,
    read_adapter,
)
from ..checkpoints.expert_lora import to_fused
from ..errors import Glm4vError
from ..models.mlxlm import DoRALinear, LoRALinear, LoRASwitchLinear

TEXT_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_up_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
FINE_TUNE_TYPES = ("lora", "dora", "full")


@dataclass
class LoraSettings:
    """What an adapter is: its rank, alpha (scale = alpha / rank, PEFT's convention), dropout,
    the decoder layers it adapts (names as above), whether the vision tower and merger join."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple = TEXT_TARGETS
    vision: bool = False
    fine_tune_type: str = "lora"
    num_layers: Optional[int] = None  # the last N decoder layers only (mlx-lm's); None: all

    def __post_init__(self):
        if self.fine_tune_type not in FINE_TUNE_TYPES:
            kinds = ", ".join(FINE_TUNE_TYPES)
            raise Glm4vError(f"fine-tune type {self.fine_tune_type!r} is not one of {kinds}.")
        if self.rank < 1:
            raise Glm4vError(f"the LoRA rank must be at least 1, not {self.rank}.")
        if not 0 <= self.dropout < 1:
            raise Glm4vError(f"the LoRA dropout must be in [0, 1), not {self.dropout}.")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _linear(module) -> bool:
    return isinstance(module, LINEAR + SWITCH)


def target_layers(model: nn.Module, settings: LoraSettings) -> list:
    """The paths of the linear layers (and routed experts' projections) `settings` adapts; a
    target naming none is refused."""
    paths, found = [], set()
    skipped = _early_layers(model, settings)
    for path, module in model.named_modules():
        if (
            not _linear(module)
            or path.startswith(skipped)
            or (isinstance(module, SWITCH) and settings.fine_tune_type == "dora")
        ):
            continue
        leaf = path.rpartition(".")[2]
        if path.startswith("visual.") and settings.vision:
            paths.append(path)
        elif leaf in settings.targets and not path.startswith("visual."):
            paths.append(path)
            found.add(leaf)
    if settings.fine_tune_type != "full":
        # shared by both decoders' spellings: refuse only names neither knows
        missing = set(settings.targets) - found - set(TEXT_TARGETS)
        if missing:
            raise Glm4vError(
                f"the LoRA target {sorted(missing)[0]!r} names no linear layer of this model's "
                f"decoder (it has {', '.join(sorted(_decoder_names(model)))})."
            )
    if not paths and settings.fine_tune_type != "full":
        raise Glm4vError("the LoRA targets name no linear layer of this model.")
    return paths


def _early_layers(model: nn.Module, settings: LoraSettings) -> tuple:
    """Path prefixes of the decoder layers `num_layers` leaves out (the first ones)."""
    n = len(model.layers)
    keep = n if settings.num_layers is None else settings.num_layers
    if not 0 < keep <= n:
        raise Glm4vError(f"--num-layers {keep} must be between 1 and the model's {n} layers.")
    return tuple(f"language_model.layers.{i}." for i in range(n - keep))


def _decoder_names(model: nn.Module) -> set:
    return {
        p.rpartition(".")[2]
        for p, m in model.named_modules()
        if _linear(m) and not p.startswith("visual.")
    }


def apply_lora(model: nn.Module, settings: LoraSettings = LoraSettings()) -> list:
    """Freeze the model and swap the targeted layers for fresh LoRA (or DoRA) layers, mlx-lm's,
    float or quantized bases alike (QLoRA); full fine-tuning unfreezes everything instead.
    Returns the adapted layers' paths."""
    if settings.fine_tune_type == "full":
        model.unfreeze()
        for i in range(len(_early_layers(model, settings))):
            model.layers[i].freeze()
        return []
    paths = target_layers(model, settings)
    model.freeze()
    kind = DoRALinear if settings.fine_tune_type == "dora" else LoRALinear
    modules = dict(model.named_modules())
    layers = [
        (
            p,
            (LoRASwitchLinear if isinstance(modules[p], SWITCH) else kind).from_base(
                modules[p], r=settings.rank, dropout=settings.dropout, scale=settings.scale
            ),
        )
        for p in paths
    ]
    model.update_modules(tree_unflatten(layers))
    return paths


def save_adapters(model: nn.Module, path, settings: LoraSettings) -> Path:
    """The trainable parameters as `adapters.safetensors` with `adapter_config.json` (mlx-lm's
    form; every parameter for full fine-tuning) in directory `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    params = (
        model.parameters() if settings.fine_tune_type == "full" else model.trainable_parameters()
    )
    tensors = dict(tree_flatten(params))
    if not tensors:
        raise Glm4vError("the model has no trainable parameters to save; apply_lora first.")
    mx.save_safetensors(str(path / OURS), tensors, metadata={"format": "mlx"})
    config = {
        "fine_tune_type": settings.fine_tune_type,
        "num_layers": len(model.layers),
        "lora_parameters": {
            "rank": settings.rank,
            "scale": settings.scale,
            "dropout": settings.dropout,
            # the names adapted here: the settings' hold both decoders' spellings
            "keys": sorted(
                {p.rpartition(".")[2] for p, m in model.named_modules() if isinstance(m, ADAPTED)}
            )
            or list(settings.targets),
        },
        "alpha": settings.alpha,
        "vision": settings.vision,
    }
    (path / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return path


def export_peft(adapter_path, out, base_model: Optional[str] = None) -> Path:
    """Our adapter in `adapter_path` written in PEFT's form to `out`, as transformers+peft
    reads it (`PeftModel.from_pretrained`): factors transposed under transformers' names, the
    rank and alpha (per-layer ones in `rank_pattern` / `alpha_pattern`), replaced tensors as
    `modules_to_save`. The routed experts' layers go out as transformers 5's fused
    `target_parameters` (expert_lora.py). peft 0.21 on transformers 5 reads MLP names
    (gate_proj, up_proj, down_proj) of a mixture-of-experts model as the routed experts', so
    it misreads an adapter of the shared experts or dense layers."""
    adapter = read_adapter(adapter_path)
    if not (adapter.path / OURS).exists():
        raise Glm4vError(f"{adapter.path} is already in PEFT's form.")
    if not adapter.layers:
        raise Glm4vError(
            f"{adapter.path / OURS} holds no LoRA layers (a full fine-tune); convert it instead."
        )
    tensors, ranks, alphas, saved = {}, {}, {}, set()
    experts = {}
    for name, low in adapter.layers.items():
        if ".switch_mlp." in name:
            mlp, _, proj = name.rpartition(".switch_mlp.")
            experts.setdefault(mlp, {})[proj] = (low.a, low.b, low.scale)
            continue
        theirs = PEFT_PREFIX + hf_name(name)
        tensors[f"{theirs}.lora_A.weight"] = low.a.T
        tensors[f"{theirs}.lora_B.weight"] = low.b.T
        if low.m is not None:
            tensors[f"{theirs}.lora_magnitude_vector"] = low.m
        ranks[hf_name(name)], alphas[hf_name(name)] = low.rank, low.scale * low.rank
    parameters = []
    for mlp, parts in experts.items():
        fused = to_fused(parts)
        module = hf_name(f"{mlp}.experts")
        for param, (a, b, rank, alpha) in fused.items():
            # peft nests the wrappers in the order of the tensors: gate_up inside, down outside
            inner = param == "gate_up_proj" and len(fused) == 2
            prefix = f"{PEFT_PREFIX}{module}{'.base_layer' * inner}"
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
            key = f"{module}.{param}"
            parameters.append(key)
            ranks[key], alphas[key] = rank, alpha
    for name, value in adapter.tensors.items():
        tensors[PEFT_PREFIX + hf_name(name)] = value
        saved.add(name.rpartition(".")[0].rpartition(".")[2])
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": adapter.dropout,
        # whole paths: a leaf name alone would also catch layers of other kinds (patch_embed.proj)
        "target_modules": sorted(hf_name(n) for n in adapter.layers if ".switch_mlp." not in n),
        "target_parameters": sorted(parameters) or None,
        "rank_pattern": {re.escape(k): r for k, r in ranks.items() if r != rank},
        "alpha_pattern": {re.escape(k): a for k, a in alphas.items() if a != alpha},
        "use_dora": adapter.dora,
        "use_rslora": False,
        "modules_to_save": sorted(saved) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / PEFT), tensors, metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out
