"""The GLM-4.1V text decoder: sandwich-normed layers with multimodal RoPE.

Mirrors transformers' `Glm4vTextModel`. Only the first `rotary_dim` features of each head
turn, in interleaved pairs (2i, 2i+1); GLM-4.5V's text model (moe.py) shares the attention
and turns half-split pairs (i, i + rotary_dim/2) instead (`config.rope_interleaved`).
Frequency i follows the temporal, height or width position according to `mrope_section`;
for text all three positions are equal, which is plain RoPE and runs through `mx.fast.rope`.
"""

from functools import partial
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.layers.distributed import shard_linear
from mlx.utils import tree_map

from ..errors import Glm4vError
from .config import TextConfig
from .head_groups import heads_per_call, kv_heads_of
from .mlxlm import scaled_dot_product_attention, swiglu


def text_rope(config: TextConfig, offset):
    """Rotation for consecutive positions `offset + column` (offset: int or one per sequence)."""
    return partial(
        mx.fast.rope,
        dims=config.rotary_dim,
        traditional=config.rope_interleaved,
        base=config.rope_theta,
        scale=1.0,
        offset=offset,
    )


def mrope_tables(config: TextConfig, positions: np.ndarray, dtype=mx.float32):
    """cos/sin [B, 1, L, rotary_dim/2] for 3-D positions [3, B, L]."""
    dim = config.rotary_dim
    inv = (1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)).astype(
        np.float32
    )
    freqs = positions.astype(np.float32)[..., None] * inv  # [3, B, L, dim/2]
    axis_of = np.repeat(np.arange(len(config.mrope_section)) % 3, config.mrope_section)
    # each frequency from its axis
    freqs = np.moveaxis(freqs[axis_of, :, :, np.arange(dim // 2)], 0, -1)
    freqs = mx.array(freqs[:, None])
    return mx.cos(freqs).astype(dtype), mx.sin(freqs).astype(dtype)


def apply_mrope(
    x: mx.array, cos: mx.array, sin: mx.array, rotary_dim: int, interleaved: bool
) -> mx.array:
    """Turn pairs (2i, 2i+1) if `interleaved`, else pairs (i, i + rotary_dim/2), by the angles of
    cos/sin."""
    *lead, dim = x.shape
    half = rotary_dim // 2
    if interleaved:
        pairs = x[..., :rotary_dim].reshape(*lead, half, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
    else:
        x0, x1 = x[..., :half], x[..., half:rotary_dim]
    turned = (x0 * cos - x1 * sin, x1 * cos + x0 * sin)
    if interleaved:
        turned = mx.stack(turned, axis=-1).reshape(*lead, rotary_dim)
    else:
        turned = mx.concatenate(turned, axis=-1)
    if rotary_dim == dim:
        return turned
    return mx.concatenate([turned, x[..., rotary_dim:]], axis=-1)


def input_width(linear: nn.Module) -> int:
    """The input features of a (quantized, or stacked-experts) linear layer."""
    width = linear.weight.shape[-1]
    return width * 32 // linear.bits if hasattr(linear, "bits") else width


def splits_input(linear: nn.Module, n: int) -> bool:
    """Whether `linear`'s input features split `n` ways (in whole quantization groups)."""
    width = input_width(linear)
    return width % n == 0 and (width // n) % getattr(linear, "group_size", 1) == 0


def repeat_heads(linear: nn.Module, heads: int, times: int):
    """Repeat each of the `heads` output heads of `linear` (weight, scales, biases, bias) `times`
    in place."""
    linear.update(
        tree_map(
            lambda p: mx.repeat(p.reshape(heads, -1, *p.shape[1:]), times, axis=0).reshape(
                -1, *p.shape[1:]
            ),
            linear.parameters(),
        )
    )


def multimodal_rope(config: TextConfig, positions: np.ndarray, dtype):
    cos, sin = mrope_tables(config, positions, dtype)
    return partial(
        apply_mrope,
        cos=cos,
        sin=sin,
        rotary_dim=config.rotary_dim,
        interleaved=config.rope_interleaved,
    )


class Attention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        dim, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)

    def __call__(self, x: mx.array, rope, mask=None, cache=None, last_rope=None) -> mx.array:
        """Attention of the tokens `x` [B, L, dim]; with `last_rope` (the rotation of the last
        column alone), keys and values of every token but the output of the last one only."""
        q, k, v = self.project(x, rope, last_rope)
        if last_rope is not None:
            # the last query sees every key
            mask = mask[..., -1:, :] if isinstance(mask, mx.array) else None
        if hasattr(cache, "attend"):  # rows of a batch, each over its own cache (rows.py)
            return self.output(cache.attend(q, k, v, self.scale))
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return self.output(self.attend(q, k, v, mask, cache))

    def project(self, x: mx.array, rope, last_rope=None) -> tuple:
        """Queries (of the last column alone with `last_rope`), keys and values, heads first,
        turned."""
        B, L, _ = x.shape
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        rope_q = rope
        if last_rope is not None:
            x, L, rope_q = x[:, -1:], 1, last_rope
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        return rope_q(q), rope(k), v

    def attend(self, q, k, v, mask, cache, heads=None) -> mx.array:
        """[B, heads, L, head_dim] over the keys and values given (the cache's, quantized or not);
        with `heads` = (first, count), those query heads alone (head_groups.py)."""
        if heads is not None:
            first, count = heads
            kv = kv_heads_of(first, count, self.n_heads, self.n_kv_heads)
            q = q[:, first : first + count]
            k, v = tree_map(lambda t: t[:, kv], k), tree_map(lambda t: t[:, kv], v)
        return scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)

    def output(self, heads: mx.array) -> mx.array:
        B, _, L, _ = heads.shape
        return self.o_proj(heads.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def head_groups(self, queries: int, keys: int) -> list:
        """(first, count) of each call when `queries` attend `keys` each (head_groups.py)."""
        g = heads_per_call(self.n_heads, self.n_kv_heads, queries * keys)
        return [(h, g) for h in range(0, self.n_heads, g)]

    def can_shard(self, n: int) -> bool:
        heads, kv = self.n_heads, self.n_kv_heads
        return heads % n == 0 and (kv % n == 0 or n % kv == 0) and splits_input(self.o_proj, n)

    def shard(self, group) -> bool:
        """Split the heads over `group` (False, untouched, when they do not divide).

        With fewer KV heads than ranks, each KV head is repeated first so that every rank holds
        the one its query heads share; o_proj's partial outputs are summed across ranks.
        """
        n, heads, kv = group.size(), self.n_heads, self.n_kv_heads
        if not self.can_shard(n):
            return False
        if kv % n:
            for proj in (self.k_proj, self.v_proj):
                repeat_heads(proj, kv, n // kv)
            kv = n
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(self, name, shard_linear(getattr(self, name), "all-to-sharded", group=group))
        self.o_proj = shard_linear(self.o_proj, "sharded-to-all", group=group)
        self.n_heads, self.n_kv_heads = heads // n, kv // n
        return True


class MLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(swiglu(gate, up))

    def can_shard(self, n: int) -> bool:
        return splits_input(self.down_proj, n)

    def shard(self, group) -> bool:
        """Split the intermediate features over `group`; the fused gate_up splits gate and up
        alike."""
        if not self.can_shard(group.size()):
            return False
        self.gate_up_proj = shard_linear(
            self.gate_up_proj, "all-to-sharded", segments=2, group=group
        )
        self.down_proj = shard_linear(self.down_proj, "sharded-to-all", group=group)
        return True


class DecoderLayer(nn.Module):
    """GLM-4's sandwich: each sub-layer's output is normed again before the residual add."""

    def __init__(self, config: TextConfig):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=eps)
        self.post_self_attn_layernorm = nn.RMSNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=eps)
        self.post_mlp_layernorm = nn.RMSNorm(config.hidden_size, eps=eps)

    def __call__(self, x: mx.array, rope, mask=None, cache=None, last_rope=None) -> mx.array:
        h = self.self_attn(self.input_layernorm(x), rope, mask, cache, last_rope)
        return self.finish(x if last_rope is None else x[:, -1:], h)

    def finish(self, x: mx.array, attended: mx.array) -> mx.array:
        """The layer after its attention: norms, residual adds and the MLP."""
        x = x + self.post_self_attn_layernorm(attended)
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class TextModel(nn.Module):
    """Embeddings, decoder layers, final norm; `layers` lets GLM-4.5V's model bring its own.

    Split over several machines either by `shard` (tensor parallel: every rank runs every
    layer on its part of the heads and features) or by `pipeline` (each rank runs a run of
    whole layers and hands the hidden states on).
    """

    def __init__(self, config: TextConfig, layers: Optional[list] = None):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = (
            layers
            if layers is not None
            else [DecoderLayer(config) for _ in range(config.num_hidden_layers)]
        )
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.pipeline_group = None
        self.first_layer = 0

    def __call__(self, h: mx.array, rope, mask=None, cache=None, last_rope=None) -> mx.array:
        """Hidden states after the final norm; with `last_rope` (see `Attention`) the last
        layer computes the last column only, [B, 1, hidden]: what a prompt's first token needs."""
        group = self.pipeline_group
        if group is not None and group.rank() > 0:
            h = mx.distributed.recv_like(h, group.rank() - 1, group=group)
        last = len(self.layers) - 1 if last_rope is not None and group is None else None
        for i, (layer, c) in enumerate(zip(self.layers, cache or [None] * len(self.layers))):
            h = layer(h, rope, mask, c, last_rope) if i == last else layer(h, rope, mask, c)
        if group is not None:
            if group.rank() < group.size() - 1:
                h = mx.distributed.send(h, group.rank() + 1, group=group)
            # the last stage's, on every rank
            h = mx.distributed.all_gather(h, group=group)[-h.shape[0] :]
        return self.norm(h)

    def unsplittable(self, n: int) -> list:
        """The sub-modules (attention, MLP) whose widths do not split `n` ways."""
        return [
            f"layers.{i}.{name}"
            for i, layer in enumerate(self.layers)
            for name in ("self_attn", "mlp")
            if not getattr(layer, name).can_shard(n)
        ]

    def shard(self, group) -> list:
        """Tensor parallelism over `group`; returns the sub-modules kept whole (widths that do
        not divide)."""
        whole = []
        for i, layer in enumerate(self.layers):
            for name in ("self_attn", "mlp"):
                if not getattr(layer, name).shard(group):
                    whole.append(f"layers.{i}.{name}")
        return whole

    def pipeline(self, group):
        """Keep only this rank's run of layers: an even split, the first ranks taking one more when
        the count does not divide; rank 0 runs the first layers."""
        n, rank, count = group.size(), group.rank(), len(self.layers)
        if count < n:
            raise Glm4vError(
                f"the text model has {count} layers, fewer than the {n} ranks; use fewer machines."
            )
        base, extra = divmod(count, n)
        sizes = [base + (r < extra) for r in range(n)]
        self.first_layer = sum(sizes[:rank])
        self.layers = self.layers[self.first_layer : self.first_layer + sizes[rank]]
        self.pipeline_group = group
