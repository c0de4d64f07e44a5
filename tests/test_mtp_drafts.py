"""MTP speculative decoding (generation/speculative.py): greedy replies equal plain decoding's for
every chain depth, with drafts both kept and rejected in the runs, under a constraint, a rotating
cache, a thinking budget and stop strings; speculative sampling keeps the model's distribution
(checked against the exact probabilities with a bound from the sample size) and is reproducible
under a seed."""

import json
import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_glm4v.checkpoints.loader import load
from mlx_glm4v.errors import Glm4vError
from mlx_glm4v.generation.chat import ChatSession
from mlx_glm4v.generation.constrain import Constraint
from mlx_glm4v.generation.generate import stream_generate
from mlx_glm4v.generation.reply import split_reply
from mlx_glm4v.generation.speculative import sampling_distribution, speculative_choice

PROMPTS = ["Hello there, how are you?", "one two three", "Text Recognition: the quick brown fox"]


def reply(model, processor, prompt, **settings):
    """(tokens, drafting statistics of the last response)."""
    responses = list(stream_generate(model, processor, prompt, **settings))
    return [r.token for r in responses if r.token is not None], responses[-1].drafts


def test_greedy_equals_plain_for_each_depth(drafting):
    _, model, processor = drafting
    for steps in (1, 2, 3, 4):
        kept = drafted = 0
        for prompt in PROMPTS:
            plain, none = reply(model, processor, prompt, max_tokens=40, ignore_eos=True)
            assert none is None
            tokens, stats = reply(
                model,
                processor,
                prompt,
                max_tokens=40,
                ignore_eos=True,
                draft="mtp",
                draft_steps=steps,
            )
            assert tokens == plain, (steps, prompt)
            kept, drafted = kept + stats["accepted"], drafted + stats["drafted"]
            assert stats["tokens_per_step"] == pytest.approx(
                (stats["accepted"] + stats["verify_steps"]) / stats["verify_steps"], abs=1e-3
            )
        assert 0 < kept < drafted, (steps, kept, drafted)


def test_greedy_with_random_mtp_layer(glm_ocr_checkpoint):
    """The checkpoint's own (random) layer: nearly every draft rejected, the reply unchanged."""
    model, processor = load(str(glm_ocr_checkpoint[0]))
    plain, _ = reply(model, processor, PROMPTS[0], max_tokens=24, ignore_eos=True)
    tokens, stats = reply(
        model, processor, PROMPTS[0], max_tokens=24, ignore_eos=True, draft="mtp", draft_steps=3
    )
    assert tokens == plain and stats["drafted"] > 0


@pytest.mark.parametrize(
    "options",
    [
        {"max_kv_size": 40},  # the prompt is ~20 tokens: the cache fills and rotates mid-reply
        {"thinking_budget": 1},
        {"repetition_penalty": 1.3},
        {"stop": ["never-there"], "max_tokens": 30},
        {"prefill_step_size": 7},  # the layer's cache filled chunk by chunk
    ],
    ids=["rotating", "thinking-budget", "repetition-penalty", "stop", "prefill-chunks"],
)
def test_greedy_equals_plain_with_cache_options(drafting, options):
    _, model, processor = drafting
    settings = {"max_tokens": 48, "ignore_eos": True, **options}
    for prompt in PROMPTS[1:]:
        plain, _ = reply(model, processor, prompt, **settings)
        tokens, stats = reply(model, processor, prompt, draft="mtp", draft_steps=2, **settings)
        assert tokens == plain
        assert stats["drafted"] > 0


def test_greedy_with_a_constraint(drafting):
    """Drafts the grammar forbids are rejected: the constrained reply is plain decoding's."""
    _, model, processor = drafting
    constraint = Constraint(kind="regex", spec="(ab|ba)+c")
    for prompt in PROMPTS:
        settings = dict(max_tokens=40, constraint=constraint, thinking_budget=2)
        plain, _ = reply(model, processor, prompt, **settings)
        tokens, stats = reply(model, processor, prompt, draft="mtp", draft_steps=3, **settings)
        assert tokens == plain
        answer = split_reply(processor.tokenizer.decode(tokens[:-1])).answer
        assert re.fullmatch("(ab|ba)+c", answer.strip()), answer
        assert stats["drafted"] > stats["accepted"]


def test_sampling_reproducible_under_a_seed(drafting):
    _, model, processor = drafting
    settings = dict(
        max_tokens=30, temp=0.9, top_p=0.95, ignore_eos=True, draft="mtp", draft_steps=2
    )
    a, stats = reply(model, processor, PROMPTS[1], seed=7, **settings)
    b, _ = reply(model, processor, PROMPTS[1], seed=7, **settings)
    c, _ = reply(model, processor, PROMPTS[1], seed=8, **settings)
    assert a == b and a != c and stats["drafted"] > 0


def test_speculative_sampling_keeps_the_distribution():
    """Token frequencies of speculative sampling (draft from q, accept with min(1, p/q), else the
    residual) over N draws against p itself, after mlx-lm's filters and temperature as the
    sampler applies them. Each token's frequency must lie within 5.5 standard errors
    (sqrt(p(1-p)/N)) of its probability: a false alarm has probability below 1e-6 over the
    whole vocabulary. The draft distribution q lies far outside that bound, so a verifier that
    kept drafts regardless would fail."""
    rng = np.random.default_rng(0)
    vocab, n = 8, 12000
    p_logits = mx.array(rng.normal(0, 1.5, (1, vocab)).astype(np.float32))
    q_logits = mx.array(rng.normal(0, 1.5, (1, vocab)).astype(np.float32))
    distribution = sampling_distribution(temp=0.8, top_k=6)
    p = distribution(p_logits - mx.logsumexp(p_logits, axis=-1, keepdims=True))
    q = distribution(q_logits - mx.logsumexp(q_logits, axis=-1, keepdims=True))
    mx.random.seed(3)
    drafts = mx.random.categorical(mx.log(q), num_samples=n).tolist()
    counts = np.zeros(vocab)
    for d in drafts:
        choice = speculative_choice(p, q, d)
        counts[d if choice is None else choice] += 1
    exact, freq = np.array(p), counts / n
    bound = 5.5 * np.sqrt(exact * (1 - exact) / n) + 1e-9
    assert (np.abs(freq - exact) <= bound).all(), (freq, exact)
    assert (np.abs(np.array(q) - exact) > bound).any()
    assert counts[exact == 0].sum() == 0  # top-k's dropped tokens never come out


def test_refusals(drafting, glm4v_checkpoint):
    from mlx_glm4v.generation.settings import GenerationSettings

    with pytest.raises(Glm4vError, match="not a drafter"):
        GenerationSettings(draft="eagle")
    with pytest.raises(Glm4vError, match="at least 1"):
        GenerationSettings(draft="mtp", draft_steps=0)
    with pytest.raises(Glm4vError, match="choose one drafter"):
        GenerationSettings(draft="mtp", prompt_lookup=3)
    model, processor = load(str(glm4v_checkpoint[0]))
    with pytest.raises(Glm4vError, match="multi-token-prediction layer"):
        reply(model, processor, "hi", max_tokens=3, draft="mtp")


def test_cli_json_reports_drafting(drafting):
    path = drafting[0]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_glm4v.cli",
            "generate",
            "--model",
            str(path),
            "--prompt",
            PROMPTS[1],
            "--max-tokens",
            "24",
            "--ignore-eos",
            "--draft",
            "mtp",
            "--draft-steps",
            "3",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    drafts = json.loads(out.stdout)["drafts"]
    assert drafts["drafted"] > 0 and 0 <= drafts["acceptance"] <= 1
    assert drafts["tokens_per_step"] >= 1
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_glm4v.cli",
            "generate",
            "--model",
            str(path),
            "--prompt",
            "hi",
            "--draft",
            "medusa",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "not a drafter" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_chat_turns_equal_plain(drafting):
    """A later turn's drafter starts its cache at the turn (less context, same reply)."""
    _, model, processor = drafting
    replies = []
    for draft in (None, "mtp"):
        session = ChatSession(model, processor, max_tokens=20, ignore_eos=True, draft=draft)
        turns = [[r.token for r in session.ask(text)] for text in ("one two three", "four five")]
        replies.append(turns)
    assert replies[0] == replies[1]


def test_chat_turn_ended_by_a_stop_string(drafting):
    """A stop string ends a reply part-way through a round, with the next round already queued:
    those columns leave the cache, so the next turn still equals plain decoding's."""
    _, model, processor = drafting
    text = "".join(
        r.text for r in ChatSession(model, processor, max_tokens=20, ignore_eos=True).ask("hi")
    )
    stop = text[len(text) // 3 :][:3]
    replies = []
    for draft in (None, "mtp"):
        session = ChatSession(
            model,
            processor,
            max_tokens=20,
            ignore_eos=True,
            stop=[stop],
            draft=draft,
            draft_steps=3,
        )
        turns = [list(session.ask(t)) for t in ("hi", "four five")]
        assert turns[0][-1].finish_reason == "stop"
        replies.append([[r.token for r in turn if r.token is not None] for turn in turns])
    assert replies[0] == replies[1]


def test_prefill_fills_the_layer_cache(glm_ocr_checkpoint):
    """The layer's cache holds one position per prompt token after prefill, whole or in chunks,
    and the first draft's logits equal the layer run over the whole prompt in one pass (the
    checkpoint's random layer: every column's embedding and cache entry matter)."""
    from mlx_glm4v.generation.generate import prefill
    from mlx_glm4v.generation.speculative import mtp_drafter

    model, processor = load(str(glm_ocr_checkpoint[0]))
    ids = np.array(processor.tokenizer.encode("The quick brown fox jumps over the lazy dog"))
    drafts = []
    for step in (len(ids), 5):
        cache = model.make_cache()
        prompt = model.prepare(mx.array(ids[None]), cache=cache)
        drafter = mtp_drafter(model, cache, prompt, ids)
        logits = prefill(model, prompt, cache, step, on_hidden=drafter.prefilled)
        token = int(mx.argmax(logits, axis=-1).item())
        q, _ = drafter.catch_up(token)
        assert drafter.cache[0].offset == len(ids)
        drafts.append(np.array(q))
    _, hidden = model(mx.array(ids[None]), return_hidden=True)
    whole = model.mtp_forward(
        model.prepare(mx.array(ids[None])), np.append(ids[1:], token)[None], hidden
    )
    for q in drafts:
        assert np.abs(q - np.array(whole[0, -1])).max() <= 1e-4
