"""The GLM-4.1V vision tower: pixel patches -> merged image tokens in the text model's width.

Mirrors transformers' `Glm4vVisionModel`, and `GlmOcrVisionModel` where `config.ocr` (no
position table, no norm after the patch convolution, per-head query/key norms, biases on the
output projection and the block MLP, other widths). Every image or video frame is one
attention segment: patches attend to the patches of their own frame only, so frames of equal
size are batched through one `scaled_dot_product_attention` call instead of a dense
block-diagonal mask.
"""

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import VisionConfig
from .head_groups import heads_per_call
from .mlxlm import swiglu

CUBIC_A = -0.75  # torch's bicubic kernel constant, used by grid_sample


@lru_cache(maxsize=64)
def cubic_resample_matrix(out_size: int, in_size: int) -> np.ndarray:
    """[out, in] weights of torch's bicubic `grid_sample` (align_corners=False, border padding).

    Taps outside the table are clamped to its edge; their weights add up on the edge row.
    Bicubic sampling is separable, so an (H, W) resample is one matrix per axis.
    """
    src = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
    base = np.floor(src)
    t = src - base
    a = CUBIC_A
    weights = [
        ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
        ((a + 2) * t - (a + 3)) * t * t + 1,
        ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
        ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
    ]
    matrix = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    for k, w in enumerate(weights):
        cols = np.clip(base + k - 1, 0, in_size - 1).astype(np.int64)
        np.add.at(matrix, (rows, cols), w)
    return matrix.astype(np.float32)


def block_major(x: mx.array, h: int, w: int, merge: int) -> mx.array:
    """[h, w, ...] row-major patches -> the processor's order: merge blocks row-major, then
    inside."""
    rest = x.shape[2:]
    x = x.reshape(h // merge, merge, w // merge, merge, *rest)
    return x.swapaxes(1, 2).reshape(h * w, *rest)


class PatchEmbed(nn.Module):
    """Conv3d with kernel == stride over [C, T, P, P] patches, computed as one matrix product."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        k = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(
            config.in_channels, config.hidden_size, kernel_size=k, stride=k, bias=True
        )

    def __call__(self, x: mx.array) -> mx.array:
        w = self.proj.weight  # MLX layout [O, T, P, P, C]; rows of x are ordered [C, T, P, P]
        w = w.transpose(0, 4, 1, 2, 3).reshape(w.shape[0], -1)
        return mx.addmm(self.proj.bias, x.astype(w.dtype), w.T)


class VisionEmbeddings(nn.Module):
    """Learned position table, resampled bicubically to each frame's patch grid."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.side = config.image_size // config.patch_size
        self.merge = config.spatial_merge_size
        self.position_embedding = nn.Embedding(self.side**2, config.hidden_size)

    def __call__(self, x: mx.array, frames) -> mx.array:
        table = self.position_embedding.weight
        dim = table.shape[-1]
        grid = table.astype(mx.float32).reshape(self.side, self.side * dim)
        resampled = {}
        parts = []
        for h, w in frames:
            if (h, w) not in resampled:
                rows = mx.array(cubic_resample_matrix(h, self.side)) @ grid
                cols = mx.array(cubic_resample_matrix(w, self.side))
                pos = cols @ rows.reshape(h, self.side, dim)  # [h, w, dim]
                resampled[h, w] = block_major(pos, h, w, self.merge).astype(table.dtype)
            parts.append(resampled[h, w])
        return x + mx.concatenate(parts, axis=0)


def rotary_tables(frames, head_dim: int, theta: float, merge: int):
    """cos/sin [N, 1, head_dim] of the 2-D rotary: the first half of the frequencies turn with
    the row, the second with the column."""
    inv = 1.0 / theta ** (np.arange(0, head_dim // 2, 2, dtype=np.float32) / (head_dim // 2))
    pos = []
    for h, w in frames:
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        hw = np.stack([hh, ww], -1)
        pos.append(
            hw.reshape(h // merge, merge, w // merge, merge, 2).swapaxes(1, 2).reshape(-1, 2)
        )
    pos = np.concatenate(pos).astype(np.float32)
    freqs = (pos[:, :, None] * inv[None, None]).reshape(len(pos), -1)  # [N, head_dim/2]: h then w
    emb = mx.array(np.concatenate([freqs, freqs], axis=-1)[:, None])
    return mx.cos(emb), mx.sin(emb)


def rotate_half(x: mx.array) -> mx.array:
    x1, x2 = mx.split(x, 2, axis=-1)
    return mx.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    dtype = x.dtype
    x = x.astype(mx.float32)
    return (x * cos + rotate_half(x) * sin).astype(dtype)


def equal_length_runs(lengths):
    """Group consecutive segments of the same length: [(length, count), ...]."""
    runs = []
    for n in lengths:
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([n, 1])
    return runs


# Bytes of attention scores one call may hold. MLX's attention on the CPU (and on Metal for head
# sizes its fused kernel lacks) materialises [frames, heads, queries, keys] scores, quadratic in a
# frame's patches: 77 GB for a 10-megapixel image on an 8-head tower. Longer frames take their
# queries in blocks, each evaluated before the next; every query row is computed as before, so
# results do not change. Where the fused GPU kernel runs (GLM-4.1V's 128-wide heads) nothing is
# blocked: it never builds the scores.
ATTENTION_SCORE_BYTES = 1 << 28
FUSED_GPU_HEAD_SIZES = (64, 80, 128)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """`scaled_dot_product_attention` over [B, heads, L, D], queries in blocks when the scores
    are large."""
    B, H, L, _ = q.shape
    rows = max(64, ATTENTION_SCORE_BYTES // (B * H * L * 4) // 64 * 64)
    fused = mx.default_device() == mx.gpu and q.shape[-1] in FUSED_GPU_HEAD_SIZES
    if rows >= L or fused:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    parts = []
    for start in range(0, L, rows):
        parts.append(
            mx.fast.scaled_dot_product_attention(q[:, :, start : start + rows], k, v, scale=scale)
        )
        mx.eval(parts[-1])
    return mx.concatenate(parts, axis=2)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.scale = config.head_dim**-0.5
        bias = config.attention_bias
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=bias and config.ocr)
        if config.ocr:
            self.q_norm = nn.RMSNorm(config.head_dim, eps=config.rms_norm_eps)
            self.k_norm = nn.RMSNorm(config.head_dim, eps=config.rms_norm_eps)

    def __call__(self, x: mx.array, rope, segments) -> mx.array:
        return self.output(self.attend(*self.project(x, rope), segments))

    def project(self, x: mx.array, rope) -> tuple:
        """Queries, keys and values [N, heads, head_dim], queries and keys turned."""
        n = x.shape[0]
        q, k, v = [
            t.squeeze(1) for t in mx.split(self.qkv(x).reshape(n, 3, self.num_heads, -1), 3, axis=1)
        ]
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def head_groups(self, length: int) -> list:
        """(first head, count) of each call for segments of `length` patches (head_groups.py)."""
        g = heads_per_call(self.num_heads, self.num_heads, length * length)
        return [(h, g) for h in range(0, self.num_heads, g)]

    def attend(self, q, k, v, segments, heads=None) -> mx.array:
        """[N, heads, head_dim]: every segment's patches attending to each other, a few heads a call
        (`head_groups`); with `heads` = (first, count), those heads alone in one call."""
        out, start = [], 0
        for length, count in segments:
            end = start + length * count
            parts = []
            for first, g in [heads] if heads else self.head_groups(length):
                qh, kh, vh = [
                    t[start:end, first : first + g]
                    .reshape(count, length, g, -1)
                    .transpose(0, 2, 1, 3)
                    for t in (q, k, v)
                ]
                o = attention(qh, kh, vh, self.scale)
                parts.append(o.transpose(0, 2, 1, 3).reshape(end - start, g, -1))
            out.append(mx.concatenate(parts, axis=1) if len(parts) > 1 else parts[0])
            start = end
        return mx.concatenate(out, axis=0) if len(out) > 1 else out[0]

    def output(self, heads: mx.array) -> mx.array:
        return self.proj(heads.reshape(heads.shape[0], -1))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm2 = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = VisionAttention(config)
        # GLM-4.1V's block MLP is out_hidden_size wide (intermediate_size belongs to its merger)
        bias = config.attention_bias and config.ocr
        self.mlp = VisionMLP(config.hidden_size, config.block_mlp_width, bias)

    def __call__(self, x: mx.array, rope, segments) -> mx.array:
        return self.finish(x, self.attn(self.norm1(x), rope, segments))

    def finish(self, x: mx.array, attended: mx.array) -> mx.array:
        """The block after its attention: the residual add and the MLP."""
        x = x + attended
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)
        self.post_projection_norm = nn.LayerNorm(dim, eps=1e-5)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        x = nn.gelu(self.post_projection_norm(self.proj(x)))
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class VisionModel(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        if not config.ocr:
            self.post_conv_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.embeddings = VisionEmbeddings(config)
        self.blocks = [VisionBlock(config) for _ in range(config.depth)]
        self.post_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        m = config.spatial_merge_size
        self.downsample = nn.Conv2d(
            config.hidden_size, config.out_hidden_size, kernel_size=m, stride=m, bias=True
        )
        self.merger = PatchMerger(config.out_hidden_size, config.merger_width)

    def __call__(self, pixel_values, grid_thw) -> mx.array:
        """Patches [N, C*T*P*P] of frames with grids (t, h, w) -> merged tokens [N/4,
        out_hidden_size].

        Each row's t frames are separate segments (transformers' `get_video_features` passes
        videos frame by frame; images have t = 1).
        """
        state = self.begin(pixel_values, grid_thw)
        self.run_blocks(state, 0, len(self.blocks))
        return self.finish(state)

    def begin(self, pixel_values, grid_thw) -> "TowerState":
        """The tower's input, before its blocks: `run_blocks` then `finish` continue it, so a
        caller may spread the blocks over time and get exactly what one call gives."""
        cfg = self.config
        frames = [
            (int(h), int(w))
            for t, h, w in np.asarray(grid_thw).reshape(-1, 3)
            for _ in range(int(t))
        ]
        x = self.patch_embed(mx.array(pixel_values))
        if not cfg.ocr:
            x = self.embeddings(self.post_conv_layernorm(x), frames)
        rope = rotary_tables(frames, cfg.head_dim, cfg.rope_theta, cfg.spatial_merge_size)
        return TowerState(x, rope, equal_length_runs([h * w for h, w in frames]))

    def run_blocks(self, state: "TowerState", start: int, end: int):
        for block in self.blocks[start:end]:
            state.x = block(state.x, state.rope, state.segments)
            mx.eval(state.x)  # block by block: as one graph, the activations peak a third higher

    def run_heads(self, state: "TowerState", index: int, first: int, count: int) -> bool:
        """Attention heads [first, first + count) of block `index` (its projections first; the rest
        of the block after its last heads): the block in several calls, the same numbers as one.
        Whether the block is complete."""
        block = self.blocks[index]
        if state.attention is None:
            state.attention = (*block.attn.project(block.norm1(state.x), state.rope), [])
        q, k, v, parts = state.attention
        parts.append(block.attn.attend(q, k, v, state.segments, (first, count)))
        if first + count < block.attn.num_heads:
            mx.eval(q, k, v, parts[-1])
            return False
        heads = mx.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        state.x = block.finish(state.x, block.attn.output(heads))
        state.attention = None
        mx.eval(state.x)
        return True

    def finish(self, state: "TowerState") -> mx.array:
        x = self.post_layernorm(state.x)
        w = self.downsample.weight  # [O, m, m, C]: four consecutive patches form one merge block
        x = mx.addmm(self.downsample.bias, x.reshape(-1, w[0].size), w.reshape(w.shape[0], -1).T)
        return self.merger(x)


@dataclass
class TowerState:
    """Activations of frames part-way through the tower's blocks."""

    x: mx.array
    rope: tuple
    segments: list
    # (queries, keys, values, head outputs so far) of a block part-way
    attention: Optional[tuple] = None
