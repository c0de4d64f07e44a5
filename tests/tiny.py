"""Tiny random GLM-V checkpoints, built with transformers itself, for parity tests.

Five families: `glm4v` (GLM-4.1V), `glm4v_moe` (GLM-4.5V: experts behind the same vision
tower), `glm46v` (here with the mixture-of-experts text model and group-limited routing),
`glmga` (GLM-4.6V's model under its own name, here with the dense text model) and `glm_ocr`
(GLM-OCR: its own tower and text model, plus the multi-token-prediction layer the published
checkpoint appends, `model.language_model.layers.N.*`).
Nothing here is downloaded: the tokenizer is trained on the spot with `tokenizers` and
carries GLM's special tokens in the family's order; the chat templates render the same
strings as the published ones; the weights are transformers' random init, perturbed so that
no norm is exactly one and no bias (the router's correction bias included) exactly zero.
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

# The GLM-4.5V / GLM-4.6V chat template, re-typed. Not checked verbatim against the hub file: it is
# the GLM-V template published with GLM-OCR (same user-turn media markers, `/nothink` and
# `<think></think>` thinking switch) with GLM-4.5's plain tool-response branch; the closest
# faithful version found in public sources.
CHAT_TEMPLATE_45V = r"""[gMASK]<sop>
{%- if tools -%}
<|system|>
# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{% for tool in tools %}
{{ tool | tojson(ensure_ascii=False) }}
{% endfor %}
</tools>

For each function call, output the function name and arguments within the following XML format:
<tool_call>{function-name}
<arg_key>{arg-key-1}</arg_key>
<arg_value>{arg-value-1}</arg_value>
<arg_key>{arg-key-2}</arg_key>
<arg_value>{arg-value-2}</arg_value>
...
</tool_call>{%- endif -%}
{%- macro visible_text(content) -%}
    {%- if content is string -%}
        {{- content }}
    {%- elif content is iterable and content is not mapping -%}
        {%- for item in content -%}
            {%- if item is mapping and item.type == 'text' -%}
                {{- item.text }}
            {%- elif item is mapping and (item.type == 'image' or 'image' in item) -%}
                <|begin_of_image|><|image|><|end_of_image|>
            {%- elif item is mapping and (item.type == 'video' or 'video' in item) -%}
                <|begin_of_video|><|video|><|end_of_video|>
            {%- elif item is string -%}
                {{- item }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{- content }}
    {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(last_user_index=-1) %}
{%- for m in messages %}
    {%- if m.role == 'user' %}
        {% set ns.last_user_index = loop.index0 -%}
    {%- endif %}
{%- endfor %}
{% for m in messages %}
{%- if m.role == 'user' -%}<|user|>
{% if m.content is string %}
{{ m.content }}
{%- else %}
{%- for item in m.content %}
{% if item.type == 'video' or 'video' in item %}
<|begin_of_video|><|video|><|end_of_video|>{% elif item.type == 'image' or 'image' in item %}
<|begin_of_image|><|image|><|end_of_image|>{% elif item.type == 'text' %}
{{ item.text }}
{%- endif %}
{%- endfor %}
{%- endif %}
{{- '/nothink' if (enable_thinking is defined and not enable_thinking and not visible_text(m.content).endswith("/nothink")) else '' -}}
{%- elif m.role == 'assistant' -%}
<|assistant|>
{%- set reasoning_content = '' %}
{%- set content = visible_text(m.content) %}
{%- if m.reasoning_content is string %}
    {%- set reasoning_content = m.reasoning_content %}
{%- else %}
    {%- if '</think>' in content %}
        {%- set reasoning_content = content.split('</think>')[0].rstrip('
').split('<think>')[-1].lstrip('
') %}
        {%- set content = content.split('</think>')[-1].lstrip('
') %}
    {%- endif %}
{%- endif %}
{%- if loop.index0 > ns.last_user_index and reasoning_content -%}
{{ '
<think>' + reasoning_content.strip() +  '</think>'}}
{%- else -%}
{{ '
<think></think>' }}
{%- endif -%}
{%- if content.strip() -%}
{{ '
' + content.strip() }}
{%- endif -%}
{% if m.tool_calls %}
{% for tc in m.tool_calls %}
{%- if tc.function %}
    {%- set tc = tc.function %}
{%- endif %}
{{ '
<tool_call>' + tc.name }}
{% set _args = tc.arguments %}
{% for k, v in _args.items() %}
<arg_key>{{ k }}</arg_key>
<arg_value>{{ v | tojson(ensure_ascii=False) if v is not string else v }}</arg_value>
{% endfor %}
</tool_call>{% endfor %}
{% endif %}
{%- elif m.role == 'tool' -%}
{%- if m.content is string -%}
{%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
    {{- '<|observation|>' }}
{%- endif %}
{{- '
<tool_response>
' }}
{{- m.content }}
{{- '
</tool_response>' }}
{%- else -%}
<|observation|>{% for tr in m.content %}

<tool_response>
{{ tr.output if tr.output is defined else tr }}
</tool_response>{% endfor -%}
{% endif -%}
{%- elif m.role == 'system' -%}
<|system|>
{{ visible_text(m.content) }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|assistant|>
{{'<think></think>
' if (enable_thinking is defined and not enable_thinking) else ''}}
{%- endif -%}"""  # noqa: E501 (GLM-4.5V's template as it is, long lines and all)

# GLM-OCR's chat template, re-typed from the published chat_template.jinja (zai-org/GLM-OCR, as
# quoted verbatim in public test sources): GLM-4.5V's above, written with '\n' escapes, plus a
# tool response holding a list of parts (text, images, videos) in one <tool_response>.
CHAT_TEMPLATE_OCR = r"""[gMASK]<sop>
{%- if tools -%}
<|system|>
# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{% for tool in tools %}
{{ tool | tojson(ensure_ascii=False) }}
{% endfor %}
</tools>

For each function call, output the function name and arguments within the following XML format:
<tool_call>{function-name}
<arg_key>{arg-key-1}</arg_key>
<arg_value>{arg-value-1}</arg_value>
<arg_key>{arg-key-2}</arg_key>
<arg_value>{arg-value-2}</arg_value>
...
</tool_call>{%- endif -%}
{%- macro visible_text(content) -%}
    {%- if content is string -%}
        {{- content }}
    {%- elif content is iterable and content is not mapping -%}
        {%- for item in content -%}
            {%- if item is mapping and item.type == 'text' -%}
                {{- item.text }}
            {%- elif item is mapping and (item.type == 'image' or 'image' in item) -%}
                <|begin_of_image|><|image|><|end_of_image|>
            {%- elif item is mapping and (item.type == 'video' or 'video' in item) -%}
                <|begin_of_video|><|video|><|end_of_video|>
            {%- elif item is string -%}
                {{- item }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{- content }}
    {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(last_user_index=-1) %}
{%- for m in messages %}
    {%- if m.role == 'user' %}
        {% set ns.last_user_index = loop.index0 -%}
    {%- endif %}
{%- endfor %}
{% for m in messages %}
{%- if m.role == 'user' -%}<|user|>
{% if m.content is string %}
{{ m.content }}
{%- else %}
{%- for item in m.content %}
{% if item.type == 'video' or 'video' in item %}
<|begin_of_video|><|video|><|end_of_video|>{% elif item.type == 'image' or 'image' in item %}
<|begin_of_image|><|image|><|end_of_image|>{% elif item.type == 'text' %}
{{ item.text }}
{%- endif %}
{%- endfor %}
{%- endif %}
{{- '/nothink' if (enable_thinking is defined and not enable_thinking and not visible_text(m.content).endswith("/nothink")) else '' -}}
{%- elif m.role == 'assistant' -%}
<|assistant|>
{%- set reasoning_content = '' %}
{%- set content = visible_text(m.content) %}
{%- if m.reasoning_content is string %}
    {%- set reasoning_content = m.reasoning_content %}
{%- else %}
    {%- if '</think>' in content %}
        {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
        {%- set content = content.split('</think>')[-1].lstrip('\n') %}
    {%- endif %}
{%- endif %}
{%- if loop.index0 > ns.last_user_index and reasoning_content -%}
{{ '\n<think>' + reasoning_content.strip() +  '</think>'}}
{%- else -%}
{{ '\n<think></think>' }}
{%- endif -%}
{%- if content.strip() -%}
{{ '\n' + content.strip() }}
{%- endif -%}
{% if m.tool_calls %}
{% for tc in m.tool_calls %}
{%- if tc.function %}
    {%- set tc = tc.function %}
{%- endif %}
{{ '\n<tool_call>' + tc.name }}
{% set _args = tc.arguments %}
{% for k, v in _args.items() %}
<arg_key>{{ k }}</arg_key>
<arg_value>{{ v | tojson(ensure_ascii=False) if v is not string else v }}</arg_value>
{% endfor %}
</tool_call>{% endfor %}
{% endif %}
{%- elif m.role == 'tool' -%}
{%- if m.content is string -%}
{%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
    {{- '<|observation|>' }}
{%- endif %}
{{- '\n<tool_response>\n' }}
{{- m.content }}
{{- '\n</tool_response>' }}
{% elif m.content is iterable and m.content is not mapping %}
{%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
{{- '<|observation|>' }}
{%- endif %}
{{- '\n<tool_response>\n' }}
{%- for tr in m.content -%}
  {%- if tr is mapping and tr.type is defined -%}
    {%- set t = tr.type | lower -%}
    {%- if t == 'text' and tr.text is defined -%}
{{ tr.text }}
    {%- elif t in ['image', 'image_url'] -%}
<|begin_of_image|><|image|><|end_of_image|>
    {%- elif t in ['video', 'video_url'] -%}
<|begin_of_video|><|video|><|end_of_video|>
    {%- else -%}
{{ tr | tojson(ensure_ascii=False) }}
    {%- endif -%}
  {%- else -%}
{{ tr.output if tr.output is defined else tr }}
  {%- endif -%}
{%- endfor -%}
{{- '\n</tool_response>' }}
{%- else -%}
<|observation|>{% for tr in m.content %}

<tool_response>
{{ tr.output if tr.output is defined else tr }}
</tool_response>{% endfor -%}
{% endif -%}
{%- elif m.role == 'system' -%}
<|system|>
{{ visible_text(m.content) }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|assistant|>
{{'<think></think>\n' if (enable_thinking is defined and not enable_thinking) else ''}}
{%- endif -%}"""  # noqa: E501 (the published file as it is, long lines and all)

# GLM-OCR's published preprocessor_config.json (zai-org/GLM-OCR), the only processor file it
# ships: no video settings (the video processor falls back to these).
GLM_OCR_PREPROCESSOR = {
    "size": {"shortest_edge": 12544, "longest_edge": 9633792},
    "do_rescale": True,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Glm46VImageProcessor",
    "processor_class": "Glm46VProcessor",
}

FAMILIES = ("glm4v", "glm4v_moe", "glm46v", "glm_ocr", "glmga")

# GLM-4's special tokens in their published order (151329 onwards in the real vocabulary).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
    "<|begin_of_audio|>",
    "<|end_of_audio|>",
    "<|begin_of_transcription|>",
    "<|end_of_transcription|>",
    "<|code_prefix|>",
    "<|code_middle|>",
    "<|code_suffix|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "/nothink",
    "<|begin_of_box|>",
    "<|end_of_box|>",
    "<answer>",
    "</answer>",
]
# GLM-4.5V's order [3P]: audio markers where GLM-4.1V has <|image|> and <|video|>, which come last
# (151363 and 151364 in the real vocabulary), and no answer tags.
SPECIAL_TOKENS_45V = [
    t for t in SPECIAL_TOKENS if t not in ("<|image|>", "<|video|>", "<answer>", "</answer>")
] + ["<|image|>", "<|video|>"]

# Text weights five times wider than transformers' default (0.02): the logits of a random model
# then spread enough that greedy decoding follows the context instead of repeating one token.
# Wider still, the random model turns so ill-conditioned that float32 rounding (1e-7 relative,
# different summation orders in torch and MLX) grows past 1e-4 in the logits.
TEXT_INIT_RANGE = 0.1
VISION_INIT_RANGE = 0.02
# The routers' correction bias: about the spread of the sigmoid scores between experts.
ROUTER_BIAS_SCALE = 0.1

_CORPUS = [
    "Describe this image in detail. What is shown in the picture?",
    "The quick brown fox jumps over the lazy dog. 0123456789 seconds",
    "A cat sits on a red sofa next to a window; the sun is shining.",
    "What happens in this video? Count the frames and tell me the time.",
    "Hello! How are you today? I am fine, thank you. Let's think step by step.",
    "The answer is 42. Here is the box: [[100, 200, 300, 400]].",
    "Ünïcödé text, emoji 🙂 and 中文 字符 so byte fallback is exercised.",
]


def build_tokenizer(path: Path, vocab_size: int = 320, special_tokens=SPECIAL_TOKENS, words=()):
    """Train a small byte-level BPE carrying GLM's special tokens; returns the fast tokenizer.

    `words` join the training text, so that they come out as few, whole tokens (a scripted
    reply's tokens must all differ)."""
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
    tok.train_from_iterator((_CORPUS + list(words)) * 20, trainer=trainer)
    tok.add_special_tokens(special_tokens)
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


def moe_text_config(vocab_size: int, pad_id: int, eos_ids: list, **overrides) -> dict:
    """GLM-4.5V's shape in small: one dense layer, then 8 experts with top-2 routing and a shared
    expert; head_dim apart from hidden/heads, as the real 128 against 4096/96. Experts half as
    wide as hidden: narrower, their output is small beside attention's, and greedy decoding
    after a long image prefix repeats one token."""
    cfg = text_config(
        vocab_size,
        pad_id,
        eos_ids,
        num_hidden_layers=3,
        head_dim=48,
        first_k_dense_replace=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
    )
    # half of 48 * 0.5
    cfg["rope_parameters"] = {**cfg["rope_parameters"], "mrope_section": [4, 4, 4]}
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


def ocr_text_config(vocab_size: int, pad_id: int, eos_ids: list, **overrides) -> dict:
    """GLM-OCR's shape in small: head_dim wider than hidden/heads (the real 128 against
    1536/16), full rotary, one multi-token-prediction layer."""
    cfg = text_config(vocab_size, pad_id, eos_ids, head_dim=48, num_nextn_predict_layers=1)
    cfg["rope_parameters"] = {
        **cfg["rope_parameters"],
        "partial_rotary_factor": 1.0,
        "mrope_section": [6, 9, 9],
    }
    cfg.update(overrides)
    return cfg


def perturb_(model, seed: int = 0, scale: float = 0.1):
    """Move every norm weight off 1 and every bias off 0, so a port that drops one is caught.

    The routers' correction bias (a buffer) moves too, by as much as the sigmoid scores differ
    between experts, so that it changes which experts win.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.add_(torch.randn(b.shape, generator=gen) * ROUTER_BIAS_SCALE)


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


def build_processor(
    tokenizer, image_kwargs=None, video_kwargs=None, chat_template=CHAT_TEMPLATE, kind="Glm4v"
):
    """transformers' processor of `kind`: "Glm4v" (GLM-4.1V, GLM-4.5V), "Glm46V" (GLM-4.6V,
    GLM-OCR) or "Glmga" (GLM-4.6V's processor with glmga's image and video processors, at their
    own defaults)."""
    import transformers as tf

    size = {} if kind == "Glmga" else {"size": {"shortest_edge": 12544, "longest_edge": 9633792}}
    image_kwargs = {**size, **(image_kwargs or {})}
    video_kwargs = dict(video_kwargs or {})
    processor = "Glm46V" if kind == "Glmga" else kind
    return getattr(tf, f"{processor}Processor")(
        image_processor=getattr(tf, f"{kind}ImageProcessor")(**image_kwargs),
        tokenizer=tokenizer,
        video_processor=getattr(tf, f"{kind}VideoProcessor")(**video_kwargs),
        chat_template=chat_template,
    )


def model_class_and_config(family: str, tokenizer, text_overrides=None, vision_overrides=None):
    """transformers' model class and config of a tiny checkpoint of `family` (see FAMILIES);
    `text_overrides` change the text model's shape (a benchmark's larger model), and for
    glm_ocr `vision_overrides` the vision tower's."""
    import transformers as tf

    vocab, pad, eos = (
        len(tokenizer),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_ids(tokenizer),
    )
    ids = token_ids(tokenizer)
    if family == "glm4v":
        config = tf.Glm4vConfig(
            text_config=text_config(vocab, pad, eos, **(text_overrides or {})),
            vision_config=vision_config(),
            **ids,
        )
        return tf.Glm4vForConditionalGeneration, config
    if family == "glm4v_moe":
        config = tf.Glm4vMoeConfig(
            text_config=moe_text_config(vocab, pad, eos), vision_config=vision_config(), **ids
        )
        return tf.Glm4vMoeForConditionalGeneration, config
    if family == "glm_ocr":
        config = tf.GlmOcrConfig(
            text_config=ocr_text_config(vocab, pad, eos, **(text_overrides or {})),
            vision_config=vision_config(attention_bias=True, **(vision_overrides or {})),
            **ids,
        )
        return tf.GlmOcrForConditionalGeneration, config
    if family == "glmga":
        text = text_config(vocab, pad, eos, model_type="glm4v_text")
        return tf.Glm46VForConditionalGeneration, tf.GlmgaConfig(
            text_config=text, vision_config=vision_config(), **ids
        )
    # glm46v takes its text model's kind from text_config.model_type; here the experts, routed
    # within the best 2 of 4 groups, scaled, with two shared experts.
    text = moe_text_config(
        vocab,
        pad,
        eos,
        model_type="glm4v_moe_text",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        n_shared_experts=2,
    )
    return tf.Glm46VForConditionalGeneration, tf.Glm46VConfig(
        text_config=text, vision_config=vision_config(), **ids
    )


def build_checkpoint(
    path,
    seed: int = 0,
    max_shard_size: str | None = None,
    processor_layout: str = "v5",
    family: str = "glm4v",
    words=(),
    vocab_size: int = 320,
    text_overrides=None,
    vision_overrides=None,
):
    """Write a tiny checkpoint of `family` (weights, configs, tokenizer, processor) to `path`
    (`text_overrides`, `vision_overrides`: see `model_class_and_config`).

    processor_layout "v5" is what transformers 5 saves (processor_config.json); "hub" writes the
    published pair preprocessor_config.json + video_preprocessor_config.json; "published" (for
    glm_ocr) GLM-OCR's own preprocessor_config.json alone.
    transformers 5 saves glm4v_moe experts one by one (the published layout) and glm46v's fused.
    Returns (torch model in float32 eval mode, transformers processor).
    """
    import torch
    from transformers import GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    glm41v = family == "glm4v"
    specials = SPECIAL_TOKENS if glm41v else SPECIAL_TOKENS_45V
    tokenizer = build_tokenizer(path, vocab_size, special_tokens=specials, words=words)
    pad, eos = tokenizer.convert_tokens_to_ids("<|endoftext|>"), eos_ids(tokenizer)
    model_class, config = model_class_and_config(
        family, tokenizer, text_overrides, vision_overrides
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    perturb_(model, seed)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, do_sample=False)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    if family == "glm_ocr":
        append_mtp_layer(path, model, seed)

    template = {"glm4v": CHAT_TEMPLATE, "glm_ocr": CHAT_TEMPLATE_OCR}.get(family, CHAT_TEMPLATE_45V)
    kind = {"glm_ocr": "Glm46V", "glmga": "Glmga"}.get(family, "Glm4v")
    processor = build_processor(tokenizer, chat_template=template, kind=kind)
    processor.save_pretrained(path)
    if processor_layout == "hub":
        _rewrite_as_hub_layout(path, processor)
    if processor_layout == "published":
        processor = write_published_ocr_processor(path)
    return model, processor


def write_published_ocr_processor(path: Path):
    """Replace the saved processor settings by GLM-OCR's published preprocessor_config.json
    alone; returns transformers' processor loaded back from `path` (its video processor falls
    back to those settings)."""
    from transformers import AutoProcessor

    (path / "processor_config.json").unlink(missing_ok=True)
    (path / "preprocessor_config.json").write_text(json.dumps(GLM_OCR_PREPROCESSOR, indent=4))
    return AutoProcessor.from_pretrained(path)


def mtp_tensors(model, seed: int = 0) -> dict:
    """The multi-token-prediction layer as the published GLM-OCR checkpoint stores it, named
    after its `layers.N.`: a GLM-4 decoder block (transformers' own, random and perturbed),
    `enorm`, `hnorm`, `eh_proj` [h, 2h], `shared_head.norm`, and copies of the embeddings
    (`embed_tokens`) and the head (`shared_head.head`)."""
    import torch
    from transformers.models.glm_ocr.modeling_glm_ocr import (
        GlmOcrRMSNorm,
        GlmOcrTextDecoderLayer,
    )

    text = model.config.text_config
    n, h = text.num_hidden_layers, text.hidden_size
    torch.manual_seed(seed + 1)
    layer = torch.nn.Module()
    layer.block = GlmOcrTextDecoderLayer(text, n)
    for name in ("enorm", "hnorm", "shared_norm"):
        setattr(layer, name, GlmOcrRMSNorm(h, eps=text.rms_norm_eps))
    layer.eh_proj = torch.nn.Linear(2 * h, h, bias=False)
    with torch.no_grad():
        for p in layer.parameters():
            if p.ndim == 2:
                p.normal_(0, TEXT_INIT_RANGE)
    perturb_(layer, seed)
    out = {f"{k}": v for k, v in layer.block.state_dict().items()}
    out.update(
        {
            "enorm.weight": layer.enorm.weight,
            "hnorm.weight": layer.hnorm.weight,
            "eh_proj.weight": layer.eh_proj.weight,
            "shared_head.norm.weight": layer.shared_norm.weight,
            "embed_tokens.weight": model.model.language_model.embed_tokens.weight,
            "shared_head.head.weight": model.lm_head.weight,
        }
    )
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def append_mtp_layer(path: Path, model, seed: int = 0):
    """Add the MTP layer (`mtp_tensors`) to the saved checkpoint at
    `model.language_model.layers.N.*`, where the published checkpoint keeps it and transformers
    skips it on load."""
    from safetensors.torch import load_file, save_file

    n = model.config.text_config.num_hidden_layers
    file = path / "model.safetensors"
    weights = load_file(file)
    for key, value in mtp_tensors(model, seed).items():
        weights[f"model.language_model.layers.{n}.{key}"] = value
    save_file(weights, str(file), metadata={"format": "pt"})


def _rewrite_as_hub_layout(path: Path, processor):
    """Replace processor_config.json by the published preprocessor_config.json +
    video_preprocessor_config.json."""
    image = processor.image_processor
    video = processor.video_processor
    common = dict(
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(image.image_mean),
        image_std=list(image.image_std),
        patch_size=image.patch_size,
        temporal_patch_size=image.temporal_patch_size,
        merge_size=image.merge_size,
        do_convert_rgb=True,
    )
    if hasattr(image, "patch_expand_factor"):  # glmga's
        common["patch_expand_factor"] = image.patch_expand_factor
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                **common,
                "size": dict(image.size),
                "do_resize": True,
                "resample": 3,
                "image_processor_type": type(image).__name__,
                "processor_class": type(processor).__name__,
            },
            indent=2,
        )
    )
    (path / "video_preprocessor_config.json").write_text(
        json.dumps(
            {
                **common,
                "size": dict(video.size),
                "do_resize": True,
                "resample": 3,
                "fps": video.fps,
                "max_duration": video.max_duration,
                **({"max_frames": video.max_frames} if hasattr(video, "max_frames") else {}),
                "do_sample_frames": True,
                "video_processor_type": type(video).__name__,
                "processor_class": type(processor).__name__,
            },
            indent=2,
        )
    )
    (path / "processor_config.json").unlink(missing_ok=True)


def saved_processors(
    tmp_path_factory, kind: str, layouts, image_kwargs=None, video_kwargs=None
) -> dict:
    """{layout: (path, reference processor loaded back from that path)} for a tiny processor of
    `kind` (build_processor) saved as transformers 5 saves it ("v5"), as the published files
    are ("hub"), or naming no class anywhere, only config.json's model type ("model type")."""
    from transformers import AutoProcessor

    glm41v = kind == "Glm4v"
    out = {}
    for layout in layouts:
        path = tmp_path_factory.mktemp(f"processor-{kind}-{layout}")
        tokenizer = build_tokenizer(
            path, special_tokens=SPECIAL_TOKENS if glm41v else SPECIAL_TOKENS_45V
        )
        template = CHAT_TEMPLATE if glm41v else CHAT_TEMPLATE_45V
        processor = build_processor(
            tokenizer, image_kwargs, video_kwargs, chat_template=template, kind=kind
        )
        processor.save_pretrained(path)
        if layout == "hub":
            _rewrite_as_hub_layout(path, processor)
        if layout == "model type":
            for file in ("processor_config.json", "tokenizer_config.json"):
                config = json.loads((path / file).read_text())
                config.pop("processor_class")
                for part in ("image_processor", "video_processor"):
                    config.get(part, {}).pop(f"{part}_type", None)
                (path / file).write_text(json.dumps(config))
            (path / "config.json").write_text(json.dumps({"model_type": kind.lower()}))
        out[layout] = (path, AutoProcessor.from_pretrained(path))
    return out


def scripted_checkpoint(source, out, script: str):
    """A copy of the tiny checkpoint at `source` that replies `script` to any prompt:
    the decoder's attention and MLP outputs are zeroed, so the last hidden state is the last
    token's embedding, and the output head maps each token of the script to the next (the
    script's tokens must all differ). Lets tests see what a real reply of that text does."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    from mlx_glm4v.inputs.processor import Processor

    source, out = Path(source), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {}
    for f in source.iterdir():
        if f.suffix == ".safetensors":
            weights.update(load_file(f))
        elif not f.name.startswith("model"):
            shutil.copy(f, out / f.name)
    for name in weights:
        if name.endswith(("o_proj.weight", "down_proj.weight")) and "language_model" in name:
            weights[name] = np.zeros_like(weights[name])
    processor = Processor.from_pretrained(source)
    tokenizer = processor.tokenizer
    prompt_end = tokenizer.encode(
        processor.apply_chat_template([{"role": "user", "content": "hi"}])
    )[-1]
    eos = json.loads((source / "config.json").read_text())["text_config"]["eos_token_id"]
    chain = [prompt_end, *tokenizer.encode(script), eos[0] if isinstance(eos, list) else eos]
    assert len(set(chain)) == len(chain), "a scripted reply's tokens must all differ"
    embed, norm = (
        weights["model.language_model.embed_tokens.weight"],
        weights["model.language_model.norm.weight"],
    )
    head = np.zeros_like(weights["lm_head.weight"])
    for token, following in zip(chain, chain[1:]):
        direction = embed[token] * norm
        head[following] = 50 * direction / np.linalg.norm(direction)
    weights["lm_head.weight"] = head
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def prefix_gmask(path):
    """The tokenizer in `path` given a post-processor that starts every encoding with [gMASK], as
    GLM's own tokenizers have; [gMASK]'s id."""
    file = json.loads((path / "tokenizer.json").read_text())
    gmask = next(t["id"] for t in file["added_tokens"] if t["content"] == "[gMASK]")
    file["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "[gMASK]", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"[gMASK]": {"id": "[gMASK]", "ids": [gmask], "tokens": ["[gMASK]"]}},
    }
    (path / "tokenizer.json").write_text(json.dumps(file))
    return gmask


def drafting_checkpoint(source, out):
    """A copy of the tiny GLM-OCR checkpoint at `source` whose MTP layer copies the model's own
    guess: its block passes its input through (attention and MLP outputs zeroed), `eh_proj`
    keeps the main hidden state alone, and the norms are plain, so the layer's argmax at a
    column is the model's there, the token just sampled. It drafts "that token again": kept
    where the reply repeats itself, rejected elsewhere, so tests see both."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    source, out = Path(source), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    weights = load_file(source / "model.safetensors")
    n = json.loads((source / "config.json").read_text())["text_config"]["num_hidden_layers"]
    prefix = f"model.language_model.layers.{n}."
    for name in weights:
        if name.startswith(prefix) and name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = np.zeros_like(weights[name])
        if name.startswith(prefix) and name.endswith(("o_proj.bias", "down_proj.bias")):
            weights[name] = np.zeros_like(weights[name])
    for norm in ("hnorm", "enorm", "shared_head.norm"):
        weights[f"{prefix}{norm}.weight"] = np.ones_like(weights[f"{prefix}{norm}.weight"])
    eh = weights[prefix + "eh_proj.weight"]
    h = eh.shape[0]
    weights[prefix + "eh_proj.weight"] = np.concatenate(
        [np.zeros((h, h), eh.dtype), np.eye(h, dtype=eh.dtype)], axis=1
    )
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
