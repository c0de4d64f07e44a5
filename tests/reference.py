"""transformers' side of the parity tests: prompts through its processor, and its greedy
generate."""

import torch

from mlx_glm4v.generation.streaming import hidden_tokens


def user(*items):
    content = [
        {"type": kind} if kind in ("image", "video") else {"type": "text", "text": kind}
        for kind in items
    ]
    return [{"role": "user", "content": content}]


def prepare(processor, conversations, **kwargs):
    texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    return dict(processor(text=texts, padding=True, return_tensors="np", **kwargs))


def our_inputs(inputs):
    return {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}


def ref_generate(s, messages, steps, **media):
    """transformers' greedy generate, decoded without its stop token; the text leaves out the
    control tokens a reply's text never shows (all but GLM-V's reply markers)."""
    hf = s["hf"]
    text = hf.apply_chat_template(messages, add_generation_prompt=True)
    inputs = hf(text=[text], return_tensors="pt", **media)
    with torch.no_grad():
        out = s["ref"].generate(**inputs, max_new_tokens=steps, do_sample=False)
    tokens = out[0, inputs["input_ids"].shape[1] :].tolist()
    eos = set(s["model"].config.eos_token_id)
    if tokens and tokens[-1] in eos:
        tokens = tokens[:-1]
    hidden = hidden_tokens(s["processor"].tokenizer.backend)
    return tokens, s["processor"].tokenizer.decode([t for t in tokens if t not in hidden])
