"""Speculative drafts in the engine's rows (serving/drafts.py): rows with MTP drafts, prompt
lookup and none share a batch, and each reply equals the same request run alone and plain
(greedy: token for token; sampled: the seeded draws of its single-stream run), with drafts both
kept and rejected, under a constraint, a rotating cache, a thinking budget and stop strings,
from a prefix-cache hit and with the prompt in chunks; a cancelled drafting row leaves the
others exact, and the MTP layer's cache follows the model's through every rejection."""

import httpx
import pytest
from servers import Server

from mlx_glm4v.generation.constrain import Constraint
from mlx_glm4v.generation.generate import stream_generate
from mlx_glm4v.generation.messages import build_messages
from mlx_glm4v.generation.settings import GenerationSettings
from mlx_glm4v.serving.engine import Engine, Request

PROMPTS = [
    "Hello there, how are you?",
    "one two three one two three",
    "Text Recognition: the quick brown fox",
    "a b a b a b",
]


def inputs_of(processor, prompt):
    messages = build_messages(prompt, (), (), None)
    return processor.process_messages(messages, None, None)


def alone(model, processor, prompt, seed=None, **settings):
    return [
        r.token
        for r in stream_generate(model, processor, prompt, seed=seed, **settings)
        if r.token is not None
    ]


def run(engine, requests):
    handles = [engine.submit(r) for r in requests]
    out = []
    for h in handles:
        events = list(h)
        assert events[-1].finish_reason in ("stop", "length"), events[-1].error
        out.append(([e.token for e in events if e.token is not None], events[-1].usage))
    return out


def test_rows_with_and_without_drafts_equal_their_runs_alone(drafting):
    _, model, processor = drafting
    kinds = [
        {},
        {"draft": "mtp", "draft_steps": 1},
        {"draft": "mtp", "draft_steps": 2},
        {"draft": "mtp", "draft_steps": 3},
        {"prompt_lookup": 2},
    ]
    requests, expected = [], []
    for i, options in enumerate(kinds):
        for prompt in PROMPTS[:2] if i else PROMPTS:
            settings = dict(max_tokens=24, ignore_eos=True, **options)
            requests.append(Request(inputs_of(processor, prompt), GenerationSettings(**settings)))
            expected.append(alone(model, processor, prompt, max_tokens=24, ignore_eos=True))
    engine = Engine(model, processor, max_concurrency=len(requests), prefill_chunk=8)
    try:
        results = run(engine, requests)
    finally:
        engine.close()
    kept = drafted = 0
    for (tokens, usage), want, request in zip(results, expected, requests):
        assert tokens == want, request.settings
        if request.settings.draft or request.settings.prompt_lookup:
            assert usage.drafts["verify_steps"] > 0
            kept += usage.drafts["accepted"]
            drafted += usage.drafts["drafted"]
        else:
            assert usage.drafts is None
    assert 0 < kept < drafted
    assert engine.stats.drafted == drafted and engine.stats.draft_accepted == kept


def test_sampled_rows_draw_as_their_runs_alone(drafting):
    _, model, processor = drafting
    settings = dict(max_tokens=16, ignore_eos=True, temp=0.8, top_k=20)
    requests, expected = [], []
    for seed, options in enumerate([{}, {"draft": "mtp", "draft_steps": 2}, {"prompt_lookup": 2}]):
        prompt = PROMPTS[seed]
        requests.append(
            Request(inputs_of(processor, prompt), GenerationSettings(**settings, **options), seed)
        )
        expected.append(alone(model, processor, prompt, seed=seed, **settings, **options))
    engine = Engine(model, processor, max_concurrency=3)
    try:
        results = run(engine, requests)
    finally:
        engine.close()
    assert [t for t, _ in results] == expected


def test_constrained_row_with_drafts(drafting):
    _, model, processor = drafting
    constraint = Constraint("regex", r"(ab ){3,8}")
    settings = dict(max_tokens=20, constraint=constraint)
    want = alone(model, processor, PROMPTS[3], **settings)
    engine = Engine(model, processor, max_concurrency=2)
    try:
        results = run(
            engine,
            [
                Request(
                    inputs_of(processor, PROMPTS[3]),
                    GenerationSettings(**settings, draft="mtp", draft_steps=2),
                ),
                Request(inputs_of(processor, PROMPTS[0]), GenerationSettings(max_tokens=20)),
            ],
        )
    finally:
        engine.close()
    assert results[0][0] == want
    assert results[0][1].drafts["drafted"] > 0


def test_row_from_a_kept_prefix_with_drafts(drafting):
    """The second request starts from the first one's kept prompt: the MTP layer sees only the
    columns run now, the reply is the plain one."""
    _, model, processor = drafting
    first = "Text Recognition: the quick brown fox jumps over the lazy dog " * 2
    second = [{"role": "user", "content": first}, {"role": "assistant", "content": "ok"}]
    second.append({"role": "user", "content": "again, the quick brown fox"})
    settings = dict(max_tokens=20, ignore_eos=True)
    want = alone(model, processor, second, **settings)
    engine = Engine(model, processor, prefill_chunk=8)
    try:
        run(engine, [Request(inputs_of(processor, first), GenerationSettings(**settings))])
        messages = processor.process_messages(second, None, None)
        ((tokens, usage),) = run(
            engine, [Request(messages, GenerationSettings(**settings, draft="mtp"))]
        )
    finally:
        engine.close()
    assert usage.cached_tokens > 0
    assert tokens == want and usage.drafts["drafted"] > 0


def test_server_requests_choose_drafts(drafting, glm4v_checkpoint, tmp_path):
    """The real server: `draft` in a chat completion (and a Responses request) gives the plain
    reply with drafting's figures in usage and /metrics; MTP on a model without the layer is a
    400 naming the field, and the server keeps serving."""
    path = drafting[0]
    server = Server(
        None,
        ["--model", str(path), "--model", str(glm4v_checkpoint[0]), "--max-concurrency", "4"],
        tmp_path / "server.log",
    )
    try:
        body = {
            "model": path.name,
            "messages": [{"role": "user", "content": PROMPTS[1]}],
            "max_tokens": 24,
            "temperature": 0,
            "ignore_eos": True,
        }
        plain = server.post(body).json()
        drafted = server.post({**body, "draft": "mtp", "draft_steps": 2}).json()
        lookup = server.post({**body, "draft": "prompt_lookup"}).json()
        for reply in (drafted, lookup):
            assert reply["choices"][0]["message"] == plain["choices"][0]["message"]
            assert reply["usage"]["drafts"]["verify_steps"] > 0
        assert "drafts" not in plain["usage"]
        refused = server.post({**body, "model": glm4v_checkpoint[0].name, "draft": "mtp"})
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "draft"
        bad = server.post({**body, "draft": "eagle"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "draft"
        response = httpx.post(
            f"{server.url}/v1/responses",
            json={
                "model": path.name,
                "input": PROMPTS[1],
                "max_output_tokens": 24,
                "temperature": 0,
                "draft": "mtp",
            },
            timeout=60,
        ).json()
        assert response["usage"]["drafts"]["drafted"] > 0
        metrics = server.metrics()
        assert metrics["draft_tokens_total"] >= drafted["usage"]["drafts"]["drafted"]
        assert 0 < metrics["draft_acceptance"] < 1
        assert metrics["tokens_per_verify_step"] > 1
        assert server.post(body).json()["choices"][0]["message"] == plain["choices"][0]["message"]
    finally:
        server.close()


@pytest.mark.parametrize(
    "options",
    [
        {"max_kv_size": 40},  # the prompt is ~20 tokens: the cache fills and rotates mid-reply
        {"thinking_budget": 1},
        {"stop": "stop-from-plain"},  # a piece of the plain reply: the reply ends part-way
    ],
    ids=["rotating", "thinking-budget", "stop"],
)
def test_rows_with_drafts_and_options(drafting, options):
    """Drafting rows beside a plain one, each with the option, equal their runs alone."""
    _, model, processor = drafting
    settings = {"max_tokens": 32, "ignore_eos": True, **options}
    if "stop" in options:
        tokens = alone(model, processor, PROMPTS[1], max_tokens=32, ignore_eos=True)
        text = processor.tokenizer.decode(tokens)
        settings["stop"] = [text[len(text) // 2 :][:4]]
    requests, expected = [], []
    for prompt, draft in zip(
        PROMPTS[:3], ({}, {"draft": "mtp"}, {"draft": "mtp", "draft_steps": 3})
    ):
        requests.append(
            Request(inputs_of(processor, prompt), GenerationSettings(**settings, **draft))
        )
        expected.append(alone(model, processor, prompt, **settings))
    engine = Engine(model, processor, max_concurrency=len(requests))
    try:
        results = run(engine, requests)
    finally:
        engine.close()
    assert [t for t, _ in results] == expected
    assert all(u.drafts["drafted"] > 0 for _, u in results[1:])
    if "stop" in options:
        assert len(expected[1]) < 32


def test_cancelled_drafting_row(drafting):
    """A drafting row cancelled part-way through its reply ends as cancelled; the rows beside it
    (drafting and plain) still get their replies alone, and the engine serves the next request."""
    _, model, processor = drafting
    settings = dict(max_tokens=40, ignore_eos=True)
    engine = Engine(model, processor, max_concurrency=3)
    try:
        doomed = engine.submit(
            Request(
                inputs_of(processor, PROMPTS[0]),
                GenerationSettings(**settings, draft="mtp", draft_steps=2),
            )
        )
        others = [
            Request(inputs_of(processor, PROMPTS[1]), GenerationSettings(**settings, draft="mtp")),
            Request(inputs_of(processor, PROMPTS[2]), GenerationSettings(**settings)),
        ]
        handles = [engine.submit(r) for r in others]
        events = iter(doomed)
        seen = [next(events) for _ in range(3)]
        doomed.cancel()
        rest = list(events)
        assert rest[-1].finish_reason == "cancelled"
        assert len([e for e in seen + rest if e.token is not None]) < 40
        for h, prompt in zip(handles, PROMPTS[1:3]):
            events = list(h)
            assert events[-1].finish_reason == "length"
            assert [e.token for e in events if e.token is not None] == alone(
                model, processor, prompt, **settings
            )
        ((tokens, usage),) = run(
            engine,
            [
                Request(
                    inputs_of(processor, PROMPTS[3]), GenerationSettings(**settings, draft="mtp")
                )
            ],
        )
        assert tokens == alone(model, processor, PROMPTS[3], **settings)
    finally:
        engine.close()


class WatchedEngine(Engine):
    """The engine with a look at each drafting row's caches after every decided round."""

    def __init__(self, *args, **kwargs):
        # (drafted, kept, columns the model's cache holds past a kept prefix, the MTP layer's)
        self.rounds = []
        super().__init__(*args, **kwargs)

    def _decide(self, rows):
        before = {id(r): (r.drafts.stats.drafted, r.drafts.stats.accepted) for r in rows}
        decided = super()._decide(rows)
        for row, _ in decided:
            if row.drafts is not None and row.drafts.mtp is not None:
                drafted, kept = (
                    now - was
                    for now, was in zip(
                        (row.drafts.stats.drafted, row.drafts.stats.accepted), before[id(row)]
                    )
                )
                run = row.cache.offset - row.usage.cached_tokens
                self.rounds.append((drafted, kept, run, row.drafts.mtp.cache.offset))
        return decided


def test_mtp_cache_rolls_back_with_the_model_cache(drafting):
    """After every round, kept or rejected, the MTP layer's cache holds one entry per column the
    model's cache holds (past a kept prefix, which the layer never ran): its chained columns
    dropped, the kept ones rerun from the model's states. A rollback that left or dropped one
    too many would only cost acceptance, never the reply, so only this sees it."""
    _, model, processor = drafting
    engine = WatchedEngine(model, processor, max_concurrency=3)
    try:
        run(
            engine,
            [
                Request(
                    inputs_of(processor, prompt),
                    GenerationSettings(max_tokens=24, ignore_eos=True, draft="mtp", draft_steps=k),
                )
                for prompt, k in zip(PROMPTS, (1, 2, 3))
            ],
        )
    finally:
        engine.close()
    rejected = [r for r in engine.rounds if r[1] < r[0]]
    assert rejected and any(r[0] > 1 for r in rejected)
    assert any(0 < r[1] < r[0] for r in engine.rounds)  # part of a chain kept
    assert all(run == mtp_offset for *_, run, mtp_offset in engine.rounds)
    assert any(r[0] > 1 and r[1] == 0 for r in rejected)
