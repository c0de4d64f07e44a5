"""GLM-OCR's multi-token-prediction layer (models/mtp.py) against a torch reference written here
from vLLM's published semantics (`glm_ocr_mtp.py`): for the column at position i,
`eh_proj(concat(enorm(embed(token i+1)), hnorm(h_i)))` with the embedding zeroed at position 0,
through a GLM-4 decoder block at the main model's position i, then `shared_head.norm` and the
head; h_i is the main model's output after its final norm. The block, its rotary embedding and
the main model's positions are transformers' own."""

import numpy as np
import pytest
import torch
from helpers import picture
from reference import our_inputs, prepare, user
from safetensors.torch import load_file

from mlx_glm4v.checkpoints.loader import load_model

TOL = 1e-4


@pytest.fixture(scope="module")
def setup(glm_ocr_checkpoint):
    path, ref, processor = glm_ocr_checkpoint
    return load_model(path), ref, processor, path


def reference_mtp(ref, path, inputs, next_tokens):
    """vLLM's MTP forward in torch over the whole prompt (one pass, causal)."""
    from transformers.models.glm_ocr.modeling_glm_ocr import (
        GlmOcrRMSNorm,
        GlmOcrTextDecoderLayer,
        GlmOcrTextRotaryEmbedding,
    )

    text = ref.config.text_config
    n, h = text.num_hidden_layers, text.hidden_size
    prefix = f"model.language_model.layers.{n}."
    stored = {
        k[len(prefix) :]: v
        for k, v in load_file(path / "model.safetensors").items()
        if k.startswith(prefix)
    }
    block = GlmOcrTextDecoderLayer(text, n).eval()
    block.load_state_dict(
        {k: v for k, v in stored.items() if k.split(".")[0] in dict(block.named_children())}
    )
    norms = {}
    for name in ("enorm", "hnorm", "shared_head.norm"):
        norms[name] = GlmOcrRMSNorm(h, eps=text.rms_norm_eps)
        norms[name].weight.data = stored[f"{name}.weight"]
    eh_proj = torch.nn.Linear(2 * h, h, bias=False)
    eh_proj.weight.data = stored["eh_proj.weight"]
    t = {k: torch.tensor(v) for k, v in inputs.items()}
    with torch.no_grad():
        hidden = ref.model(**t).last_hidden_state  # after the final norm
        positions, _ = ref.model.get_rope_index(
            t["input_ids"], t["mm_token_type_ids"], t.get("image_grid_thw"), None
        )
        embeds = stored["embed_tokens.weight"][torch.tensor(next_tokens)]
        embeds[positions[0] == 0] = 0  # vLLM: masking inputs at position 0
        x = eh_proj(torch.cat([norms["enorm"](embeds), norms["hnorm"](hidden)], dim=-1))
        rope = GlmOcrTextRotaryEmbedding(text)(x, positions)
        L = x.shape[1]
        mask = torch.full((L, L), float("-inf")).triu(1)[None, None]
        x = block(x, position_embeddings=rope, attention_mask=mask)
        logits = torch.nn.functional.linear(
            norms["shared_head.norm"](x), stored["shared_head.head.weight"]
        )
    return hidden.numpy(), logits.numpy()


@pytest.mark.parametrize("case", ["text", "image"])
def test_mtp_forward_matches_reference(setup, case):
    """Whole prompt in one pass, then the same prompt in two chunks through the layer's own
    cache: both equal the reference within 1e-4."""
    import mlx.core as mx

    model, ref, processor, path = setup
    assert "mtp" in model
    if case == "text":
        inputs = prepare(processor, [[{"role": "user", "content": "Hello! How are you today?"}]])
    else:
        inputs = prepare(processor, [user("image", "Text Recognition:")], images=[picture(90, 120)])
    ids = inputs["input_ids"]
    logits, hidden = model(**our_inputs(inputs), return_hidden=True)
    next_tokens = np.concatenate([ids[:, 1:], np.array(logits[:, -1:].argmax(-1))], axis=1)
    ref_hidden, ref_logits = reference_mtp(ref, path, inputs, next_tokens)
    assert np.abs(np.array(hidden) - ref_hidden).max() <= TOL

    prompt = model.prepare(**our_inputs(inputs))
    whole = np.array(model.mtp_forward(prompt, next_tokens, hidden))
    assert np.abs(whole - ref_logits).max() <= TOL

    cache = model.make_mtp_cache()
    cache.record(prompt)
    split = ids.shape[1] - 3
    parts = [
        model.mtp_forward(prompt, next_tokens[:, a:b], hidden[:, a:b], cache, a, b)
        for a, b in ((0, split), (split, ids.shape[1]))
    ]
    chunked = np.array(mx.concatenate(parts, axis=1))
    assert np.abs(chunked - ref_logits).max() <= TOL
    assert cache[0].offset == ids.shape[1]


def test_zeroed_embedding_at_position_zero_matters(setup):
    """The first column's draft does not depend on the token given for it (its embedding is
    zeroed), the others' do."""
    model, _, processor, _ = setup
    inputs = prepare(processor, [[{"role": "user", "content": "The quick brown fox"}]])
    ids = inputs["input_ids"]
    logits, hidden = model(**our_inputs(inputs), return_hidden=True)
    prompt = model.prepare(**our_inputs(inputs))
    a = np.concatenate([ids[:, 1:], ids[:, :1]], axis=1)
    b = a.copy()
    b[:, 0] = (b[:, 0] + 7) % model.config.text_config.vocab_size
    out_a = np.array(model.mtp_forward(prompt, a, hidden))
    out_b = np.array(model.mtp_forward(prompt, b, hidden))
    np.testing.assert_array_equal(out_a, out_b)
    c = a.copy()
    c[:, 1] = (c[:, 1] + 7) % model.config.text_config.vocab_size
    assert np.abs(np.array(model.mtp_forward(prompt, c, hidden)) - out_a).max() > 1e-3
