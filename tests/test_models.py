"""Several models in one server (serving/registry.py, server/models.py).

Two tiny GLM-4.1V checkpoints built by transformers with different seeds. Real server processes:
the second model loads on its first request and answers as a server of its own does, unloads after
its time-to-live and after Ollama's `keep_alive: 0`, gives MLX's memory back (read from /metrics),
makes way for another under a budget that fits one, and a budget that fits none answers 503 with
Retry-After in each client's shape. In-process: 50 load/unload cycles leave memory flat; the
models file and the options are checked.
"""

import gc
import json
import re
import subprocess
import sys
import time

import httpx
import mlx.core as mx
import pytest
import tiny
from mlx.utils import tree_flatten
from servers import ROOT, Server

from mlx_glm4v.checkpoints.loader import load, resolve
from mlx_glm4v.errors import Glm4vError
from mlx_glm4v.generation.messages import build_messages
from mlx_glm4v.generation.settings import GenerationSettings
from mlx_glm4v.serving.engine import Engine, Request
from mlx_glm4v.serving.registry import ModelSpec, Registry, duration, read_models_file

ollama = pytest.importorskip("ollama")

HI = [{"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two tiny checkpoints of one shape, different weights (seeds 0 and 1)."""
    paths = []
    for seed in (0, 1):
        path = tmp_path_factory.mktemp(f"tiny-seed{seed}")
        tiny.build_checkpoint(path, seed=seed)
        paths.append(path)
    return paths


def models_file(tmp_path, models) -> str:
    path = tmp_path / "models.json"
    path.write_text(json.dumps(models))
    return str(path)


def memory(server) -> tuple:
    m = server.metrics()
    return m["mlx_active_memory_bytes"], m["mlx_cache_memory_bytes"]


def loaded(server) -> list:
    return [m["name"] for m in httpx.get(f"{server.url}/api/ps", timeout=10).json()["models"]]


def wait_loaded(server, names, seconds=15.0) -> float:
    """Poll /api/ps until exactly `names` are loaded; the seconds it took."""
    start = time.monotonic()
    while loaded(server) != names:
        assert time.monotonic() - start < seconds, loaded(server)
        time.sleep(0.05)
    return time.monotonic() - start


def greedy(server, model, tokens=8) -> str:
    out = server.client.chat.completions.create(
        model=model, messages=HI, max_completion_tokens=tokens, temperature=0
    )
    return out.choices[0].message.content


@pytest.fixture(scope="module")
def alone(pair, tmp_path_factory):
    """The second checkpoint served on its own, as today."""
    server = Server(pair[1], [], tmp_path_factory.mktemp("alone") / "s.log")
    yield server
    server.close()


@pytest.fixture(scope="module")
def two(pair, tmp_path_factory):
    """`a` pinned (loaded at start), `b` on demand with a 1 s time-to-live."""
    tmp = tmp_path_factory.mktemp("two")
    file = models_file(
        tmp,
        [
            {"name": "a", "path": str(pair[0]), "pin": True},
            {"name": "b", "path": str(pair[1]), "keep_alive": "1s"},
        ],
    )
    server = Server(None, ["--models", file], tmp / "s.log")
    server.ollama = ollama.Client(host=server.url, timeout=60)
    yield server
    server.close()


def test_second_model_loads_on_demand_and_unloads_after_its_keep_alive(two, alone):
    """The reply of the model loaded on demand equals its own server's; after its 1 s keep-alive
    MLX's active memory is back within 5% of the one-model baseline."""
    assert loaded(two) == ["a"]
    listed = httpx.get(f"{two.url}/v1/models", timeout=10).json()["data"]
    assert [(m["id"], m["loaded"]) for m in listed] == [("a", True), ("b", False)]
    tags = two.ollama.list().models
    assert [m.model for m in tags] == ["a", "b"] and all(m.size > 0 for m in tags)
    baseline, baseline_cache = memory(two)

    assert greedy(two, "b") == greedy(alone, alone.model)
    assert loaded(two) == ["a", "b"]
    active, _ = memory(two)
    assert active > baseline * 1.05  # b's weights are in
    took = wait_loaded(two, ["a"])
    assert took < 5
    after, after_cache = memory(two)
    print(
        f"one-model baseline {baseline} B active, {baseline_cache} B cache; with b {active} B; "
        f"after b's keep-alive {after} B active, {after_cache} B cache (unloaded {took:.2f} s "
        "after its reply)"
    )
    assert abs(after - baseline) <= 0.05 * baseline
    assert after_cache <= baseline_cache * 1.05 + (1 << 20)
    # a model that was unloaded loads again on demand, with the same reply
    assert greedy(two, "b") == greedy(alone, alone.model)


def test_ollama_keep_alive_zero_unloads_after_the_reply(two):
    reply = two.ollama.chat("b", HI, keep_alive=0, options={"temperature": 0, "num_predict": 4})
    assert reply.done
    assert wait_loaded(two, ["a"]) < 5
    # a pinned model stays whatever a request asks
    two.ollama.chat("a", HI, keep_alive=0, options={"temperature": 0, "num_predict": 2})
    time.sleep(0.3)
    assert loaded(two) == ["a"]


def test_unknown_model_is_named(two):
    r = two.post({"model": "c", "messages": HI, "max_tokens": 2})
    assert r.status_code == 404
    assert (
        r.json()["error"]["message"] == "the model 'c' does not exist; this server runs 'a', 'b'."
    )
    r = httpx.post(f"{two.url}/api/chat", json={"model": "c", "messages": HI}, timeout=10)
    assert r.status_code == 404 and "'a', 'b'" in r.json()["error"]


def test_a_budget_for_one_unloads_the_idle_model(pair, tmp_path):
    """With room for one model, asking for the other unloads the idle one (least recently used)."""
    size = sum(f.stat().st_size for f in pair[0].glob("*.safetensors"))
    budget = 1.5 * size / 1e9
    server = Server(
        pair[0],
        ["--model", str(pair[1]), "--max-memory-gb", f"{budget:.9f}"],
        tmp_path / "s.log",
    )
    try:
        a, b = pair[0].name, pair[1].name
        assert loaded(server) == []  # several models: none loads before it is asked for
        first = greedy(server, a)
        assert loaded(server) == [a]
        greedy(server, b)
        assert loaded(server) == [b]
        assert greedy(server, a) == first and loaded(server) == [a]
        log = (tmp_path / "s.log").read_text()
        assert f"model {a} unloaded to make room for {b}" in log
    finally:
        server.close()


def test_a_budget_too_small_for_any_model_is_a_503_with_retry_after(pair, tmp_path):
    server = Server(
        pair[0], ["--model", str(pair[1]), "--max-memory-gb", "0.000001"], tmp_path / "s.log"
    )
    try:
        model = pair[1].name
        r = server.post({"model": model, "messages": HI, "max_tokens": 2})
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
        error = r.json()["error"]
        assert error["type"] == "service_unavailable" and error["code"] == "no_memory"
        assert re.fullmatch(
            rf"the model '{model}' needs about 0\.\d\d GB, over the server's memory budget of "
            r"0\.00 GB \(--max-memory-gb\)\.",
            error["message"],
        )
        r = httpx.post(f"{server.url}/api/chat", json={"model": model, "messages": HI}, timeout=10)
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
        assert r.json() == {"error": error["message"]}
        with pytest.raises(ollama.ResponseError) as e:
            ollama.Client(host=server.url).chat(model, HI)
        assert e.value.status_code == 503
        assert (
            loaded(server) == [] and server.post({"model": "x", "messages": HI}).status_code == 404
        )
    finally:
        server.close()


# ---- in-process ----------------------------------------------------------------------------------


class Loaded:
    def __init__(self, spec, directory):
        model, processor = load(str(directory))
        self.engine = Engine(model, processor)
        self.weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))

    def close(self):
        self.engine.close(cancel=True)


def test_fifty_load_unload_cycles_keep_memory_flat(pair):
    """Each cycle loads the model, runs a request, releases it with keep_alive 0 (the registry's
    own thread unloads it); MLX's active and cache memory stay within 5% of the first cycle's."""
    registry = Registry([ModelSpec("a", str(pair[0]))], Loaded, resolve, budget=1 << 30)
    gc.freeze()  # the unload's gc.collect() skips torch's and transformers' objects (seconds)
    try:
        mx.clear_cache()
        before = mx.get_active_memory()
        after = []
        start = time.perf_counter()
        for _ in range(50):
            entry = registry.acquire("a")
            engine = entry.loaded.engine
            messages = build_messages("Hi there", [], [])
            inputs = engine.processor.process_messages(messages)
            handle = engine.submit(Request(inputs, GenerationSettings(max_tokens=3)))
            assert list(handle)[-1].finish_reason in ("stop", "length")
            del engine, handle
            registry.release(entry, 0)
            deadline = time.monotonic() + 10
            while registry.unloads < len(after) + 1:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            after.append((mx.get_active_memory(), mx.get_cache_memory()))
        seconds = time.perf_counter() - start
    finally:
        gc.unfreeze()
        registry.close()
    (active_1, cache_1), (active_50, cache_50) = after[0], after[-1]
    print(
        f"50 cycles in {seconds:.1f} s: active {before} B before, {active_1} B after the first, "
        f"{active_50} B after the 50th; cache {cache_1} B then {cache_50} B"
    )
    assert abs(active_1 - before) <= 0.05 * before
    assert max(a for a, _ in after) <= active_1 * 1.05
    assert max(c for _, c in after) <= cache_1 * 1.05 + (1 << 20)


def test_durations_and_the_models_file(tmp_path):
    assert [duration(v) for v in (5, "5", "1.5s", "5m", "1h30m", "-1", -3, "250ms")] == [
        5.0,
        5.0,
        1.5,
        300.0,
        5400.0,
        -1.0,
        -1.0,
        0.25,
    ]
    for bad in ("forever", "", "5 m", True, None):
        with pytest.raises(ValueError):
            duration(bad)
    path = tmp_path / "models.json"
    path.write_text(
        json.dumps(
            [
                {"path": "/m/GLM-OCR"},
                {"name": "f", "path": "a/b", "pin": True},
                {"path": "/m/GLM-OCR", "adapter": "/a/forms"},
            ]
        )
    )
    specs = read_models_file(path)
    assert [(s.name, s.path, s.pin, s.adapter) for s in specs] == [
        ("GLM-OCR", "/m/GLM-OCR", False, None),
        ("f", "a/b", True, None),
        ("GLM-OCR+forms", "/m/GLM-OCR", False, "/a/forms"),
    ]
    refused = {
        "{": "is not valid JSON",
        "{}": "must hold a JSON list of models",
        '[{"name": "x"}]': "model 0: `path` (a checkpoint directory or repo id) is required.",
        '[{"path": "x", "pinned": true}]': "model 0: unknown field 'pinned'",
        '[{"path": "x", "keep_alive": "soon"}]': "model 0: `keep_alive` 'soon' is not seconds",
        '[{"path": "x", "kv_bits": 7}]': "model 0: `kv_bits` 7 is not one of 2, 3, 4, 5, 6, 8.",
        '[{"path": "x", "adapter": 3}]': "model 0: `adapter` must be an adapter directory's path.",
    }
    for text, message in refused.items():
        path.write_text(text)
        with pytest.raises(Glm4vError, match=re.escape(message)):
            read_models_file(path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "a/b", "--model", "c/d", "--alias", "x"], "--alias names one model"),
        (["--model", "x/m", "--model", "y/m"], "two models are named 'm' (x/m and y/m)"),
        (["--keep-alive", "soon"], "--keep-alive 'soon' is not seconds or a duration"),
        (["--max-memory-gb", "0"], "--max-memory-gb 0.0 must be positive."),
        (["--models", "/nonexistent/models.json"], "--models /nonexistent/models.json: cannot"),
    ],
)
def test_serve_refuses_bad_model_options(args, message):
    out = subprocess.run(
        [sys.executable, "-m", "mlx_glm4v", "serve", *args],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert out.returncode != 0 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
