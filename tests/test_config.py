"""Config reading: both rope spellings, the text model each model_type builds, per-type token
defaults."""

import json

import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_glm4v.errors import Glm4vError
from mlx_glm4v.models.config import ModelConfig, MoeTextConfig, OcrTextConfig, TextConfig
from mlx_glm4v.models.model import Model


def published_spelling(config: dict) -> dict:
    """A transformers-5 config.json rewritten the way the hub files spell it: rope settings as
    text_config.rope_theta / partial_rotary_factor / rope_scaling.mrope_section."""
    text = dict(config["text_config"])
    rope = text.pop("rope_parameters")
    text.update(
        rope_theta=rope["rope_theta"],
        partial_rotary_factor=rope["partial_rotary_factor"],
        rope_scaling={"type": "default", "mrope_section": rope["mrope_section"]},
    )
    return {**config, "text_config": text}


@pytest.mark.parametrize("family", ["glm4v", "glm4v_moe"])
def test_published_spelling_builds_the_same_config(request, family):
    path = request.getfixturevalue(f"{family}_checkpoint")[0]
    v5 = json.loads((path / "config.json").read_text())
    assert "rope_parameters" in v5["text_config"] and "image_token_id" in v5
    ours = ModelConfig.from_dict(published_spelling(v5))
    assert ours == ModelConfig.from_dict(v5)
    text = ours.text_config
    assert text.rope_theta == 10000.0 and text.partial_rotary_factor == 0.5
    assert text.rope_interleaved == (family == "glm4v")


def test_text_model_kind_follows_transformers():
    """glm4v and glm4v_moe fix their text model; glm46v reads text_config.model_type (default
    glm4v_text)."""
    rope = {"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "mrope_section": [8, 12, 12]}
    kinds = {
        ("glm4v", None): TextConfig,
        ("glm4v_moe", None): MoeTextConfig,
        ("glm46v", None): TextConfig,
        ("glm46v", "glm4v_text"): TextConfig,
        ("glm46v", "glm4v_moe_text"): MoeTextConfig,
        ("glmga", "glm4v_text"): TextConfig,
        ("glmga", "glm4v_moe_text"): MoeTextConfig,
        ("glm_ocr", None): OcrTextConfig,
    }
    for (model_type, text_type), kind in kinds.items():
        text = {
            "head_dim": 64 if model_type == "glm_ocr" else 128,
            "rope_parameters": rope
            if model_type != "glm_ocr"
            else {**rope, "partial_rotary_factor": 1.0},
            **({"model_type": text_type} if text_type else {}),
        }
        assert (
            type(ModelConfig.from_dict({"model_type": model_type, "text_config": text}).text_config)
            is kind
        )
    with pytest.raises(Glm4vError, match="text_config.model_type 'llama' is not supported"):
        ModelConfig.from_dict({"model_type": "glm46v", "text_config": {"model_type": "llama"}})


def test_token_defaults_per_model_type():
    """Ids a config leaves out take the defaults of that type's transformers config."""

    def ids(model_type):
        # GLM-OCR turns the whole head: 64 wide for the default sections
        head_dim = 64 if model_type == "glm_ocr" else 128
        return ModelConfig.from_dict(
            {"model_type": model_type, "text_config": {"head_dim": head_dim}}
        )

    assert (ids("glm4v").image_token_id, ids("glm4v").video_start_token_id) == (151343, 151341)
    assert (ids("glm4v_moe").image_token_id, ids("glm4v_moe").video_token_id) == (151363, 151364)
    assert (ids("glm46v").video_start_token_id, ids("glm46v").video_end_token_id) == (
        151361,
        151362,
    )
    assert ids("glmga").video_start_token_id == 151361
    ocr = ids("glm_ocr")
    assert (ocr.image_token_id, ocr.video_token_id, ocr.image_start_token_id) == (
        59280,
        59281,
        59256,
    )
    assert (ocr.video_start_token_id, ocr.video_end_token_id) == (59258, 59259)


def test_unsupported_model_type_lists_every_family():
    with pytest.raises(Glm4vError) as info:
        ModelConfig.from_dict({"model_type": "llava", "text_config": {}})
    assert str(info.value) == (
        "model_type 'llava' is not supported; expected one of glm4v, glm4v_moe, glm46v, "
        "glm_ocr, glmga."
    )


def test_glm_ocr_config_gives_its_shapes():
    """GLM-OCR's published sizes: head_dim 128 against 1536/16, full rotary over [16, 24, 24],
    q/k/v without bias whatever attention_bias says; the tower with per-head q/k norms, biases
    on its output projection and MLP, no position table, a merger 3 x 1536 wide."""
    config = {
        "model_type": "glm_ocr",
        "text_config": {
            "model_type": "glm_ocr_text",
            "vocab_size": 59392,
            "hidden_size": 1536,
            "intermediate_size": 4608,
            "num_hidden_layers": 16,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "attention_bias": True,
            "num_nextn_predict_layers": 1,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000,
                "partial_rotary_factor": 1.0,
                "mrope_section": [16, 24, 24],
            },
            "eos_token_id": [59246, 59253],
        },
        "vision_config": {
            "model_type": "glm_ocr_vision",
            "depth": 24,
            "hidden_size": 1024,
            "num_heads": 16,
            "intermediate_size": 4096,
            "out_hidden_size": 1536,
            "attention_bias": True,
        },
    }
    cfg = ModelConfig.from_dict(config)
    assert cfg.text_config.rotary_dim == 128 and cfg.eos_token_id == [59246, 59253]
    shapes = {k: v.shape for k, v in tree_flatten(Model(cfg).parameters())}
    assert shapes["language_model.layers.0.self_attn.q_proj.weight"] == (2048, 1536)
    assert "language_model.layers.0.self_attn.q_proj.bias" not in shapes
    assert shapes["visual.blocks.0.attn.q_norm.weight"] == (64,)
    assert shapes["visual.blocks.0.attn.proj.bias"] == (1024,)
    assert shapes["visual.blocks.0.mlp.gate_proj.bias"] == (4096,)
    assert shapes["visual.merger.gate_proj.weight"] == (4608, 1536)
    assert not any("embeddings" in k or "post_conv" in k for k in shapes)


def test_glm45v_config_gives_the_published_tensors():
    """GLM-4.5V's config.json (as published, third-party copies) builds the 18,106 tensors of its
    weight dump once experts are counted one by one, with 96 heads of 128 and 128 experts."""
    config = {
        "model_type": "glm4v_moe",
        "image_token_id": 151363,
        "video_token_id": 151364,
        "text_config": {
            "vocab_size": 151552,
            "hidden_size": 4096,
            "intermediate_size": 10944,
            "num_hidden_layers": 46,
            "num_attention_heads": 96,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "attention_bias": True,
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "rope_scaling": {"type": "default", "mrope_section": [8, 12, 12]},
            "moe_intermediate_size": 1408,
            "n_routed_experts": 128,
            "num_experts_per_tok": 8,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "routed_scaling_factor": 1.0,
            "norm_topk_prob": True,
            "max_position_embeddings": 65536,
            "eos_token_id": [151329, 151336, 151338],
            "pad_token_id": 151329,
        },
        "vision_config": {
            "depth": 24,
            "hidden_size": 1536,
            "num_heads": 12,
            "intermediate_size": 10944,
        },
    }
    cfg = ModelConfig.from_dict(config)
    assert cfg.eos_token_id == [151329, 151336, 151338] and cfg.image_token_id == 151363
    # lazy: nothing is allocated
    shapes = {k: v.shape for k, v in tree_flatten(Model(cfg).parameters())}
    stacked = [k for k in shapes if ".switch_mlp." in k]
    assert len(shapes) + len(stacked) * 127 == 18106
    assert shapes["language_model.layers.0.self_attn.q_proj.weight"] == (12288, 4096)
    assert shapes["language_model.layers.0.mlp.gate_proj.weight"] == (10944, 4096)
    assert shapes["language_model.layers.45.mlp.switch_mlp.down_proj.weight"] == (128, 4096, 1408)
    assert shapes["language_model.layers.45.mlp.shared_experts.up_proj.weight"] == (1408, 4096)
    assert shapes["language_model.layers.45.mlp.gate.e_score_correction_bias"] == (128,)
    total = sum(int(np.prod(s)) for s in shapes.values())
    assert 107.5e9 < total < 108e9
