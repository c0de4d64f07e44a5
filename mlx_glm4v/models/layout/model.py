"""PP-DocLayoutV3 (transformers' `PPDocLayoutV3ForObjectDetection`) in MLX: pixels -> per-query
class logits, boxes, mask logits and pairwise reading-order logits.

Channels-last throughout; the checkpoint's names are transformers' (`sanitize` transposes the
convolutions and applies transformers' own renames for this model type)."""

import re
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .backbone import BatchNorm, ConvEncoder
from .config import LayoutConfig
from .decoder import Decoder, GlobalPointer, PredictionHead, inverse_sigmoid
from .encoder import HybridEncoder

FLOAT32_MAX = 3.4028234663852886e38

# transformers' `from_pretrained` renames for rt_detr-derived checkpoints (conversion_mapping.py)
RENAMES = [
    (r"out_proj", "o_proj"),
    (r"layers\.(\d+)\.fc1", r"layers.\1.mlp.fc1"),
    (r"layers\.(\d+)\.fc2", r"layers.\1.mlp.fc2"),
    (r"encoder\.encoder\.(\d+)\.layers", r"encoder.aifi.\1.layers"),
]
# heads transformers ties to the encoder's when `tie_word_embeddings` (its default)
TIED = {
    "model.decoder.class_embed": "model.enc_score_head",
    "model.decoder.bbox_embed": "model.enc_bbox_head",
}


@dataclass
class LayoutOutput:
    logits: mx.array  # (B, Q, labels)
    pred_boxes: mx.array  # (B, Q, 4): centre x, centre y, width, height in [0, 1]
    order_logits: mx.array  # (B, Q, Q): query i is read before query j
    out_masks: mx.array  # (B, Q, H/4, W/4) mask logits


def projection(cin: int, cout: int, k: int = 1, stride: int = 1, eps: float = 1e-5):
    return [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, bias=False), BatchNorm(cout, eps)]


def run(layers, x):
    for layer in layers:
        x = layer(x)
    return x


def make_anchors(shapes: list, grid_size: float = 0.05):
    """Anchor logits per position of every level (the invalid ones near the border at float32's
    largest value) and which are valid."""
    anchors = []
    for level, (h, w) in enumerate(shapes):
        gy, gx = mx.meshgrid(
            mx.arange(h, dtype=mx.float32), mx.arange(w, dtype=mx.float32), indexing="ij"
        )
        xy = mx.stack([(gx + 0.5) / w, (gy + 0.5) / h], axis=-1)
        wh = mx.full(xy.shape, grid_size * 2.0**level, dtype=mx.float32)
        anchors.append(mx.concatenate([xy, wh], axis=-1).reshape(1, h * w, 4))
    anchors = mx.concatenate(anchors, axis=1)
    valid = mx.all((anchors > 1e-2) & (anchors < 1 - 1e-2), axis=-1, keepdims=True)
    logits = mx.log(anchors / (1 - anchors))
    return mx.where(valid, logits, mx.array(FLOAT32_MAX, mx.float32)), valid


def mask_boxes(mask):
    """(B, Q, h, w) booleans -> the box around each mask (centre, size), normalised; zeros for an
    empty mask."""
    h, w = mask.shape[-2:]
    m = mask.astype(mx.float32)
    xs = mx.arange(w, dtype=mx.float32)[None, None, None, :]
    ys = mx.arange(h, dtype=mx.float32)[None, None, :, None]
    flat = (mask.shape[0], mask.shape[1], -1)
    x_max = mx.max((xs * m).reshape(flat), axis=-1) + 1
    x_min = mx.min(mx.where(mask, xs, FLOAT32_MAX).reshape(flat), axis=-1)
    y_max = mx.max((ys * m).reshape(flat), axis=-1) + 1
    y_min = mx.min(mx.where(mask, ys, FLOAT32_MAX).reshape(flat), axis=-1)
    box = mx.stack([x_min, y_min, x_max, y_max], axis=-1)
    box = box * mx.any(mask.reshape(flat), axis=-1, keepdims=True)
    box = box / mx.array([w, h, w, h], dtype=mx.float32)
    return mx.stack(
        [
            (box[..., 0] + box[..., 2]) / 2,
            (box[..., 1] + box[..., 3]) / 2,
            box[..., 2] - box[..., 0],
            box[..., 3] - box[..., 1],
        ],
        axis=-1,
    )


class Model(nn.Module):
    def __init__(self, c: LayoutConfig):
        super().__init__()
        self.config = c
        d, bb = c.d_model, c.backbone
        self.backbone = ConvEncoder(bb)
        channels = [
            bb.stage_out_channels[int(n.removeprefix("stage")) - 1] for n in bb.out_features
        ]
        self.encoder_input_proj = [projection(ch, c.encoder_hidden_dim) for ch in channels[1:]]
        self.encoder = HybridEncoder(c)
        self.enc_output = [nn.Linear(d, d), nn.LayerNorm(d, eps=c.layer_norm_eps)]
        self.enc_score_head = nn.Linear(d, c.num_labels)
        self.enc_bbox_head = PredictionHead(d, d, 4, 3)
        eps = c.batch_norm_eps
        self.decoder_input_proj = [projection(ch, d, eps=eps) for ch in c.decoder_in_channels]
        ch = c.decoder_in_channels[-1]
        for _ in range(c.num_feature_levels - len(c.decoder_in_channels)):
            self.decoder_input_proj.append(projection(ch, d, 3, 2, eps))
            ch = d
        if c.learn_initial_query:
            self.weight_embedding = nn.Embedding(c.num_queries, d)
        self.decoder = Decoder(c)
        self.decoder_order_head = [nn.Linear(d, d) for _ in range(c.decoder_layers)]
        self.decoder_global_pointer = GlobalPointer(c)
        self.decoder_norm = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.mask_query_head = PredictionHead(d, d, c.num_prototypes, 3)

    def masks(self, queries, prototypes):
        """Mask logits: each query's embedding against the prototypes at every position."""
        b, h, w, p = prototypes.shape
        embed = self.mask_query_head(self.decoder_norm(queries))
        return (embed @ prototypes.reshape(b, h * w, p).transpose(0, 2, 1)).reshape(b, -1, h, w)

    def __call__(self, pixels) -> LayoutOutput:
        c = self.config
        features = self.backbone(pixels)
        x4 = features.pop(0)
        projected = [run(proj, f) for proj, f in zip(self.encoder_input_proj, features)]
        pyramid, prototypes = self.encoder(projected, x4)

        sources = [run(proj, f) for proj, f in zip(self.decoder_input_proj, pyramid)]
        for proj in self.decoder_input_proj[len(sources) :]:
            sources.append(run(proj, pyramid[-1]))
        shapes = [(s.shape[1], s.shape[2]) for s in sources]
        b = pixels.shape[0]
        memory = mx.concatenate([s.reshape(b, -1, s.shape[-1]) for s in sources], axis=1)

        if c.anchor_image_size:
            size = c.anchor_image_size
            anchors, valid = make_anchors(
                [(int(size[0] / s), int(size[1] / s)) for s in c.feat_strides]
            )
        else:
            anchors, valid = make_anchors(shapes)
        output_memory = run(self.enc_output, valid.astype(memory.dtype) * memory)
        enc_class = self.enc_score_head(output_memory)
        enc_coords = self.enc_bbox_head(output_memory) + anchors
        top = mx.argsort(-mx.max(enc_class, axis=-1), axis=-1)[:, : c.num_queries]
        reference = mx.take_along_axis(enc_coords, top[..., None], axis=1)
        target = mx.take_along_axis(output_memory, top[..., None], axis=1)
        if c.mask_enhanced:
            reference = inverse_sigmoid(mask_boxes(self.masks(target, prototypes) > 0))
        if c.learn_initial_query:
            target = mx.broadcast_to(self.weight_embedding.weight[None], (b,) + target.shape[1:])

        hidden, boxes = self.decoder(target, memory, shapes, reference)
        out = self.decoder_norm(hidden)
        order = self.decoder_global_pointer(self.decoder_order_head[-1](out[:, -c.num_queries :]))
        return LayoutOutput(
            self.decoder.class_embed(out), boxes, order, self.masks(hidden, prototypes)
        )


class LayoutDetector(nn.Module):
    """The detector as transformers names it (`model.`...)."""

    def __init__(self, config: LayoutConfig):
        super().__init__()
        self.config = config
        self.model = Model(config)

    def __call__(self, pixels) -> LayoutOutput:
        """pixels: (B, H, W, 3) float32, channels-last."""
        return self.model(pixels)

    def sanitize(self, weights: dict) -> dict:
        out = {}
        for name, value in weights.items():
            if name.endswith("num_batches_tracked") or "denoising_class_embed" in name:
                continue
            for pattern, repl in RENAMES:
                name = re.sub(pattern, repl, name)
            if value.ndim == 4:
                value = value.transpose(0, 2, 3, 1)
            out[name] = value
        if self.config.tie_word_embeddings:
            for target, source in TIED.items():
                for name in [n for n in out if n.startswith(source + ".")]:
                    out[target + name[len(source) :]] = out[name]
        return out
