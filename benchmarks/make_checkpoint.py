"""Random GLM-4.1V checkpoints for benchmarking, written with numpy alone (no torch, no
transformers).

The layout is the published one (`zai-org/GLM-4.1V-9B-Thinking`): safetensors with transformers'
names (`model.visual.*`, `model.language_model.*`, `lm_head.weight`) and channels-first
convolutions, config.json with the rope settings under `rope_scaling`/`rope_theta`, a
generation_config.json, a fast tokenizer (tokenizer.json + tokenizer_config.json), the chat
template as chat_template.jinja, and the processor settings split into preprocessor_config.json
and video_preprocessor_config.json. Both mlx-glm4v and mlx-vlm load it as they would the real
model.

Sizes (`SHAPES`): "bench" is GLM-4.1V's shape scaled down to about 120M parameters (430M with
`--vocab 151552`; text hidden 1024 x 8 layers, vision hidden 512 x 8 blocks), "tiny" is a few
hundred thousand for CI.
Weights are normal(0, 0.02), norm weights about 1, biases small: a trained model's scale, so that
the arithmetic (and its cost) is what a real checkpoint's is.

The tokenizer is a small byte-level BPE (`bpe_vocab` tokens plus GLM's special tokens); by
default the embedding and lm_head have as many rows as it has tokens. `--vocab 151552` gives them
the published number of rows instead (GLM-4.1V's and GLM-4.6V's config `vocab_size`): no token
looks up the embedding's rows past the tokenizer's, but the head scores every row, so a training
step's head and its float32 logits (rows x tokens x 4 bytes) are a real checkpoint's size. The
special tokens keep the tokenizer's ids either way; config.json names them under both tools'
keys.

The end-of-sequence tokens' rows of lm_head are zero, so their logit is 0 while the others spread
around 0 in both signs: greedy decoding never picks them and both tools generate exactly the
number of tokens asked for (mlx-vlm has no option to ignore end-of-sequence tokens).

    python benchmarks/make_checkpoint.py OUT_DIR [--size bench|tiny] [--seed 0] [--vocab 151552]
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# The test fixtures' re-typing of GLM's special tokens and published chat template (torch-free).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import CHAT_TEMPLATE, SPECIAL_TOKENS  # noqa: E402

# transformers' defaults for GLM-4.1V (the model card's processor files): CLIP's mean and std.
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

SHAPES = {
    "bench": dict(
        text=dict(
            hidden_size=1024,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=2,
            intermediate_size=2752,
        ),
        vision=dict(
            hidden_size=512, depth=8, num_heads=8, out_hidden_size=1024, intermediate_size=2752
        ),
        bpe_vocab=320,
    ),
    "tiny": dict(
        text=dict(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=256,
        ),
        vision=dict(
            hidden_size=64, depth=2, num_heads=2, out_hidden_size=128, intermediate_size=256
        ),
        bpe_vocab=320,
    ),
}

EOS_TOKENS = ["<|endoftext|>", "<|user|>", "<|observation|>"]

_CORPUS = [
    "Describe this image in detail. What is shown in the picture?",
    "What is different between these images? Compare them.",
    "The quick brown fox jumps over the lazy dog. 0123456789 seconds",
    "A cat sits on a red sofa next to a window; the sun is shining.",
    "What happens in this video? Count the frames and tell me the time.",
    "Hello! How are you today? I am fine, thank you. Let's think step by step.",
    "What colour is it? Now tell me more about the left side.",
    "The answer is 42. Here is the box: [[100, 200, 300, 400]].",
]


def build_tokenizer(path: Path, vocab_size: int = 320) -> dict:
    """Train a byte-level BPE carrying GLM's special tokens; write tokenizer.json and
    tokenizer_config.json as transformers' PreTrainedTokenizerFast saves them. Returns {token: id}
    for the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.save(str(path / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = {
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t, i in ids.items()
        },
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "model_max_length": 65536,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return {"vocab_size": tok.get_vocab_size(), **ids}


# GLM-4.1V's and GLM-4.5V/4.6V's text_config vocab_size (151,329 BPE tokens, the special tokens,
# padding to a multiple of 64)
PUBLISHED_VOCAB = 151552


def configs(shape: dict, ids: dict, vocab: int | None = None) -> dict:
    """config.json in the published layout (transformers 4.5x wrote it; 5.x still reads it).
    `vocab`: the embedding's and lm_head's rows (default: the tokenizer's size)."""
    if vocab is not None and vocab < ids["vocab_size"]:
        raise ValueError(f"vocab {vocab} is smaller than the tokenizer's {ids['vocab_size']}")
    text, vision = shape["text"], shape["vision"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    half = head_dim // 4  # rotary dimension is half the head, M-RoPE splits its half 1/4, 3/8, 3/8
    mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    eos = [ids[t] for t in EOS_TOKENS]
    tokens = dict(
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"],
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
    )
    return {
        "architectures": ["Glm4vForConditionalGeneration"],
        "model_type": "glm4v",
        **tokens,
        # mlx-vlm reads these names (its defaults are the real vocabulary's ids, 151339/151340),
        # not image_start_token_id: without them it finds no image in a prompt of this vocabulary
        # and gives image tokens 1-D positions
        "vision_start_token_id": tokens["image_start_token_id"],
        "vision_end_token_id": tokens["image_end_token_id"],
        "image_token_index": tokens["image_token_id"],
        "video_token_index": tokens["video_token_id"],
        "text_config": {
            "model_type": "glm4v_text",
            "vocab_size": vocab or ids["vocab_size"],
            **text,
            "head_dim": head_dim,
            "attention_bias": True,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "max_position_embeddings": 65536,
            "partial_rotary_factor": 0.5,
            "rms_norm_eps": 1e-05,
            "rope_scaling": {"type": "default", "mrope_section": mrope},
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "use_cache": True,
            "eos_token_id": eos,
            "pad_token_id": ids["<|endoftext|>"],
            "image_token_id": tokens["image_token_id"],
            "image_start_token_id": tokens["image_start_token_id"],
            "image_end_token_id": tokens["image_end_token_id"],
            "torch_dtype": "float32",
        },
        "vision_config": {
            "model_type": "glm4v",
            **vision,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "image_size": 336,
            "in_channels": 3,
            "initializer_range": 0.02,
            "patch_size": 14,
            "rms_norm_eps": 1e-05,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        "torch_dtype": "float32",
        "tie_word_embeddings": False,
        "transformers_version": "4.53.0",
    }


def tensor_shapes(config: dict) -> dict:
    """Every tensor of transformers' Glm4vForConditionalGeneration state dict with its shape."""
    t, v = config["text_config"], config["vision_config"]
    H, FF, V, hd = t["hidden_size"], t["intermediate_size"], t["vocab_size"], t["head_dim"]
    q, kv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    vh, vo, vi, p = v["hidden_size"], v["out_hidden_size"], v["intermediate_size"], v["patch_size"]
    shapes = {
        "model.visual.embeddings.position_embedding.weight": ((v["image_size"] // p) ** 2, vh),
        "model.visual.patch_embed.proj.weight": (
            vh,
            v["in_channels"],
            v["temporal_patch_size"],
            p,
            p,
        ),
        "model.visual.patch_embed.proj.bias": (vh,),
        "model.visual.post_conv_layernorm.weight": (vh,),
        "model.visual.post_layernorm.weight": (vh,),
        "model.visual.downsample.weight": (
            vo,
            vh,
            v["spatial_merge_size"],
            v["spatial_merge_size"],
        ),
        "model.visual.downsample.bias": (vo,),
        "model.visual.merger.proj.weight": (vo, vo),
        "model.visual.merger.post_projection_norm.weight": (vo,),
        "model.visual.merger.post_projection_norm.bias": (vo,),
        "model.visual.merger.gate_proj.weight": (vi, vo),
        "model.visual.merger.up_proj.weight": (vi, vo),
        "model.visual.merger.down_proj.weight": (vo, vi),
        "model.language_model.embed_tokens.weight": (V, H),
        "model.language_model.norm.weight": (H,),
        "lm_head.weight": (V, H),
    }
    for i in range(v["depth"]):
        b = f"model.visual.blocks.{i}."
        shapes.update(
            {
                b + "norm1.weight": (vh,),
                b + "norm2.weight": (vh,),
                b + "attn.qkv.weight": (3 * vh, vh),
                b + "attn.proj.weight": (vh, vh),
                # the blocks' MLP is out_hidden_size wide; intermediate_size is the merger's
                b + "mlp.gate_proj.weight": (vo, vh),
                b + "mlp.up_proj.weight": (vo, vh),
                b + "mlp.down_proj.weight": (vh, vo),
            }
        )
    for i in range(t["num_hidden_layers"]):
        b = f"model.language_model.layers.{i}."
        shapes.update(
            {
                b + "self_attn.q_proj.weight": (q, H),
                b + "self_attn.q_proj.bias": (q,),
                b + "self_attn.k_proj.weight": (kv, H),
                b + "self_attn.k_proj.bias": (kv,),
                b + "self_attn.v_proj.weight": (kv, H),
                b + "self_attn.v_proj.bias": (kv,),
                b + "self_attn.o_proj.weight": (H, q),
                b + "mlp.gate_up_proj.weight": (2 * FF, H),
                b + "mlp.down_proj.weight": (H, FF),
                b + "input_layernorm.weight": (H,),
                b + "post_attention_layernorm.weight": (H,),
                b + "post_self_attn_layernorm.weight": (H,),
                b + "post_mlp_layernorm.weight": (H,),
            }
        )
    return shapes


def random_weights(
    config: dict, eos_ids, seed: int = 0, std: float = 0.02, text_std: float = 0.02
) -> dict:
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in tensor_shapes(config).items():
        if "norm" in name and name.endswith(".weight"):
            w = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            scale = text_std if name.startswith(("model.language_model.", "lm_head")) else std
            w = scale * rng.standard_normal(shape, dtype=np.float32)
        weights[name] = w
    weights["lm_head.weight"][list(eos_ids)] = 0.0
    return weights


def processor_files(path: Path):
    common = dict(
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        do_convert_rgb=True,
        do_resize=True,
        resample=3,
        processor_class="Glm4vProcessor",
    )
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                **common,
                "size": {"shortest_edge": 12544, "longest_edge": 9633792},
                "image_processor_type": "Glm4vImageProcessor",
            },
            indent=2,
        )
    )
    (path / "video_preprocessor_config.json").write_text(
        json.dumps(
            {
                **common,
                "size": {"shortest_edge": 12544, "longest_edge": 47040000},
                "fps": 2,
                "max_duration": 300,
                "do_sample_frames": True,
                "video_processor_type": "Glm4vVideoProcessor",
            },
            indent=2,
        )
    )


def build(
    path, size: str = "bench", seed: int = 0, text_std: float = 0.02, vocab: int | None = None
) -> Path:
    """Write a random checkpoint of `size` (see SHAPES) to `path`, its embedding and lm_head
    `vocab` rows (default: the tokenizer's size); returns the path."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[size]
    ids = build_tokenizer(path, shape["bpe_vocab"])
    config = configs(shape, ids, vocab)
    eos = config["text_config"]["eos_token_id"]
    weights = random_weights(config, eos, seed, text_std=text_std)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(
        json.dumps(
            {
                "do_sample": False,
                "eos_token_id": eos,
                "pad_token_id": ids["<|endoftext|>"],
                "transformers_version": "4.53.0",
            },
            indent=2,
        )
    )
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    processor_files(path)
    return path


def parameter_count(path) -> int:
    from safetensors import safe_open

    with safe_open(str(Path(path) / "model.safetensors"), "np") as f:
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--size", choices=sorted(SHAPES), default="bench")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text-std", type=float, default=0.02)
    ap.add_argument(
        "--vocab",
        type=int,
        help=f"Rows of the embedding and lm_head (default: the tokenizer's size; "
        f"{PUBLISHED_VOCAB} is the published checkpoints').",
    )
    args = ap.parse_args()
    path = build(args.out, args.size, args.seed, args.text_std, args.vocab)
    print(f"{path}: {parameter_count(path) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
