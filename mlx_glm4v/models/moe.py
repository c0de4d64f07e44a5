"""The GLM-4.5V text decoder: plain pre-norm layers, half-split M-RoPE, mixture of experts.

Mirrors transformers' `Glm4vMoeTextModel`. Attention and rotary are GLM-4.1V's (language.py)
with `rope_interleaved` off. The first `first_k_dense_replace` layers keep a dense SwiGLU;
the others send each token to `num_experts_per_tok` of `n_routed_experts` SwiGLU experts,
run through mlx-lm's SwitchGLU (gathered matmuls, quantizable), plus always-on shared experts.
Checkpoints store experts one by one (or, from transformers 5, fused); `stack_experts` turns
either into SwitchGLU's [experts, out, in] tensors.
"""

import re

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear

from ..errors import Glm4vError
from .config import MoeTextConfig
from .language import Attention, TextModel, splits_input
from .mlxlm import SwitchGLU
from .vision import VisionMLP


class MLP(VisionMLP):
    """The vision tower's SwiGLU (separate gate/up/down projections), splittable over ranks."""

    def can_shard(self, n: int) -> bool:
        return splits_input(self.down_proj, n)

    def shard(self, group) -> bool:
        if not self.can_shard(group.size()):
            return False
        self.gate_proj = shard_linear(self.gate_proj, "all-to-sharded", group=group)
        self.up_proj = shard_linear(self.up_proj, "all-to-sharded", group=group)
        self.down_proj = shard_linear(self.down_proj, "sharded-to-all", group=group)
        return True


class Router(nn.Module):
    """Which experts a token visits and with what weight (transformers' `Glm4vMoeTextTopkRouter`).

    Everything runs in float32, as the reference keeps this module. The correction bias only
    steers the choice: the weights are the plain sigmoid scores of the chosen experts. With
    `n_group` > 1 only experts of the `topk_group` groups whose two best biased scores sum
    highest can be chosen.
    """

    def __init__(self, config: MoeTextConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = mx.zeros((config.n_routed_experts, config.hidden_size))
        self.e_score_correction_bias = mx.zeros((config.n_routed_experts,))

    def __call__(self, x: mx.array):
        scores = mx.sigmoid(x.astype(mx.float32) @ self.weight.astype(mx.float32).T)
        choice = scores + self.e_score_correction_bias.astype(mx.float32)
        if self.topk_group < self.n_group:
            groups = choice.reshape(*choice.shape[:-1], self.n_group, -1)
            group_scores = mx.topk(groups, 2, axis=-1).sum(axis=-1)
            dropped = self.n_group - self.topk_group
            worst = mx.argpartition(group_scores, kth=dropped - 1, axis=-1)[..., :dropped]
            groups = mx.put_along_axis(
                groups, worst[..., None], mx.array(-mx.inf, mx.float32), axis=-2
            )
            choice = groups.reshape(choice.shape)
        # a choice, not a function of the weights: gradients reach the router through the scores
        chosen = mx.stop_gradient(
            mx.argpartition(-choice, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        )
        weights = mx.take_along_axis(scores, chosen, axis=-1)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        return chosen, weights * self.routed_scaling_factor


class MoE(nn.Module):
    def __init__(self, config: MoeTextConfig):
        super().__init__()
        self.gate = Router(config)
        self.switch_mlp = SwitchGLU(
            config.hidden_size, config.moe_intermediate_size, config.n_routed_experts
        )
        self.shared_experts = MLP(
            config.hidden_size, config.moe_intermediate_size * config.n_shared_experts
        )
        self.group = None

    def __call__(self, x: mx.array) -> mx.array:
        chosen, weights = self.gate(x)
        routed = (self.switch_mlp(x, chosen) * weights[..., None]).sum(axis=-2).astype(x.dtype)
        out = routed + self.shared_experts(x)
        return out if self.group is None else mx.distributed.all_sum(out, group=self.group)

    def can_shard(self, n: int) -> bool:
        return splits_input(self.switch_mlp.down_proj, n) and self.shared_experts.can_shard(n)

    def shard(self, group) -> bool:
        """Every expert's (and the shared experts') features split over `group`, in place; the
        router stays whole, so every rank picks the same experts, and one sum joins the parts."""
        if not self.can_shard(group.size()):
            return False
        for mlp in (self.switch_mlp, self.shared_experts):
            shard_inplace(mlp.gate_proj, "all-to-sharded", group=group)
            shard_inplace(mlp.up_proj, "all-to-sharded", group=group)
            shard_inplace(mlp.down_proj, "sharded-to-all", group=group)
        self.group = group
        return True


class DecoderLayer(nn.Module):
    """Plain pre-norm: no extra norms after attention or MLP, unlike GLM-4.1V's sandwich."""

    def __init__(self, config: MoeTextConfig, index: int):
        super().__init__()
        self.self_attn = Attention(config)
        if index < config.first_k_dense_replace:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        else:
            self.mlp = MoE(config)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(self, x: mx.array, rope, mask=None, cache=None, last_rope=None) -> mx.array:
        h = self.self_attn(self.input_layernorm(x), rope, mask, cache, last_rope)
        return self.finish(x if last_rope is None else x[:, -1:], h)

    def finish(self, x: mx.array, attended: mx.array) -> mx.array:
        """The layer after its attention: the residual adds and the MLP."""
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x))


class MoeTextModel(TextModel):
    def __init__(self, config: MoeTextConfig):
        super().__init__(config, [DecoderLayer(config, i) for i in range(config.num_hidden_layers)])


# language_model.layers.{layer}.mlp.experts.{expert}.{proj}.{weight|scales|biases}: one expert's
# tensor
_EXPERT = re.compile(
    r"(.*\.mlp\.)experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases)$"
)
# transformers 5's fused tensors: experts.gate_up_proj [E, 2I, H] (gate first), experts.down_proj
# [E, H, I]
_FUSED = re.compile(r"(.*\.mlp\.)experts\.(gate_up_proj|down_proj)$")


# transformers keeps the routers in float32 whatever the model's dtype
# (`_keep_in_fp32_modules_strict`)
_ROUTER = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")


def cast_predicate(key: str) -> bool:
    """mlx-lm's `cast_predicate`: whether a dtype cast may touch the tensor `key`; not the
    routers'."""
    return not key.endswith(_ROUTER)


def expert_slot(key: str):
    """(the stacked tensor it goes into, expert index) for one expert's tensor, else None."""
    if m := _EXPERT.match(key):
        prefix, expert, proj, kind = m.groups()
        return f"{prefix}switch_mlp.{proj}.{kind}", int(expert)
    return None


def stack_experts(weights: dict, num_experts: int) -> dict:
    """Expert tensors under SwitchGLU's names `mlp.switch_mlp.{proj}.{...}`, stacked [E, out, in].

    Takes per-expert tensors (the published layout, also mlx-lm's quantized one) and transformers
    5's fused ones; everything else passes through. The experts of one projection must all be
    in `weights`, so a streaming converter hands them over once the last one has arrived.
    """
    out, groups = {}, {}
    for key, value in weights.items():
        if slot := expert_slot(key):
            stacked, expert = slot
            groups.setdefault(stacked, {})[expert] = value
        elif m := _FUSED.match(key):
            prefix, proj = m.groups()
            if proj == "down_proj":
                out[f"{prefix}switch_mlp.down_proj.weight"] = value
            else:
                gate, up = mx.split(value, 2, axis=1)
                out[f"{prefix}switch_mlp.gate_proj.weight"] = gate
                out[f"{prefix}switch_mlp.up_proj.weight"] = up
        else:
            out[key] = value
    for key, experts in groups.items():
        if sorted(experts) != list(range(num_experts)):
            raise Glm4vError(
                f"{key}: the checkpoint holds {len(experts)} of the {num_experts} experts' tensors."
            )
        out[key] = mx.stack([experts[e] for e in range(num_experts)])
    return out
