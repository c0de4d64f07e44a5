"""The decoder: queries refined layer by layer with self-attention and multiscale deformable
attention into the encoder's pyramid; the heads (boxes, classes, masks, reading order)."""

import mlx.core as mx
import mlx.nn as nn

from .config import LayoutConfig
from .encoder import MLP, SelfAttention


def inverse_sigmoid(x, eps=1e-5):
    x = mx.clip(x, 0.0, 1.0)
    return mx.log(mx.maximum(x, eps) / mx.maximum(1.0 - x, eps))


class PredictionHead(nn.Module):
    """Linear layers with ReLU between them."""

    def __init__(self, din: int, hidden: int, dout: int, n: int):
        super().__init__()
        dims = [din] + [hidden] * (n - 1)
        self.layers = [nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [dout])]

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nn.relu(layer(x))
        return self.layers[-1](x)


class GlobalPointer(nn.Module):
    """Pairwise reading-order logits: query i before key j, the lower triangle masked."""

    def __init__(self, c: LayoutConfig):
        super().__init__()
        self.size = c.global_pointer_head_size
        self.dense = nn.Linear(c.d_model, 2 * self.size)

    def __call__(self, x):
        b, n, _ = x.shape
        qk = self.dense(x).reshape(b, n, 2, self.size)
        logits = (qk[:, :, 0] @ qk[:, :, 1].transpose(0, 2, 1)) / (self.size**0.5)
        lower = mx.arange(n)[:, None] >= mx.arange(n)[None]
        return mx.where(lower, mx.array(-1e4, logits.dtype), logits)


def sample_bilinear(value, height: int, width: int, x, y):
    """torch's `grid_sample` (bilinear, zeros padding, `align_corners=False`) as a gather.

    value: (B, heads, H*W, D) one level's map; x, y: (B, heads, N) locations in [0, 1].
    Returns (B, heads, N, D): the four neighbours' values weighted, those outside counting zero.
    """
    ix = ((2 * x - 1 + 1) * width - 1) / 2
    iy = ((2 * y - 1 + 1) * height - 1) / 2
    x0, y0 = mx.floor(ix), mx.floor(iy)
    x1, y1 = x0 + 1, y0 + 1
    corners = [
        (x0, y0, (x1 - ix) * (y1 - iy)),
        (x1, y0, (ix - x0) * (y1 - iy)),
        (x0, y1, (x1 - ix) * (iy - y0)),
        (x1, y1, (ix - x0) * (iy - y0)),
    ]
    out = None
    for cx, cy, w in corners:
        inside = (cx >= 0) & (cx <= width - 1) & (cy >= 0) & (cy <= height - 1)
        index = (mx.clip(cy, 0, height - 1) * width + mx.clip(cx, 0, width - 1)).astype(mx.int32)
        picked = mx.take_along_axis(value, index[..., None], axis=2)
        term = picked * mx.where(inside, w, 0.0)[..., None]
        out = term if out is None else out + term
    return out


class DeformableAttention(nn.Module):
    def __init__(self, c: LayoutConfig):
        super().__init__()
        d, self.heads = c.d_model, c.decoder_attention_heads
        self.levels, self.points = c.num_feature_levels, c.decoder_n_points
        n = self.heads * self.levels * self.points
        self.sampling_offsets = nn.Linear(d, n * 2)
        self.attention_weights = nn.Linear(d, n)
        self.value_proj = nn.Linear(d, d)
        self.output_proj = nn.Linear(d, d)

    def __call__(self, x, pos, memory, shapes: list, reference):
        """x: (B, Q, d) queries; memory: (B, S, d) the levels flattened; reference: (B, Q, 4)
        boxes (centre, size) in [0, 1]."""
        b, q, d = x.shape
        h, lv, p = self.heads, self.levels, self.points
        x = x + pos
        value = self.value_proj(memory).reshape(b, -1, h, d // h).transpose(0, 2, 1, 3)
        offsets = self.sampling_offsets(x).reshape(b, q, h, lv, p, 2)
        weights = mx.softmax(self.attention_weights(x).reshape(b, q, h, lv * p), -1, precise=True)
        weights = weights.reshape(b, q, h, lv, p)
        ref = reference[:, :, None, None, None, :]
        locations = ref[..., :2] + offsets / p * ref[..., 2:] * 0.5  # (B, Q, h, lv, p, 2)
        locations = locations.transpose(0, 2, 3, 1, 4, 5)  # (B, h, lv, Q, p, 2)
        weights = weights.transpose(0, 2, 3, 1, 4)  # (B, h, lv, Q, p)
        out, start = None, 0
        for level, (hl, wl) in enumerate(shapes):
            loc = locations[:, :, level].reshape(b, h, q * p, 2)
            sampled = sample_bilinear(
                value[:, :, start : start + hl * wl], hl, wl, loc[..., 0], loc[..., 1]
            )
            sampled = sampled.reshape(b, h, q, p, -1) * weights[:, :, level, :, :, None]
            part = sampled.sum(axis=3)
            out = part if out is None else out + part
            start += hl * wl
        return self.output_proj(out.transpose(0, 2, 1, 3).reshape(b, q, d))


class DecoderLayer(nn.Module):
    def __init__(self, c: LayoutConfig):
        super().__init__()
        d, eps = c.d_model, c.layer_norm_eps
        self.self_attn = SelfAttention(d, c.decoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.encoder_attn = DeformableAttention(c)
        self.encoder_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.mlp = MLP(d, c.decoder_ffn_dim, c.decoder_activation_function)
        self.final_layer_norm = nn.LayerNorm(d, eps=eps)

    def __call__(self, x, pos, memory, shapes, reference):
        x = self.self_attn_layer_norm(x + self.self_attn(x, pos))
        x = self.encoder_attn_layer_norm(x + self.encoder_attn(x, pos, memory, shapes, reference))
        return self.final_layer_norm(x + self.mlp(x))


class Decoder(nn.Module):
    def __init__(self, c: LayoutConfig):
        super().__init__()
        self.layers = [DecoderLayer(c) for _ in range(c.decoder_layers)]
        self.query_pos_head = PredictionHead(4, 2 * c.d_model, c.d_model, 2)
        self.class_embed = nn.Linear(c.d_model, c.num_labels)
        self.bbox_embed = PredictionHead(c.d_model, c.d_model, 4, 3)

    def __call__(self, x, memory, shapes, reference_logits):
        """-> the last layer's hidden states and boxes (centre, size in [0, 1]); only the last
        layer's heads are read at inference, so the others' are not computed."""
        reference = mx.sigmoid(reference_logits)
        for layer in self.layers:
            x = layer(x, self.query_pos_head(reference), memory, shapes, reference)
            reference = mx.sigmoid(self.bbox_embed(x) + inverse_sigmoid(reference))
        return x, reference
