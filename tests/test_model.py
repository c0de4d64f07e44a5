"""The MLX model against transformers, in float32, for each family of tiny checkpoint.

The cases run once per family (tiny.FAMILIES): Glm4vForConditionalGeneration,
Glm4vMoeForConditionalGeneration, Glm46VForConditionalGeneration (with the experts' text
model; and as `glmga`, with the dense one) and GlmOcrForConditionalGeneration. Inputs come
from transformers' own processor so that these tests isolate the model. Each case checks
the logits on every real (unpadded) position and 8 greedy tokens decoded with the cache.
"""

import json

import numpy as np
import pytest
import tiny
import torch
from helpers import clip, picture
from reference import our_inputs, prepare, user

from mlx_glm4v.checkpoints.loader import load_model
from mlx_glm4v.errors import Glm4vError
from mlx_glm4v.models.rope_index import rope_index, token_types

TOL = 1e-4
NEW_TOKENS = 8
WORST = {}  # "family: case" -> max |logit difference|, printed at the end of the run
TOKENS = {}


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def setup(request):
    path, ref, processor = request.getfixturevalue(f"{request.param}_checkpoint")
    return load_model(path), ref, processor


def our_greedy(model, inputs, n=NEW_TOKENS):
    cache = model.make_cache()
    logits = model(**our_inputs(inputs), cache=cache)
    tokens = [np.array(logits[:, -1].argmax(-1))]
    for _ in range(n - 1):
        logits = model(tokens[-1][:, None], cache=cache)
        tokens.append(np.array(logits[:, -1].argmax(-1)))
    return np.stack(tokens, axis=1)


def ref_greedy(ref, inputs, n=NEW_TOKENS):
    with torch.no_grad():
        out = ref.generate(
            **{k: torch.tensor(v) for k, v in inputs.items()},
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
        )
    return out[:, inputs["input_ids"].shape[1] :].numpy()


def check(name, model, ref, inputs, ref_logits=None, ref_tokens=None):
    if ref_logits is None:
        with torch.no_grad():
            ref_logits = ref(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()
    name = f"{ref.config.model_type}: {name}"
    logits = np.array(model(**our_inputs(inputs)))
    real = inputs["attention_mask"].astype(bool)
    worst = float(np.abs(logits - ref_logits)[real].max())
    WORST[name] = worst
    assert worst <= TOL, f"{name}: max |logit difference| {worst:.2e}"
    tokens = our_greedy(model, inputs)
    TOKENS[name] = tokens.tolist()
    if ref_tokens is None:
        ref_tokens = ref_greedy(ref, inputs)
    np.testing.assert_array_equal(tokens, ref_tokens, err_msg=f"{name}: greedy tokens differ")


def test_text(setup):
    model, ref, processor = setup
    check(
        "text",
        model,
        ref,
        prepare(processor, [[{"role": "user", "content": "Hello! How are you today?"}]]),
    )


def test_one_image(setup):
    model, ref, processor = setup
    inputs = prepare(processor, [user("image", "Describe this image.")], images=[picture(200, 300)])
    check("one image", model, ref, inputs)


def test_two_images_of_different_sizes(setup):
    model, ref, processor = setup
    inputs = prepare(
        processor,
        [user("image", "and", "image", "compare them")],
        images=[picture(120, 90, 1), picture(250, 400, 2)],
    )
    assert len(inputs["image_grid_thw"]) == 2 and not np.array_equal(*inputs["image_grid_thw"])
    check("two images", model, ref, inputs)


@pytest.mark.parametrize("shape", [(1400, 40), (30, 900)], ids=["tall", "wide"])
def test_extreme_aspect_ratio(setup, shape):
    model, ref, processor = setup
    inputs = prepare(processor, [user("image", "What is this?")], images=[picture(*shape, 3)])
    check(f"{'tall' if shape[0] > shape[1] else 'wide'} image", model, ref, inputs)


def test_video_presampled_frames(setup):
    model, ref, processor = setup
    inputs = prepare(
        processor,
        [user("video", "What happens?")],
        videos=[clip(4, 84, 112)],
        do_sample_frames=False,
        video_metadata=[{"fps": 2.0, "total_num_frames": 4, "frames_indices": [0, 1, 2, 3]}],
    )
    check("video, pre-sampled frames", model, ref, inputs)


def test_video_sampled_from_longer_clip(setup):
    model, ref, processor = setup
    # 4.5 s at 10 fps: the reference samples 2 fps -> 9, padded to 10 frames
    frames = clip(45, 70, 70, 5)
    inputs = prepare(
        processor,
        [user("video", "Count the frames.")],
        videos=[frames],
        video_metadata=[{"fps": 10.0, "total_num_frames": 45, "duration": 4.5}],
    )
    # GLM-4.6V's processor (GLM-OCR's) samples by duration, more frames; glmga's samples 2 fps
    # up to a step short of the end, spread to 9, padded to 10
    expected = 14 if type(processor.video_processor).__name__ == "Glm46VVideoProcessor" else 5
    assert inputs["video_grid_thw"][0][0] == expected
    check("video, sampled from a clip", model, ref, inputs)


def test_long_video_encoded_in_pieces(setup, monkeypatch):
    """A clip longer than the tower takes at once is encoded a few frames at a time, exactly."""
    import mlx_glm4v.models.model

    model, ref, processor = setup
    # about two frames of 4x6 patches
    monkeypatch.setattr(mlx_glm4v.models.model, "VISION_CHUNK_PATCHES", 40)
    frames = clip(12, 56, 84, 12)
    inputs = prepare(
        processor,
        [user("video", "Count the frames.")],
        videos=[frames],
        video_metadata=[{"fps": 2.0, "total_num_frames": 12}],
    )
    assert inputs["video_grid_thw"][0][0] == 6
    check("video in pieces", model, ref, inputs)


def test_left_padded_batch(setup):
    model, ref, processor = setup
    conversations = [
        user("image", "Describe this image."),
        user("A cat sits on a red sofa next to a window; the sun is shining.", "image", "Why?"),
    ]
    inputs = prepare(processor, conversations, images=[picture(56, 56, 7), picture(180, 120, 8)])
    assert (inputs["attention_mask"] == 0).any()
    check("left-padded batch", model, ref, inputs)


@pytest.mark.parametrize("split", [None, 9], ids=["whole", "in two chunks"])
def test_last_column_alone_equals_the_whole_pass(setup, split):
    """`forward(last_only=True)`, what a prompt's first token needs, gives the last column of the
    whole pass and the same keys and values, for a left-padded image batch and for a chunk
    continuing a cache (text positions then follow an offset)."""
    import mlx.core as mx

    model, _, processor = setup
    conversations = [
        user("image", "Describe this image."),
        user("A cat sits on a red sofa next to a window; the sun is shining.", "image", "Why?"),
    ]
    inputs = our_inputs(
        prepare(processor, conversations, images=[picture(56, 56, 7), picture(180, 120, 8)])
    )
    runs = []
    for last_only in (False, True):
        cache = model.make_cache()
        prompt = model.prepare(**inputs, cache=cache)
        cache.record(prompt)
        if split is None:
            hidden = model.forward(prompt, cache, last_only=last_only)
        else:  # a first chunk, then the rest as text continuing the cache
            model.forward(prompt, cache)
            text = model.prepare(np.array(inputs["input_ids"])[:, -split:], cache=cache)
            cache.record(text)
            hidden = model.forward(text, cache, last_only=last_only)
        runs.append(
            (np.array(hidden[:, -1]), [np.array(a) for c in cache for a in (c.keys, c.values)])
        )
        mx.eval(hidden)
    (whole, kv_whole), (alone, kv_alone) = runs
    assert np.abs(whole - alone).max() <= 1e-5
    for a, b in zip(kv_whole, kv_alone):
        np.testing.assert_array_equal(a, b)


def test_image_and_video_in_one_prompt(setup):
    """transformers refuses this prompt; its reference is built from its own parts, scattering by
    token type."""
    model, ref, processor = setup
    texts = [
        processor.apply_chat_template(
            user("image", "video", "What do they share?"), add_generation_prompt=True
        )
    ]
    inputs = dict(
        processor(
            text=texts,
            images=[picture(100, 140, 9)],
            videos=[clip(4, 56, 84, 10)],
            do_sample_frames=False,
            video_metadata=[{"fps": 1.0, "total_num_frames": 4, "frames_indices": [0, 1, 2, 3]}],
            return_tensors="np",
        )
    )
    ref_logits, ref_tokens = reference_by_parts(ref, inputs)
    check("image and video", model, ref, inputs, ref_logits, ref_tokens)


def reference_by_parts(ref, inputs, n=NEW_TOKENS):
    """Greedy decoding with transformers' vision features, rope index and text model, no
    generate()."""
    from transformers import DynamicCache

    t = {k: torch.tensor(v) for k, v in inputs.items()}
    inner = ref.model
    with torch.no_grad():
        embeds = inner.get_input_embeddings()(t["input_ids"])
        image = torch.cat(
            inner.get_image_features(t["pixel_values"], t["image_grid_thw"]).pooler_output
        )
        video = torch.cat(
            inner.get_video_features(t["pixel_values_videos"], t["video_grid_thw"]).pooler_output
        )
        types = t["mm_token_type_ids"][0]
        embeds[0, types == 1] = image
        embeds[0, types == 2] = video
        positions, deltas = inner.get_rope_index(
            t["input_ids"], t["mm_token_type_ids"], t["image_grid_thw"], t["video_grid_thw"]
        )
        cache = DynamicCache(config=ref.config.text_config)
        hidden = inner.language_model(
            inputs_embeds=embeds, position_ids=positions, cache=cache
        ).last_hidden_state
        logits = ref.lm_head(hidden)
        first = logits.numpy()
        next_pos = int(positions.max()) + 1
        tokens = []
        for i in range(n):
            token = logits[:, -1].argmax(-1)
            tokens.append(int(token))
            pos = torch.full((3, 1, 1), next_pos + i)
            hidden = inner.language_model(
                inputs_embeds=inner.get_input_embeddings()(token[:, None]),
                position_ids=pos,
                cache=cache,
            ).last_hidden_state
            logits = ref.lm_head(hidden)
    return first, np.array([tokens])


def test_rope_index_matches_reference_example():
    """The worked example of the spec: 3 text tokens, an image of 4x6 patches, then text."""
    ids = np.array([[5, 5, 5, 9, 1, 1, 1, 1, 1, 1, 8, 5]])
    types = token_types(ids, image_token_id=1, video_start_id=100, video_end_id=101)
    pos, nxt = rope_index(ids, types, image_grid_thw=[[1, 4, 6]])
    assert pos[:, 0, :4].tolist() == [[0, 1, 2, 3]] * 3
    assert pos[0, 0, 4:10].tolist() == [4] * 6
    assert pos[1, 0, 4:10].tolist() == [4, 4, 4, 5, 5, 5]
    assert pos[2, 0, 4:10].tolist() == [4, 5, 6, 4, 5, 6]
    assert pos[:, 0, 10].tolist() == [7, 7, 7] and nxt.tolist() == [9]


def test_two_conversations_share_one_model(setup):
    """Decoding state lives in the cache: interleaving two conversations changes neither."""
    model, ref, processor = setup
    a = prepare(processor, [user("image", "Describe this image.")], images=[picture(84, 84, 11)])
    b = prepare(
        processor, [[{"role": "user", "content": "The quick brown fox jumps over the lazy dog."}]]
    )
    alone = [our_greedy(model, a), our_greedy(model, b)]
    caches = [model.make_cache(), model.make_cache()]
    tokens = [
        [np.array(model(**our_inputs(x), cache=c)[:, -1].argmax(-1))]
        for x, c in zip((a, b), caches)
    ]
    for _ in range(NEW_TOKENS - 1):
        for seq, c in zip(tokens, caches):
            seq.append(np.array(model(seq[-1][:, None], cache=c)[:, -1].argmax(-1)))
    np.testing.assert_array_equal(np.stack(tokens[0], 1), alone[0])
    np.testing.assert_array_equal(np.stack(tokens[1], 1), alone[1])


def test_load_errors(tmp_path, glm4v_checkpoint):
    import json
    import shutil

    from mlx_glm4v.checkpoints.loader import resolve

    (tmp_path / "empty").mkdir()
    with pytest.raises(Glm4vError, match="no config.json"):
        resolve(str(tmp_path / "empty"))
    with pytest.raises(Glm4vError, match="neither an existing directory nor a hub repo id"):
        resolve(str(tmp_path / "nowhere" / "at" / "all"))
    src = glm4v_checkpoint[0]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    with pytest.raises(Glm4vError, match="model_type 'llava' is not supported"):
        load_model(bad)
    (bad / "config.json").write_text(json.dumps(config))
    shard = sorted(bad.glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(Glm4vError, match="lacks the weight shard"):
        load_model(bad)
    (bad / "model.safetensors.index.json").unlink()
    with pytest.raises(Glm4vError, match="is missing .* tensor"):
        load_model(bad)
    config["text_config"]["intermediate_size"] += 2
    (bad / "config.json").write_text(json.dumps(config))
    shutil.copy(src / shard.name, shard)
    with pytest.raises(Glm4vError, match="has shape"):
        load_model(bad)


def test_expert_checkpoint_checks(tmp_path, glm4v_moe_checkpoint):
    """A multi-token-prediction layer after the last one is skipped, as transformers does; a
    missing expert tensor is named."""
    import shutil

    import mlx.core as mx

    from mlx_glm4v.checkpoints.loader import read_weights

    src = glm4v_moe_checkpoint[0]
    weights = read_weights(src)
    layers = json.loads((src / "config.json").read_text())["text_config"]["num_hidden_layers"]
    for case in ("mtp", "missing"):
        path = tmp_path / case
        shutil.copytree(src, path, ignore=shutil.ignore_patterns("*.safetensors*"))
        changed = dict(weights)
        if case == "mtp":
            changed[f"model.language_model.layers.{layers}.eh_proj.weight"] = mx.zeros((4, 4))
        else:
            del changed["model.language_model.layers.1.mlp.experts.3.up_proj.weight"]
        mx.save_safetensors(str(path / "model.safetensors"), changed)
        if case == "mtp":
            load_model(path)
        else:
            with pytest.raises(
                Glm4vError, match=r"layers.1.mlp.switch_mlp.up_proj.weight: .* 7 of the 8 experts"
            ):
                load_model(path)


def test_zzz_report():
    """Prints the worst logit difference per case (run with -s to see it)."""
    for name, worst in WORST.items():
        print(f"{name:42s} max |logit diff| {worst:.2e}  tokens {TOKENS.get(name)}")
