"""Typed configs read from a checkpoint's `config.json`.

GLM-V checkpoints spell the rope settings two ways: transformers 5 writes
`rope_parameters = {rope_theta, partial_rotary_factor, mrope_section}`, the published
checkpoints write `rope_theta`, `partial_rotary_factor` and `rope_scaling.mrope_section`.
Both are read here, so nothing downstream cares which one a checkpoint uses.

Three model types share the vision tower: `glm4v` (GLM-4.1V, GLM-4.6V-Flash) with a dense
text model, `glm4v_moe` (GLM-4.5V, GLM-4.6V) with a mixture-of-experts one, and `glm46v`,
whose text config names its own kind, as transformers' `Glm46VConfig` resolves it; `glmga` is
`glm46v` under another name (its processors differ, not its model). `glm_ocr` (GLM-OCR) has a
variant of the tower (`VisionConfig.variant`) and a dense text model with its own defaults.
"""

import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import Glm4vError

SUPPORTED_MODEL_TYPES = ("glm4v", "glm4v_moe", "glm46v", "glm_ocr", "glmga")

# Token ids each type's transformers config assumes when a checkpoint leaves them out.
TOKEN_DEFAULTS = {
    "glm4v": {},
    "glm4v_moe": {"image_token_id": 151363, "video_token_id": 151364},
    "glm46v": {"video_start_token_id": 151361, "video_end_token_id": 151362},
    "glmga": {"video_start_token_id": 151361, "video_end_token_id": 151362},
    "glm_ocr": {
        "image_token_id": 59280,
        "video_token_id": 59281,
        "image_start_token_id": 59256,
        "image_end_token_id": 59257,
        "video_start_token_id": 59258,
        "video_end_token_id": 59259,
    },
}


def _known_fields(cls, params: dict) -> dict:
    names = inspect.signature(cls).parameters
    return {k: v for k, v in params.items() if k in names}


@dataclass
class VisionConfig:
    depth: int = 24
    hidden_size: int = 1536
    num_heads: int = 12
    intermediate_size: int = 13696
    out_hidden_size: int = 4096
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    image_size: int = 336
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    attention_bias: bool = False
    rope_theta: float = 10000.0
    # "glm4v", or "glm_ocr": GLM-OCR's tower has no learned position table and no norm after the
    # patch convolution, RMS-norms queries and keys per head, puts `attention_bias` on the
    # output projection and the block MLP as well as on qkv, and widens the block MLP to
    # `intermediate_size` and the merger to `out_hidden_size * in_channels`.
    variant: str = "glm4v"

    @classmethod
    def from_dict(cls, params: dict, variant: str = "glm4v") -> "VisionConfig":
        params = dict(params)
        rope = params.get("rope_parameters") or {}
        params.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        params["variant"] = variant
        return cls(**_known_fields(cls, params))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ocr(self) -> bool:
        return self.variant == "glm_ocr"

    @property
    def block_mlp_width(self) -> int:
        return self.intermediate_size if self.ocr else self.out_hidden_size

    @property
    def merger_width(self) -> int:
        return self.out_hidden_size * self.in_channels if self.ocr else self.intermediate_size


@dataclass
class TextConfig:
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    mrope_section: list = field(default_factory=lambda: [8, 12, 12])
    attention_bias: bool = True
    # GLM-4.1V turns pairs (2i, 2i+1); GLM-4.5V turns (i, i + rotary_dim/2), GPT-NeoX style.
    rope_interleaved: bool = True
    # multi-token-prediction layers stored after the last decoder layer (GLM-OCR has one)
    num_nextn_predict_layers: int = 0

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        half = self.rotary_dim // 2
        if sum(self.mrope_section) != half:
            raise Glm4vError(
                f"mrope_section {self.mrope_section} must sum to half the rotary dimension "
                f"({half}); check partial_rotary_factor in config.json."
            )

    @classmethod
    def from_dict(cls, params: dict) -> "TextConfig":
        params = dict(params)
        rope = dict(params.get("rope_scaling") or {})
        rope.update(params.get("rope_parameters") or {})
        for key in ("rope_theta", "partial_rotary_factor", "mrope_section"):
            if key in rope:
                params.setdefault(key, rope[key])
        return cls(**_known_fields(cls, params))

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


@dataclass
class MoeTextConfig(TextConfig):
    """GLM-4.5V's text model (transformers' `Glm4vMoeTextConfig`, whose defaults these are)."""

    vocab_size: int = 151424
    intermediate_size: int = 10944
    num_hidden_layers: int = 46
    num_attention_heads: int = 96
    num_key_value_heads: int = 8
    max_position_embeddings: int = 65536
    rope_interleaved: bool = False
    moe_intermediate_size: int = 1408
    num_experts_per_tok: int = 8
    n_routed_experts: int = 128
    n_shared_experts: int = 1
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    # transformers then adds its load-balancing loss to the training loss (loss.py has none)
    output_router_logits: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.n_routed_experts % self.n_group:
            raise Glm4vError(
                f"n_routed_experts {self.n_routed_experts} must split evenly into n_group "
                f"{self.n_group}."
            )


@dataclass
class OcrTextConfig(TextConfig):
    """GLM-OCR's text model (transformers' `GlmOcrTextConfig`, whose defaults these are): full
    rotary unless told otherwise, and query/key/value projections without bias whatever
    `attention_bias` says (transformers builds them so)."""

    vocab_size: int = 59392
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    max_position_embeddings: int = 131072
    partial_rotary_factor: float = 1.0

    def __post_init__(self):
        self.attention_bias = False
        super().__post_init__()


# text_config.model_type -> our config class
TEXT_CONFIGS = {
    "glm4v_text": TextConfig,
    "glm4v_moe_text": MoeTextConfig,
    "glm_ocr_text": OcrTextConfig,
}


def text_config_class(model_type: str, text: dict):
    """`glm4v`, `glm4v_moe` and `glm_ocr` fix their text kind; `glm46v` (and `glmga`) read it from
    the text config."""
    kind = {"glm4v": "glm4v_text", "glm4v_moe": "glm4v_moe_text", "glm_ocr": "glm_ocr_text"}.get(
        model_type
    )
    if kind is None:
        kind = text.get("model_type", "glm4v_text")
    if kind not in TEXT_CONFIGS:
        raise Glm4vError(
            f"text_config.model_type {kind!r} is not supported; expected one of "
            f"{', '.join(TEXT_CONFIGS)}."
        )
    return TEXT_CONFIGS[kind]


@dataclass
class ModelConfig:
    text_config: TextConfig
    vision_config: VisionConfig
    model_type: str = "glm4v"
    image_token_id: int = 151343
    video_token_id: int = 151344
    image_start_token_id: int = 151339
    image_end_token_id: int = 151340
    video_start_token_id: int = 151341
    video_end_token_id: int = 151342
    eos_token_id: list = field(default_factory=list)
    pad_token_id: Optional[int] = None
    tie_word_embeddings: bool = False
    quantization: Optional[dict] = None

    @classmethod
    def from_dict(cls, params: dict) -> "ModelConfig":
        model_type = params.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise Glm4vError(
                f"model_type {model_type!r} is not supported; expected one of "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}."
            )
        text = dict(params.get("text_config") or {})
        merged: dict[str, Any] = dict(params)
        # Token ids and eos live at the top level in transformers 5 and inside text_config in
        # some published files: take the top level first, then fall back.
        for key in (
            "image_token_id",
            "video_token_id",
            "image_start_token_id",
            "image_end_token_id",
            "video_start_token_id",
            "video_end_token_id",
            "eos_token_id",
            "pad_token_id",
        ):
            if merged.get(key) is None and text.get(key) is not None:
                merged[key] = text[key]
        for key, value in TOKEN_DEFAULTS[model_type].items():
            if merged.get(key) is None:
                merged[key] = value
        eos = merged.get("eos_token_id")
        merged["eos_token_id"] = (
            [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        )
        if "tie_word_embeddings" not in params and "tie_word_embeddings" in text:
            merged["tie_word_embeddings"] = text["tie_word_embeddings"]
        merged["text_config"] = text_config_class(model_type, text).from_dict(text)
        merged["vision_config"] = VisionConfig.from_dict(
            params.get("vision_config") or {}, "glm_ocr" if model_type == "glm_ocr" else "glm4v"
        )
        return cls(**_known_fields(cls, merged))
