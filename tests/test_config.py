"""Config reading: both rope spellings, the text model each model_type builds, per-type token
defaults."""

import json

import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_glm4v.errors import Glm4vError
from mlx_glm4v.models.config import ModelConfig, MoeTextConfig, TextConfig
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
    }
    for (model_type, text_type), kind in kinds.items():
        text = {
            "head_dim": 128,
            "rope_parameters": rope,
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
        return ModelConfig.from_dict({"model_type": model_type, "text_config": {"head_dim": 128}})

    assert (ids("glm4v").image_token_id, ids("glm4v").video_start_token_id) == (151343, 151341)
    assert (ids("glm4v_moe").image_token_id, ids("glm4v_moe").video_token_id) == (151363, 151364)
    assert (ids("glm46v").video_start_token_id, ids("glm46v").video_end_token_id) == (
        151361,
        151362,
    )


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
