"""Tiny random GLM-V checkpoints, built with transformers itself, for parity tests.

Nothing here is downloaded: the tokenizer is trained on the spot with `tokenizers` and
carries GLM's special tokens; the chat template renders the same strings as the published
GLM-4.1V template; the weights are transformers' random init, perturbed so that no norm is
exactly one and no bias exactly zero.
"""

import json
from pathlib import Path

# The published GLM-4.1V chat template, re-typed: the tests must not read files outside the repo.
CHAT_TEMPLATE = """[gMASK]<sop>
{%- for msg in messages %}
    {%- if msg.role == 'system' %}
<|system|>
{{ msg.content }}
    {%- elif msg.role == 'user' %}
<|user|>{{ '\\n' }}

        {%- if msg.content is string %}
{{ msg.content }}
        {%- else %}
            {%- for item in msg.content %}
                {%- if item.type == 'video' or 'video' in item %}
<|begin_of_video|><|video|><|end_of_video|>
                {%- elif item.type == 'image' or 'image' in item %}
<|begin_of_image|><|image|><|end_of_image|>
                {%- elif item.type == 'text' %}
{{ item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
    {%- elif msg.role == 'assistant' %}
        {%- if msg.metadata %}
<|assistant|>{{ msg.metadata }}
{{ msg.content }}
        {%- else %}
<|assistant|>
{{ msg.content }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{% if add_generation_prompt %}<|assistant|>
{% endif %}"""

# GLM-4's special tokens in their published order (151329 onwards in the real vocabulary).
SPECIAL_TOKENS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    "<|image|>", "<|video|>", "<|begin_of_audio|>", "<|end_of_audio|>",
    "<|begin_of_transcription|>", "<|end_of_transcription|>",
    "<|code_prefix|>", "<|code_middle|>", "<|code_suffix|>",
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
    "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "/nothink",
    "<|begin_of_box|>", "<|end_of_box|>", "<answer>", "</answer>",
]

# Text weights five times wider than transformers' default (0.02): the logits of a random model
# then spread enough that greedy decoding follows the context instead of repeating one token.
# Wider still, the random model turns so ill-conditioned that float32 rounding (1e-7 relative,
# different summation orders in torch and MLX) grows past 1e-4 in the logits.
TEXT_INIT_RANGE = 0.1
VISION_INIT_RANGE = 0.02

_CORPUS = [
    "Describe this image in detail. What is shown in the picture?",
    "The quick brown fox jumps over the lazy dog. 0123456789 seconds",
    "A cat sits on a red sofa next to a window; the sun is shining.",
    "What happens in this video? Count the frames and tell me the time.",
    "Hello! How are you today? I am fine, thank you. Let's think step by step.",
    "The answer is 42. Here is the box: [[100, 200, 300, 400]].",
    "Ünïcödé text, emoji 🙂 and 中文 字符 so byte fallback is exercised.",
]


def build_tokenizer(path: Path, vocab_size: int = 320):
    """Train a small byte-level BPE carrying GLM's special tokens; returns the fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=65536,
    )
    return fast


def text_config(vocab_size: int, pad_id: int, eos_ids: list, **overrides) -> dict:
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": [2, 3, 3],
        },
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
        initializer_range=TEXT_INIT_RANGE,
    )
    cfg.update(overrides)
    return cfg


def vision_config(out_hidden_size: int = 128, **overrides) -> dict:
    cfg = dict(
        depth=2,
        hidden_size=64,
        num_heads=2,
        intermediate_size=96,
        out_hidden_size=out_hidden_size,
        patch_size=14,
        temporal_patch_size=2,
        spatial_merge_size=2,
        image_size=336,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        initializer_range=VISION_INIT_RANGE,
    )
    cfg.update(overrides)
    return cfg


def perturb_(model, seed: int = 0, scale: float = 0.1):
    """Move every norm weight off 1 and every bias off 0, so a port that drops one is caught."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def token_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image|>"),
        video_token_id=ids("<|video|>"),
        image_start_token_id=ids("<|begin_of_image|>"),
        image_end_token_id=ids("<|end_of_image|>"),
        video_start_token_id=ids("<|begin_of_video|>"),
        video_end_token_id=ids("<|end_of_video|>"),
    )


def eos_ids(tokenizer) -> list:
    ids = tokenizer.convert_tokens_to_ids
    return [ids("<|endoftext|>"), ids("<|user|>"), ids("<|observation|>")]


def build_processor(tokenizer, image_kwargs=None, video_kwargs=None):
    from transformers import Glm4vImageProcessor, Glm4vProcessor, Glm4vVideoProcessor

    image_kwargs = {"size": {"shortest_edge": 12544, "longest_edge": 9633792}, **(image_kwargs or {})}
    video_kwargs = dict(video_kwargs or {})
    return Glm4vProcessor(
        image_processor=Glm4vImageProcessor(**image_kwargs),
        tokenizer=tokenizer,
        video_processor=Glm4vVideoProcessor(**video_kwargs),
        chat_template=CHAT_TEMPLATE,
    )


def build_checkpoint(path, seed: int = 0, max_shard_size: str | None = None, processor_layout: str = "v5"):
    """Write a tiny GLM-4.1V checkpoint (weights, configs, tokenizer, processor) to `path`.

    processor_layout "v5" is what transformers 5 saves (processor_config.json); "hub" writes the
    published pair preprocessor_config.json + video_preprocessor_config.json.
    Returns (torch model in float32 eval mode, transformers processor).
    """
    import torch
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration, GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path)
    vocab = len(tokenizer)
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    eos = eos_ids(tokenizer)
    config = Glm4vConfig(
        text_config=text_config(vocab, pad, eos),
        vision_config=vision_config(),
        **token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    model = Glm4vForConditionalGeneration(config).eval()
    perturb_(model, seed)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, do_sample=False)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)

    processor = build_processor(tokenizer)
    processor.save_pretrained(path)
    if processor_layout == "hub":
        _rewrite_as_hub_layout(path, processor)
    return model, processor


def _rewrite_as_hub_layout(path: Path, processor):
    """Replace processor_config.json by the published preprocessor_config.json + video_preprocessor_config.json."""
    image = processor.image_processor
    video = processor.video_processor
    common = dict(
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(image.image_mean), image_std=list(image.image_std),
        patch_size=image.patch_size, temporal_patch_size=image.temporal_patch_size,
        merge_size=image.merge_size, do_convert_rgb=True,
    )
    (path / "preprocessor_config.json").write_text(json.dumps({
        **common, "size": dict(image.size), "do_resize": True, "resample": 3,
        "image_processor_type": "Glm4vImageProcessor", "processor_class": "Glm4vProcessor",
    }, indent=2))
    (path / "video_preprocessor_config.json").write_text(json.dumps({
        **common, "size": dict(video.size), "do_resize": True, "resample": 3,
        "fps": video.fps, "max_duration": video.max_duration, "do_sample_frames": True,
        "video_processor_type": "Glm4vVideoProcessor", "processor_class": "Glm4vProcessor",
    }, indent=2))
    (path / "processor_config.json").unlink(missing_ok=True)
