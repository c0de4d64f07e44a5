"""The hybrid encoder: attention within the coarsest level (AIFI), a top-down FPN and a bottom-up
PAN of CSP-RepVGG blocks, and the mask branch that turns the pyramid and the backbone's stride-4
map into mask prototypes."""

import math
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .backbone import ACTIVATIONS, BatchNorm, ConvNorm
from .config import LayoutConfig


def resize_bilinear(x, height: int, width: int):
    """torch's bilinear interpolation with `align_corners=False` (channels-last)."""

    def axis(n_in, n_out):
        src = mx.maximum((mx.arange(n_out, dtype=mx.float32) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = mx.floor(src).astype(mx.int32)
        i1 = mx.minimum(i0 + 1, n_in - 1)
        w1 = src - i0.astype(mx.float32)
        return i0, i1, 1.0 - w1, w1

    y0, y1, hy0, hy1 = axis(x.shape[1], height)
    x0, x1, wx0, wx1 = axis(x.shape[2], width)
    top, bottom = mx.take(x, y0, axis=1), mx.take(x, y1, axis=1)
    wx0, wx1 = wx0[:, None], wx1[:, None]
    top = mx.take(top, x0, axis=2) * wx0 + mx.take(top, x1, axis=2) * wx1
    bottom = mx.take(bottom, x0, axis=2) * wx0 + mx.take(bottom, x1, axis=2) * wx1
    return hy0[:, None, None] * top + hy1[:, None, None] * bottom


def upsample_nearest2(x):
    b, h, w, c = x.shape
    x = mx.broadcast_to(x[:, :, None, :, None], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


@lru_cache(maxsize=32)
def sine_positions(height: int, width: int, dim: int, temperature: float) -> mx.array:
    """RT-DETR's 2-D sine table `[sin_h | cos_h | sin_w | cos_w]`, built in float64 as
    transformers builds it, then float32: a constant per feature-map size."""
    quarter = dim // 4
    omega = 1.0 / temperature ** (np.arange(quarter, dtype=np.float64) / quarter)
    gh, gw = np.meshgrid(
        np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij"
    )
    eh, ew = np.outer(gh.ravel(), omega), np.outer(gw.ravel(), omega)
    table = np.concatenate([np.sin(eh), np.cos(eh), np.sin(ew), np.cos(ew)], axis=1)
    return mx.array(table.astype(np.float32))[None]


class ConvNormLayer(nn.Module):
    """The encoder's convolution + batch norm + activation (its weights are `conv` and `norm`)."""

    def __init__(self, cin, cout, k, stride=1, act=None, eps=1e-5, padding=None):
        super().__init__()
        pad = (k - 1) // 2 if padding is None else padding
        self.conv = nn.Conv2d(cin, cout, k, stride, pad, bias=False)
        self.norm = BatchNorm(cout, eps)
        self.act = ACTIVATIONS[act]

    def __call__(self, x):
        return self.act(self.norm(self.conv(x)))


class SelfAttention(nn.Module):
    """Multi-head attention with position embeddings added to queries and keys only."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.o_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def __call__(self, x, pos=None):
        b, n, d = x.shape
        qk = x if pos is None else x + pos

        def split(t):
            return t.reshape(b, n, self.heads, -1).transpose(0, 2, 1, 3)

        q, k, v = split(self.q_proj(qk)), split(self.k_proj(qk)), split(self.v_proj(x))
        scale = (d // self.heads) ** -0.5
        weights = mx.softmax((q @ k.transpose(0, 1, 3, 2)) * scale, axis=-1, precise=True)
        return self.o_proj((weights @ v).transpose(0, 2, 1, 3).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[act]

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, c: LayoutConfig):
        super().__init__()
        d = c.encoder_hidden_dim
        self.normalize_before = c.normalize_before
        self.self_attn = SelfAttention(d, c.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.mlp = MLP(d, c.encoder_ffn_dim, c.encoder_activation_function)
        self.final_layer_norm = nn.LayerNorm(d, eps=c.layer_norm_eps)

    def __call__(self, x, pos):
        pre = self.normalize_before
        h = self.self_attn_layer_norm(x) if pre else x
        x = x + self.self_attn(h, pos)
        x = x if pre else self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if pre else x
        x = h + self.mlp(h)
        return x if pre else self.final_layer_norm(x)


class AIFI(nn.Module):
    def __init__(self, c: LayoutConfig):
        super().__init__()
        self.dim, self.temperature = c.encoder_hidden_dim, c.positional_encoding_temperature
        self.with_positions = c.eval_size is None
        self.layers = [EncoderLayer(c) for _ in range(c.encoder_layers)]

    def __call__(self, x):
        b, h, w, d = x.shape
        pos = sine_positions(h, w, d, self.temperature) if self.with_positions else None
        x = x.reshape(b, h * w, d)
        for layer in self.layers:
            x = layer(x, pos)
        return x.reshape(b, h, w, d)


class RepVgg(nn.Module):
    def __init__(self, c: LayoutConfig):
        super().__init__()
        ch = int(c.encoder_hidden_dim * c.hidden_expansion)
        eps = c.batch_norm_eps
        self.conv1 = ConvNormLayer(ch, ch, 3, act=None, eps=eps, padding=1)
        self.conv2 = ConvNormLayer(ch, ch, 1, act=None, eps=eps, padding=0)
        self.act = ACTIVATIONS[c.activation_function]

    def __call__(self, x):
        return self.act(self.conv1(x) + self.conv2(x))


class CSPRep(nn.Module):
    def __init__(self, c: LayoutConfig):
        super().__init__()
        cin, cout = c.encoder_hidden_dim * 2, c.encoder_hidden_dim
        ch, act, eps = int(cout * c.hidden_expansion), c.activation_function, c.batch_norm_eps
        self.conv1 = ConvNormLayer(cin, ch, 1, act=act, eps=eps)
        self.conv2 = ConvNormLayer(cin, ch, 1, act=act, eps=eps)
        self.bottlenecks = [RepVgg(c) for _ in range(3)]
        if ch != cout:
            self.conv3 = ConvNormLayer(ch, cout, 1, act=act, eps=eps)

    def __call__(self, x):
        h = self.conv1(x)
        for block in self.bottlenecks:
            h = block(h)
        h = h + self.conv2(x)
        return self.conv3(h) if "conv3" in self else h


class Upsample2(nn.Module):
    """Bilinear 2x; a module so that the scale heads' layer indices match the checkpoint's."""

    def __call__(self, x):
        return resize_bilinear(x, 2 * x.shape[1], 2 * x.shape[2])


class ScaleHead(nn.Module):
    def __init__(self, cin, ch, stride, base):
        super().__init__()
        self.layers = []
        for k in range(max(1, int(math.log2(stride) - math.log2(base)))):
            self.layers.append(ConvNorm(cin if k == 0 else ch, ch, 3, act="silu"))
            if stride != base:
                self.layers.append(Upsample2())

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class MaskFeatFPN(nn.Module):
    def __init__(self, cin: int, strides: list, ch: int, cout: int):
        super().__init__()
        self.order = [int(i) for i in np.argsort(strides)]
        strides = [strides[i] for i in self.order]
        self.scale_heads = [ScaleHead(cin, ch, s, strides[0]) for s in strides]
        self.output_conv = ConvNorm(ch, cout, 3, act="silu")

    def __call__(self, maps):
        maps = [maps[i] for i in self.order]
        out = self.scale_heads[0](maps[0])
        for head, x in zip(self.scale_heads[1:], maps[1:]):
            out = out + resize_bilinear(head(x), out.shape[1], out.shape[2])
        return self.output_conv(out)


class MaskOutput(nn.Module):
    def __init__(self, cin: int, prototypes: int):
        super().__init__()
        self.base_conv = ConvNorm(cin, cin, 3, act="silu")
        self.conv = nn.Conv2d(cin, prototypes, 1)

    def __call__(self, x):
        return self.conv(self.base_conv(x))


class HybridEncoder(nn.Module):
    def __init__(self, c: LayoutConfig):
        super().__init__()
        d, act, eps = c.encoder_hidden_dim, c.activation_function, c.batch_norm_eps
        n = len(c.encoder_in_channels) - 1
        self.encode_proj_layers = list(c.encode_proj_layers) if c.encoder_layers > 0 else []
        self.aifi = [AIFI(c) for _ in c.encode_proj_layers]
        self.lateral_convs = [ConvNormLayer(d, d, 1, act=act, eps=eps) for _ in range(n)]
        self.fpn_blocks = [CSPRep(c) for _ in range(n)]
        self.downsample_convs = [
            ConvNormLayer(d, d, 3, stride=2, act=act, eps=eps) for _ in range(n)
        ]
        self.pan_blocks = [CSPRep(c) for _ in range(n)]
        mc = c.mask_feature_channels
        self.mask_feature_head = MaskFeatFPN(d, list(c.feat_strides), mc[0], mc[1])
        self.encoder_mask_lateral = ConvNorm(c.x4_feat_dim, mc[1], 3, act="silu")
        self.encoder_mask_output = MaskOutput(mc[1], c.num_prototypes)

    def __call__(self, maps: list, x4):
        """Projected backbone maps (fine to coarse) and the stride-4 map -> the pyramid after
        FPN and PAN (fine to coarse) and the mask prototypes."""
        maps = list(maps)
        for aifi, i in zip(self.aifi, self.encode_proj_layers):
            maps[i] = aifi(maps[i])
        n = len(self.lateral_convs)
        fpn = [maps[-1]]
        for idx, (lateral, block) in enumerate(zip(self.lateral_convs, self.fpn_blocks)):
            top = lateral(fpn[-1])
            fpn[-1] = top
            fpn.append(block(mx.concatenate([upsample_nearest2(top), maps[n - idx - 1]], axis=-1)))
        fpn.reverse()
        pan = [fpn[0]]
        for idx, (down, block) in enumerate(zip(self.downsample_convs, self.pan_blocks)):
            pan.append(block(mx.concatenate([down(pan[-1]), fpn[idx + 1]], axis=-1)))
        mask = self.mask_feature_head(pan)
        mask = resize_bilinear(mask, 2 * mask.shape[1], 2 * mask.shape[2])
        mask = self.encoder_mask_output(mask + self.encoder_mask_lateral(x4))
        return pan, mask
