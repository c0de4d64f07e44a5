"""The batching engine: every row's output is the one it gets alone, whoever shares the batch.

"Alone" is a fresh engine serving one request; the concurrent runs share one engine (prefix
cache on), so prompt prefixes reused from earlier requests are checked too. Greedy replies are
also checked against transformers, and seeded samples against `stream_generate` with the seed.
"""

import threading
import time

import mlx.core as mx
import numpy as np
import pytest
from helpers import clip, cut_attention, picture
from reference import ref_generate

from mlx_glm4v.checkpoints.loader import load
from mlx_glm4v.errors import Glm4vError
from mlx_glm4v.generation.generate import generate, stream_generate
from mlx_glm4v.generation.messages import build_messages
from mlx_glm4v.generation.settings import GenerationSettings
from mlx_glm4v.inputs.video import Video
from mlx_glm4v.serving.engine import Engine, QueueFull, Request, batch_generate, kv_bytes_per_token
from mlx_glm4v.serving.prefix import PrefixCache


@pytest.fixture(scope="module")
def setup(glm4v_checkpoint, tmp_path_factory):
    path, ref, hf = glm4v_checkpoint
    model, processor = load(path)
    media = tmp_path_factory.mktemp("engine-media")
    small, large = media / "small.png", media / "large.png"
    picture(56, 84, 3).save(small)
    picture(112, 140, 4).save(large)
    return dict(
        ref=ref,
        hf=hf,
        model=model,
        processor=processor,
        small=small,
        large=large,
        frames=clip(4, 56, 56, 5),
    )


def inputs_of(s, prompt, images=(), videos=(), system=None):
    processor = s["processor"]
    messages = build_messages(prompt, images, videos, system)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    media_images, media_videos = processor.media_from_messages(messages)
    return processor(text, images=media_images, videos=media_videos)


def mixed_requests(s):
    """Text, one image, two images of different sizes, a video; different lengths, temperatures
    and seeds."""
    video = Video(s["frames"], fps=2.0)
    cases = [
        (dict(prompt="Hello! How are you today?"), dict(max_tokens=14)),
        (dict(prompt="The quick brown fox jumps over the lazy dog. " * 6), dict(max_tokens=9)),
        (dict(prompt="Describe this image.", images=[s["small"]]), dict(max_tokens=12)),
        (dict(prompt="Compare them.", images=[s["small"], s["large"]]), dict(max_tokens=10)),
        (dict(prompt="What happens?", videos=[video]), dict(max_tokens=11)),
        (
            dict(prompt="A cat sits on a red sofa.", images=[s["large"]]),
            dict(max_tokens=16, temp=0.9),
        ),
        (dict(prompt="Tell me the time."), dict(max_tokens=13, temp=1.2, top_p=0.9)),
        (
            dict(prompt="Count the frames.", system="Be brief."),
            dict(max_tokens=15, temp=0.7, top_k=20, min_p=0.05),
        ),
    ]
    return [
        Request(inputs_of(s, **p), GenerationSettings(ignore_eos=True, **g), seed=i, top_logprobs=2)
        for i, (p, g) in enumerate(cases)
    ]


def collect(handle):
    events = list(handle)
    return dict(
        tokens=[e.token for e in events if e.token is not None],
        text="".join(e.text for e in events),
        logprobs=[(e.logprob, e.top_logprobs) for e in events if e.token is not None],
        finish=events[-1].finish_reason,
        usage=events[-1].usage,
    )


# Prompts run in chunks of this many tokens, so long ones (the video, two images) are prefilled
# over several engine steps while other rows decode.
CHUNK = 32


def run_alone(s, request):
    engine = Engine(
        s["model"], s["processor"], max_concurrency=1, prefix_cache_bytes=0, prefill_chunk=CHUNK
    )
    try:
        return collect(engine.submit(request))
    finally:
        engine.close()


def run_together(s, requests, concurrency):
    engine = Engine(s["model"], s["processor"], max_concurrency=concurrency, prefill_chunk=CHUNK)
    try:
        handles = [engine.submit(r) for r in requests]
        results = [collect(h) for h in handles]
    finally:
        engine.close()
    return results, engine.stats


@pytest.fixture(scope="module")
def alone(setup):
    requests = mixed_requests(setup)
    return requests, [run_alone(setup, r) for r in requests]


def same(a, b):
    return a["tokens"] == b["tokens"] and a["text"] == b["text"] and a["logprobs"] == b["logprobs"]


@pytest.mark.parametrize("concurrency", [1, 3, 8])
def test_rows_equal_their_runs_alone(setup, alone, concurrency):
    requests, expected = alone
    results, stats = run_together(setup, requests, concurrency)
    for i, (got, want) in enumerate(zip(results, expected)):
        assert same(got, want), f"request {i} differs at concurrency {concurrency}"
        assert got["finish"] == "length" and len(got["tokens"]) == requests[i].settings.max_tokens
    assert max(len(np.asarray(r.inputs["input_ids"]).reshape(-1)) for r in requests) > 4 * CHUNK
    if concurrency > 1:
        assert stats.decode_rows / stats.decode_steps > 1.5  # rows really shared decode steps
        assert stats.cached_tokens > 0  # the chat template's start was reused


def test_greedy_rows_equal_transformers(setup, alone):
    from PIL import Image

    requests, results = alone
    text_tokens, _ = ref_generate(
        setup, [{"role": "user", "content": "Hello! How are you today?"}], steps=14
    )
    assert results[0]["tokens"] == text_tokens
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare them."}]
    image_tokens, _ = ref_generate(
        setup,
        [{"role": "user", "content": content}],
        steps=10,
        images=[Image.open(setup["small"]), Image.open(setup["large"])],
    )
    assert results[3]["tokens"] == image_tokens


def test_seeded_rows_sample_as_stream_generate(setup, alone):
    requests, results = alone
    reply = stream_generate(
        setup["model"],
        setup["processor"],
        "A cat sits on a red sofa.",
        images=[setup["large"]],
        seed=5,
        max_tokens=16,
        temp=0.9,
        ignore_eos=True,
    )
    assert [r.token for r in reply if r.token is not None] == results[5]["tokens"]


def wait_for_tokens(handle, n, into):
    """Read a handle's events on a thread; return once n tokens have come."""
    got = threading.Event()

    def read():
        for event in handle:
            into.append(event)
            if sum(e.token is not None for e in into) >= n:
                got.set()
        got.set()

    thread = threading.Thread(target=read)
    thread.start()
    assert got.wait(60)
    return thread


def test_rows_join_and_leave_mid_batch(setup, alone):
    requests, expected = alone
    engine = Engine(setup["model"], setup["processor"], max_concurrency=8, prefill_chunk=CHUNK)
    try:
        first = []
        # running before the others arrive
        reader = wait_for_tokens(engine.submit(requests[0]), 3, first)
        late = [engine.submit(requests[i]) for i in (2, 4)]
        stop_text = expected[6]["text"][2:5]
        stopping = engine.submit(
            Request(
                requests[6].inputs,
                GenerationSettings(
                    max_tokens=13, temp=1.2, top_p=0.9, ignore_eos=True, stop=[stop_text]
                ),
                seed=6,
                top_logprobs=2,
            )
        )
        cancelled_events = []
        cancelled = engine.submit(
            Request(requests[1].inputs, GenerationSettings(max_tokens=200, ignore_eos=True))
        )
        cancelled_reader = wait_for_tokens(cancelled, 2, cancelled_events)
        cancelled.cancel()
        reader.join(60)
        cancelled_reader.join(60)
        results = [collect(h) for h in late]
        stopped = collect(stopping)
    finally:
        engine.close()
    assert cancelled_events[-1].finish_reason == "cancelled"
    assert sum(e.token is not None for e in cancelled_events) < 200
    assert "".join(e.text for e in first) == expected[0]["text"]
    assert [e.token for e in first if e.token is not None] == expected[0]["tokens"]
    assert all(same(got, expected[i]) for got, i in zip(results, (2, 4)))
    assert stopped["finish"] == "stop"
    assert stopped["text"] == expected[6]["text"][: expected[6]["text"].index(stop_text)]
    assert stopped["tokens"] == expected[6]["tokens"][: len(stopped["tokens"])]


def test_queue_limit_refuses_and_loses_nothing(setup, alone):
    requests, expected = alone
    engine = Engine(
        setup["model"], setup["processor"], max_concurrency=1, max_queue=2, prefill_chunk=CHUNK
    )
    accepted, refused = [], None
    try:
        for i in (0, 2, 6, 7, 1):
            try:
                accepted.append((i, engine.submit(requests[i])))
            except QueueFull as e:
                refused = e
                break
        assert refused is not None and refused.retry_after >= 1
        accepted[-1][1].cancel()  # a cancelled request gives its place in the queue back
        deadline, late = time.time() + 30, None
        while late is None and time.time() < deadline:
            try:
                late = engine.submit(requests[3])
            except QueueFull:
                time.sleep(0.05)
        results = [(i, collect(h)) for i, h in accepted[:-1] + [(3, late)]]
        withdrawn = collect(accepted[-1][1])
    finally:
        engine.close()
    assert 2 <= len(accepted) <= 3 and engine.stats.rejected >= 1
    assert withdrawn["finish"] == "cancelled" and withdrawn["tokens"] == []
    assert all(same(got, expected[i]) for i, got in results)


def test_a_shared_prefix_is_reused_and_changes_nothing(setup):
    system = "You describe pictures carefully. " * 8
    first = Request(
        inputs_of(setup, "What is shown?", images=[setup["large"]], system=system),
        GenerationSettings(max_tokens=8, ignore_eos=True),
    )
    second = Request(
        inputs_of(setup, "What colour is it?", images=[setup["large"]], system=system),
        GenerationSettings(max_tokens=8, ignore_eos=True),
    )
    other_image = Request(
        inputs_of(setup, "What colour is it?", images=[setup["small"]], system=system),
        GenerationSettings(max_tokens=8, ignore_eos=True),
    )
    engine = Engine(setup["model"], setup["processor"], prefill_chunk=CHUNK)
    try:
        collect(engine.submit(first))
        reused, different = collect(engine.submit(second)), collect(engine.submit(other_image))
    finally:
        engine.close()
    ids = np.asarray(second.inputs["input_ids"]).reshape(-1)
    image_end = int(np.flatnonzero(ids == setup["model"].config.image_end_token_id)[0])
    assert reused["usage"].cached_tokens > image_end  # system prompt and image
    # another image of the same size: not reused
    assert different["usage"].cached_tokens < image_end
    assert same(reused, run_alone(setup, second))
    assert same(different, run_alone(setup, other_image))


def test_prefix_measured_by_tokens_as_by_arrays(setup):
    """Several ranks size kept prefixes by tokens (the whole model's KV bytes per token), so that
    all keep the same ones; in one process that measure is exactly the arrays' bytes."""
    model, processor = setup["model"], setup["processor"]
    inputs = inputs_of(setup, "Hello! How are you today?")
    cache = GenerationSettings().new_cache(model, processor, inputs["input_ids"])
    mx.eval(model(mx.array(inputs["input_ids"]), cache=cache))
    ids = np.asarray(inputs["input_ids"]).reshape(-1)
    by_arrays, by_tokens = PrefixCache(1 << 30), PrefixCache(1 << 30, kv_bytes_per_token(model))
    by_arrays.store(ids, None, cache)
    by_tokens.store(ids, None, cache)
    assert by_tokens.nbytes == by_arrays.nbytes == kv_bytes_per_token(model) * len(ids) > 0


def test_batch_generate_equals_generate(setup):
    prompts = ["Describe this image.", "Compare them.", "Hello!"]
    images = [[setup["small"]], [setup["small"], setup["large"]], []]
    texts = batch_generate(setup["model"], setup["processor"], prompts, images, max_tokens=10)
    assert texts == [
        generate(setup["model"], setup["processor"], p, images=i, max_tokens=10)
        for p, i in zip(prompts, images)
    ]


def test_rotating_and_quantized_caches_in_one_batch(setup, alone):
    requests, expected = alone
    inputs = requests[0].inputs
    rotating = Request(
        inputs, GenerationSettings(max_tokens=30, max_kv_size=40, ignore_eos=True), top_logprobs=1
    )
    quantized = Request(
        inputs,
        GenerationSettings(max_tokens=12, kv_bits=8, kv_group_size=32, ignore_eos=True),
        top_logprobs=1,
    )
    refs = [run_alone(setup, r) for r in (rotating, quantized)]
    results, _ = run_together(setup, [rotating, quantized, requests[2]], 3)
    assert same(results[0], refs[0]) and same(results[1], refs[1]) and same(results[2], expected[2])
    assert (
        results[1]["tokens"] != expected[0]["tokens"][:12]
        or results[1]["logprobs"] != expected[0]["logprobs"][:12]
    )


def test_a_failing_request_leaves_the_others_alone(setup, alone):
    requests, expected = alone
    # smaller than the image
    broken = Request(requests[2].inputs, GenerationSettings(max_tokens=5, max_kv_size=2))
    results, stats = run_together(setup, [requests[0], broken, requests[2]], 3)
    assert results[1]["finish"] == "error" and stats.errors == 1
    assert same(results[0], expected[0]) and same(results[2], expected[2])


def test_other_mlx_work_runs_on_the_engine_thread_between_turns(setup, alone):
    """`Engine.call`: a job runs on the engine's own thread (MLX from one thread), between the
    turns of running rows, which it leaves as they were; its failure is the caller's."""
    requests, expected = alone
    engine = Engine(setup["model"], setup["processor"], max_concurrency=3, prefill_chunk=CHUNK)
    try:
        handles = [engine.submit(r) for r in requests[:3]]

        def job(x):
            return threading.current_thread().name, np.array(mx.sum(mx.array(x) * 2)).item()

        jobs = [engine.call(job, [i, 1.0]) for i in range(5)]
        failing = engine.call(lambda: 1 / 0)
        results = [collect(h) for h in handles]
        assert [j.result(timeout=60) for j in jobs] == [
            ("mlx-glm4v-engine", 2.0 * (i + 1)) for i in range(5)
        ]
        with pytest.raises(ZeroDivisionError):
            failing.result(timeout=60)
        assert engine.call(job, [2.0]).result(timeout=60) == ("mlx-glm4v-engine", 4.0)  # idle
    finally:
        engine.close()
    assert all(same(got, want) for got, want in zip(results, expected[:3]))
    with pytest.raises(Glm4vError):
        engine.call(job, [1.0])


def test_experts_model_rows_equal_their_runs_alone(glm4v_moe_checkpoint, tmp_path):
    path, _, _ = glm4v_moe_checkpoint
    model, processor = load(path)
    picture(56, 84, 7).save(tmp_path / "p.png")
    s = dict(model=model, processor=processor)
    requests = [
        Request(
            inputs_of(s, p, images=i),
            GenerationSettings(max_tokens=10, ignore_eos=True, temp=t),
            seed=3,
            top_logprobs=1,
        )
        for p, i, t in (
            ("Hello there!", (), 0.0),
            ("Describe it.", [tmp_path / "p.png"], 0.0),
            ("Tell me the time.", (), 0.8),
        )
    ]
    expected = [run_alone(s, r) for r in requests]
    results, _ = run_together(s, requests, 3)
    assert all(same(a, b) for a, b in zip(results, expected))


@pytest.mark.parametrize("family", ["glm_ocr", "glmga"])
def test_other_families_rows_equal_their_runs_alone(family, request, tmp_path):
    """GLM-OCR (head_dim wider than hidden/heads, full rotary, its MTP layer loaded and idle) and
    glmga through the engine: the mixed requests (prompts prefilled in chunks, images, a video,
    sampling) share batches, reuse the template's prefix, and each equals its run alone;
    batch_generate equals generate."""
    path = request.getfixturevalue(f"{family}_checkpoint")[0]
    model, processor = load(path)
    picture(56, 84, 3).save(tmp_path / "small.png")
    picture(112, 140, 4).save(tmp_path / "large.png")
    s = dict(
        model=model,
        processor=processor,
        small=tmp_path / "small.png",
        large=tmp_path / "large.png",
        frames=clip(4, 56, 56, 5),
    )
    requests = mixed_requests(s)
    expected = [run_alone(s, r) for r in requests]
    results, stats = run_together(s, requests, 3)
    for i, (got, want) in enumerate(zip(results, expected)):
        assert same(got, want), f"{family}: request {i} differs in a batch"
    assert stats.decode_rows / stats.decode_steps > 1.5 and stats.cached_tokens > 0
    prompts, images = ["Describe this image.", "Hello!"], [[s["small"]], []]
    assert batch_generate(model, processor, prompts, images, max_tokens=8) == [
        generate(model, processor, p, images=i, max_tokens=8) for p, i in zip(prompts, images)
    ]
    # the KV estimate kept prefixes are sized by (head_dim, not hidden/heads) is the arrays' bytes
    ids = np.asarray(requests[1].inputs["input_ids"]).reshape(-1)
    cache = GenerationSettings().new_cache(model, processor, ids[None])
    mx.eval(model(mx.array(ids[None]), cache=cache))
    kept = PrefixCache(1 << 30)
    kept.store(ids, None, cache)
    assert kept.nbytes == kv_bytes_per_token(model) * len(ids)


def test_serving_benchmark_runs_in_process(tmp_path):
    """benchmarks/serve_bench.py kept working (a tiny checkpoint, a few tokens; not a timed
    test)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import serve_bench

    rows = serve_bench.main(
        [
            "--in-process",
            "--tiny",
            "--blas",
            "bundled",
            "--sets",
            "mixed,decode",
            "--clients",
            "1,3",
            "--sequential",
            "3",
            "--work",
            str(tmp_path),
        ]
    )
    assert [(r["set"], r["clients"]) for r in rows] == [
        ("mixed", 1),
        ("mixed", 3),
        ("decode", 1),
        ("decode", 3),
    ]
    assert all(r["tokens"] == r["requests"] * (8 if r["set"] == "mixed" else 16) for r in rows)
    assert [r["identical"] for r in rows] == [None, True, None, True]


def test_stall_benchmark_runs(tmp_path):
    """serve_bench.py's stall set through real servers (a tiny checkpoint; not a timed test): every
    token of the stream timed, the three replies their solo runs'."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import serve_bench

    (row,) = serve_bench.main(
        ["--tiny", "--blas", "bundled", "--sets", "stall", "--work", str(tmp_path)]
    )
    assert row["identical"] is True
    assert 0 < row["gap_p50"] <= row["gap_p99"] <= row["gap_max"]
    assert all(row[k] > 0 for k in ("question_ttft", "question_alone", "clip_ttft", "clip_alone"))


def first_token_at(result):
    usage = result["usage"]
    return usage.queued + usage.time_to_first_token  # since submission


@pytest.mark.parametrize("cut", ["layers", "heads"])
def test_a_long_video_and_short_requests_interleave(setup, monkeypatch, cut):
    """Prefilling rows take turns piece by piece: the short requests start long before the video's
    last vision piece, and every reply is its solo run's, though here each prompt chunk also runs
    one decoder layer (or, cut by heads, one attention head) a piece where alone it ran whole."""
    video = Video(clip(8, 84, 112, 6), fps=2.0)
    long_ = Request(
        inputs_of(setup, "What happens in this clip?", videos=[video]),
        GenerationSettings(max_tokens=8, ignore_eos=True),
        seed=1,
        top_logprobs=1,
    )
    short = [
        Request(
            inputs_of(setup, p), GenerationSettings(max_tokens=6, ignore_eos=True, temp=0.8), seed=i
        )
        for i, p in enumerate(("Hi!", "What is two plus two?"))
    ]
    expected = [run_alone(setup, r) for r in [long_] + short]
    # a 32-token chunk: one layer a piece
    monkeypatch.setattr("mlx_glm4v.serving.engine.TEXT_PIECE_WORK", CHUNK)
    if cut == "heads":  # and its attention (the video's frames' too) one head a piece
        cut_attention(monkeypatch, 16)
    engine = Engine(
        setup["model"],
        setup["processor"],
        max_concurrency=3,
        prefill_chunk=CHUNK,
        # one piece a turn: a temporal group through a block
        max_stall_ms=0.001,
        vision_piece=(1, 1),
    )
    try:
        handles = [engine.submit(r) for r in [long_] + short]
        results = [collect(h) for h in handles]
    finally:
        engine.close()
    assert all(same(a, b) for a, b in zip(results, expected))
    heads = setup["model"].visual.blocks[0].attn.num_heads if cut == "heads" else 1
    assert engine.stats.vision_pieces == 4 * len(setup["model"].visual.blocks) * heads
    turns = list(engine.stats.turns)
    assert max(n for n, _ in turns) == 1
    pieces, layers = sum(n for n, _ in turns), len(setup["model"].layers)
    assert pieces > engine.stats.vision_pieces + engine.stats.prefill_chunks  # chunks in layers
    # in heads
    assert (
        cut == "layers"
        or pieces > engine.stats.vision_pieces + engine.stats.prefill_chunks * layers
    )
    assert all(first_token_at(r) < first_token_at(results[0]) for r in results[1:])


class StubCosts:
    """Every piece costs what this says, on a clock the test moves: 25 ms a token-layer, 1 ms a
    patch-block."""

    rate = {"text": 0.025, "vision": 0.001, "attention": 1e-6}

    def __init__(self):
        self.now = 0.0

    def estimate(self, kind, size):
        return self.rate[kind] * size

    def measured(self, kind, size, seconds):
        # the stub clock moved by exactly the stub cost
        assert abs(seconds - self.estimate(kind, size)) < 1e-9


@pytest.mark.parametrize("cut", ["layers", "heads"])
def test_the_stall_budget_holds_with_a_stub_cost_model(setup, alone, monkeypatch, cut):
    requests, expected = alone
    if cut == "heads":  # attention a head a piece, images and prompt chunks alike
        cut_attention(monkeypatch, 16)
    costs = StubCosts()
    engine = Engine(
        setup["model"],
        setup["processor"],
        max_concurrency=8,
        prefill_chunk=CHUNK,
        max_stall_ms=700,
        costs=costs,
        clock=lambda: costs.now,
        vision_piece=(16, 16),
    )
    prefill, steps = engine._prefill, []

    def timed(row):  # a piece takes its stub cost on the stub clock
        kind, size = engine._next_piece(row)
        prefill(row)
        costs.now += costs.estimate(kind, size)
        steps.append((kind, costs.estimate(kind, size)))

    engine._prefill = timed
    try:
        results = [collect(h) for h in [engine.submit(r) for r in requests]]
    finally:
        engine.close()
    assert all(same(a, b) for a, b in zip(results, expected))
    turns, first = list(engine.stats.turns), 0
    assert sum(n for n, _ in turns) == len(steps)
    # the budget holds: a turn's last piece started where half of it still fit
    for n, seconds in turns:
        last = steps[first + n - 1][1]
        assert n == 1 or seconds - last / 2 <= 0.7 + 1e-9, (n, seconds, last)
        first += n
    # it packs, and moves
    assert any(n > 1 for n, _ in turns) and any(seconds > 0.7 for n, seconds in turns if n == 1)
    assert {"text", "vision" if cut == "layers" else "attention"} <= {kind for kind, _ in steps}
