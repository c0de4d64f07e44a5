"""PP-DocLayoutV3's settings from its `config.json` (transformers' `PPDocLayoutV3Config` and the
HGNetV2 backbone's `HGNetV2Config`), with transformers' defaults for absent fields."""

from dataclasses import dataclass, field, fields


def _known(cls, d: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class BackboneConfig:
    """HGNetV2: a stem, then stages of blocks whose layers' outputs are concatenated."""

    stem_channels: list = field(default_factory=lambda: [3, 32, 48])
    stem_strides: list = field(default_factory=lambda: [2, 1, 1, 2, 1])
    stage_in_channels: list = field(default_factory=lambda: [48, 128, 512, 1024])
    stage_mid_channels: list = field(default_factory=lambda: [48, 96, 192, 384])
    stage_out_channels: list = field(default_factory=lambda: [128, 512, 1024, 2048])
    stage_num_blocks: list = field(default_factory=lambda: [1, 1, 3, 1])
    stage_downsample: list = field(default_factory=lambda: [False, True, True, True])
    stage_downsample_strides: list = field(default_factory=lambda: [2, 2, 2, 2])
    stage_light_block: list = field(default_factory=lambda: [False, False, True, True])
    stage_kernel_size: list = field(default_factory=lambda: [3, 3, 5, 5])
    stage_numb_of_layers: list = field(default_factory=lambda: [6, 6, 6, 6])
    use_learnable_affine_block: bool = False
    hidden_act: str = "relu"
    num_channels: int = 3
    out_features: list = field(default_factory=lambda: ["stage1", "stage2", "stage3", "stage4"])

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneConfig":
        return cls(**_known(cls, d))


@dataclass
class LayoutConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    id2label: dict = field(default_factory=dict)
    layer_norm_eps: float = 1e-5
    batch_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    encoder_hidden_dim: int = 256
    encoder_in_channels: list = field(default_factory=lambda: [512, 1024, 2048])
    feat_strides: list = field(default_factory=lambda: [8, 16, 32])
    encoder_layers: int = 1
    encoder_ffn_dim: int = 1024
    encoder_attention_heads: int = 8
    encode_proj_layers: list = field(default_factory=lambda: [2])
    positional_encoding_temperature: int = 10000
    encoder_activation_function: str = "gelu"
    activation_function: str = "silu"
    eval_size: list | None = None
    normalize_before: bool = False
    hidden_expansion: float = 1.0
    mask_feature_channels: list = field(default_factory=lambda: [64, 64])
    x4_feat_dim: int = 128
    d_model: int = 256
    num_prototypes: int = 32
    mask_enhanced: bool = True
    num_queries: int = 300
    decoder_in_channels: list = field(default_factory=lambda: [256, 256, 256])
    decoder_ffn_dim: int = 1024
    num_feature_levels: int = 3
    decoder_n_points: int = 4
    decoder_layers: int = 6
    decoder_attention_heads: int = 8
    decoder_activation_function: str = "relu"
    learn_initial_query: bool = False
    anchor_image_size: list | None = None
    global_pointer_head_size: int = 64

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @classmethod
    def from_dict(cls, d: dict) -> "LayoutConfig":
        kw = _known(cls, d)
        kw["backbone"] = BackboneConfig.from_dict(d.get("backbone_config") or {})
        kw["id2label"] = {int(k): v for k, v in (d.get("id2label") or {}).items()}
        return cls(**kw)
