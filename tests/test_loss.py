"""The loss and its gradients against transformers, in float32, for each family of tiny checkpoint.

`Model(..., labels=)` gives transformers' `ForCausalLMLoss` (within 1e-5 relative), and
`mlx.nn.value_and_grad` through the whole model (vision tower, merger, M-RoPE, router and experts)
gives every parameter's gradient within 1e-4 of the largest of torch autograd's for that tensor.
Inputs come from transformers' own processor; batches are padded on the right, as trainers pad
them (TRL, LlamaFactory), and on the left, as GLM's tokenizer does.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import tiny
import torch
from helpers import clip, picture
from mlx.utils import tree_flatten
from reference import our_inputs, prepare, user

from mlx_glm4v.checkpoints.loader import load_model
from mlx_glm4v.errors import Glm4vError
from mlx_glm4v.models.loss import IGNORE_INDEX, CausalLMOutput, causal_lm_loss, labelled_lm_loss
from mlx_glm4v.tuning import checkpointing

LOSS_TOL = 1e-5
GRAD_TOL = 1e-4


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def setup(request):
    path, ref, processor = request.getfixturevalue(f"{request.param}_checkpoint")
    model = load_model(path)
    assert ("mtp" in model) == (request.param == "glm_ocr")  # the hub layout's MTP layer
    return model, ref, processor


def labels_of(inputs, skip=3):
    """Every real token labelled but the first `skip` of each row (a prompt left out) and the
    padding."""
    labels = np.where(inputs["attention_mask"] == 1, inputs["input_ids"], IGNORE_INDEX)
    for row, mask in zip(labels, inputs["attention_mask"]):
        row[np.flatnonzero(mask)[:skip]] = IGNORE_INDEX
    return labels


def ref_loss_and_grads(ref, inputs, labels):
    ref.zero_grad(set_to_none=True)
    out = ref(**{k: torch.tensor(v) for k, v in inputs.items()}, labels=torch.tensor(labels))
    out.loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in ref.named_parameters() if p.grad is not None}
    ref.zero_grad(set_to_none=True)
    return out.loss.item(), out.logits.detach().numpy(), grads


def our_loss_and_grads(model, inputs, labels):
    def loss_fn(model):
        return model(**our_inputs(inputs), labels=labels).loss

    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    return float(loss), dict(tree_flatten(grads))


def check(model, ref, inputs, name, checkpointed=False):
    labels = labels_of(inputs)
    ref_loss, ref_logits, ref_grads = ref_loss_and_grads(ref, inputs, labels)
    out = model(**our_inputs(inputs), labels=labels)
    assert isinstance(out, CausalLMOutput) and out.loss.dtype == mx.float32
    real = inputs["attention_mask"].astype(bool)
    assert np.abs(np.array(out.logits) - ref_logits)[real].max() <= 1e-4, name
    assert abs(float(out.loss) - ref_loss) <= LOSS_TOL * abs(ref_loss), (
        f"{name}: loss {float(out.loss)} against {ref_loss}"
    )
    with checkpointing.grad_checkpointing(model, checkpointed):
        loss, grads = our_loss_and_grads(model, inputs, labels)
    assert abs(loss - float(out.loss)) <= (LOSS_TOL * abs(ref_loss) if checkpointed else 0)
    # the reference's gradients under our names and layouts (convolutions channels-last, experts
    # stacked), as its weights are loaded
    expected = {
        k: np.array(v)
        for k, v in model.sanitize({k: mx.array(v) for k, v in ref_grads.items()}).items()
    }
    assert set(expected) <= set(grads), f"{name}: no gradient for {set(expected) - set(grads)}"
    # GLM-OCR's MTP layer is no part of transformers' model (it drops it on load) nor of the
    # loss: its parameters are in the tree and their gradients must be zero, as below
    assert any(k.startswith("mtp.") for k in grads) == ("mtp" in model)
    for key, g in grads.items():
        g = np.array(g)
        if key not in expected:  # buffers in transformers (the routers' correction bias), MTP
            assert not g.any(), f"{name}: {key} has a gradient where the reference has none"
            continue
        want = expected[key]
        assert g.shape == want.shape, key
        scale = np.abs(want).max()
        worst = np.abs(g - want).max()
        assert scale > 0, f"{name}: {key}: the reference's gradient is zero"
        assert worst <= GRAD_TOL * scale, f"{name}: {key}: {worst:.2e} against max {scale:.2e}"


def test_text(setup):
    model, ref, processor = setup
    conversation = [
        {"role": "user", "content": "Hello! How are you today?"},
        {"role": "assistant", "content": "I am fine, thank you."},
    ]
    texts = [processor.apply_chat_template(conversation)]
    inputs = dict(processor(text=texts, return_tensors="np"))
    check(model, ref, inputs, "text")


def test_image(setup):
    model, ref, processor = setup
    inputs = prepare(
        processor, [user("image", "Describe this image.")], images=[picture(56, 84, 3)]
    )
    check(model, ref, inputs, "image")


def test_video(setup):
    model, ref, processor = setup
    inputs = prepare(
        processor,
        [user("video", "What happens?")],
        videos=[clip(4, 56, 56, 5)],
        video_metadata=[{"fps": 2.0, "total_num_frames": 4}],
    )
    check(model, ref, inputs, "video")


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch(setup, side):
    model, ref, processor = setup
    conversations = [
        user("image", "Describe this image."),
        user("A cat sits on a red sofa next to a window; the sun is shining.", "image", "Why?"),
    ]
    processor.tokenizer.padding_side = side
    try:
        inputs = prepare(processor, conversations, images=[picture(56, 56, 7), picture(84, 56, 8)])
    finally:
        processor.tokenizer.padding_side = "left"
    mask = inputs["attention_mask"]
    assert (mask[:, -1 if side == "right" else 0] == 0).any()
    check(model, ref, inputs, f"{side}-padded batch")


def test_checkpointed_gradients(setup):
    """Training's gradient checkpointing (layers and, within them, their attention) gives the
    same loss and gradients."""
    model, ref, processor = setup
    conversations = [user("image", "Describe this image."), user("A cat on a sofa.", "Why?")]
    inputs = prepare(processor, conversations, images=[picture(56, 56, 7)])
    check(model, ref, inputs, "checkpointed batch", checkpointed=True)


def test_no_router_loss_by_default(setup):
    """GLM-4.5V's load-balancing loss joins transformers' only when the config asks for router
    logits; the families' configs do not, so the loss above is all of it."""
    model, ref, processor = setup
    assert not getattr(ref.config.text_config, "output_router_logits", False)
    text = model.config.text_config
    if hasattr(text, "output_router_logits"):  # a config that asks for it is refused
        text.output_router_logits = True
        try:
            with pytest.raises(Glm4vError, match="output_router_logits"):
                model(np.array([[1, 2, 3]]), labels=np.array([[1, 2, 3]]))
        finally:
            text.output_router_logits = False


def test_labels_refuse_a_cache(setup):
    model, ref, processor = setup
    with pytest.raises(ValueError, match="without a cache"):
        model(np.array([[1, 2, 3]]), cache=model.make_cache(), labels=np.array([[1, 2, 3]]))


def test_loss_conventions():
    """Shifted by one, -100 left out, the mean over the counted tokens; or their sum over a
    count given (a batch accumulated in parts)."""
    logits = mx.array(np.random.RandomState(0).randn(2, 4, 7).astype(np.float32))
    labels = np.array([[5, 1, IGNORE_INDEX, 2], [IGNORE_INDEX, 3, 4, IGNORE_INDEX]])
    logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    counted = [-logp[0, 0, 1], -logp[0, 2, 2], -logp[1, 0, 3], -logp[1, 1, 4]]
    assert np.isclose(float(causal_lm_loss(logits, labels)), np.mean(counted), rtol=1e-6)
    assert np.isclose(float(causal_lm_loss(logits, labels, num_items=8)), sum(counted) / 8)


def test_loss_at_the_labelled_columns():
    """The model's loss takes the head at the labelled columns alone: the same as over all."""
    rng = np.random.RandomState(1)
    hidden = mx.array(rng.randn(2, 5, 6).astype(np.float32))
    weight = mx.array(rng.randn(9, 6).astype(np.float32))
    labels = np.array([[IGNORE_INDEX, 1, 8, IGNORE_INDEX, 2], [3, IGNORE_INDEX, 4, 5, 6]])
    logits = hidden @ weight.T
    for n in (None, 11):
        want = float(causal_lm_loss(logits, labels, n))
        got = float(labelled_lm_loss(hidden, lambda h: h @ weight.T, labels, n))
        assert np.isclose(got, want, rtol=1e-6), n
    assert np.isnan(float(labelled_lm_loss(hidden, lambda h: h @ weight.T, labels * 0 - 100)))
