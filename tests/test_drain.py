"""SIGTERM on a real server under 8 concurrent streaming clients: `/health` says 503 at once, a
new request in every dialect gets a 503 with Retry-After in that dialect's shape, the running
streams finish whole, and the process exits 0; past --drain-timeout the rest are cut, and their
clients are told."""

import json
import signal
import threading
import time

import httpx
from servers import Server

CLIENTS = 8


def stream(server, max_tokens, out: dict, started: threading.Event):
    """One streamed chat completion, read line by line: its finish, usage and any error event."""
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": f"Count {len(out)}"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as r:
        out["status"] = r.status_code
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            started.set()
            if "error" in chunk:
                out["error"] = chunk["error"]
            for choice in chunk.get("choices", []):
                out["finish"] = choice["finish_reason"] or out.get("finish")
            if chunk.get("usage"):
                out["tokens"] = chunk["usage"]["completion_tokens"]
    out["ended"] = time.monotonic()


def start_streams(server, max_tokens) -> tuple:
    outs = [{} for _ in range(CLIENTS)]
    started = [threading.Event() for _ in range(CLIENTS)]
    threads = [
        threading.Thread(target=stream, args=(server, max_tokens, o, s), daemon=True)
        for o, s in zip(outs, started)
    ]
    for t in threads:
        t.start()
    for s in started:
        assert s.wait(60), "a stream did not start"
    return outs, threads


NEW = {  # a new request in each dialect, and how its 503 names the problem
    "/v1/chat/completions": (
        {"messages": [{"role": "user", "content": "Hi"}]},
        lambda b: b["error"]["code"] == "shutting_down",
    ),
    "/v1/responses": ({"input": "Hi"}, lambda b: b["error"]["code"] == "shutting_down"),
    "/v1/messages": (
        {"max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]},
        lambda b: b["type"] == "error" and b["error"]["type"] == "overloaded_error",
    ),
    "/api/chat": (
        {"messages": [{"role": "user", "content": "Hi"}]},
        lambda b: set(b) == {"error"} and "shutting down" in b["error"],
    ),
}


def test_sigterm_drains_running_streams(glm4v_checkpoint, tmp_path):
    server = Server(glm4v_checkpoint[0], ["--drain-timeout", "120"], tmp_path / "drain.log")
    try:
        outs, threads = start_streams(server, 400)
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 503
        for path, (body, shaped) in NEW.items():
            r = httpx.post(f"{server.url}{path}", json={"model": server.model, **body}, timeout=5)
            assert r.status_code == 503, (path, r.text)
            assert r.headers["retry-after"].isdigit() and shaped(r.json()), (path, r.text)
        assert server.process.poll() is None
        for t in threads:
            t.join(120)
        assert server.process.wait(30) == 0
    finally:
        server.close()
    for out in outs:  # every stream was running at the signal, and finished whole
        assert out["status"] == 200 and "error" not in out, out
        assert out["finish"] == "length" and out["tokens"] == 400, out
        assert out["ended"] > signalled
    log = (tmp_path / "drain.log").read_text()
    assert "draining: 8 request(s) running" in log and "drained; exiting" in log


def test_drain_timeout_cuts_and_tells_the_client(glm4v_checkpoint, tmp_path):
    server = Server(glm4v_checkpoint[0], ["--drain-timeout", "0.5"], tmp_path / "cut.log")
    try:
        outs, threads = start_streams(server, 4000)
        whole = {}

        def ask():  # a whole reply; ignore_eos, so only the cut can end it early
            r = httpx.post(
                f"{server.url}/v1/chat/completions",
                json={
                    "model": server.model,
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 4000,
                    "ignore_eos": True,
                },
                timeout=60,
            )
            whole.update(status=r.status_code, body=r.json())

        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        deadline = time.monotonic() + 60
        while server.metrics()["requests_running"] < CLIENTS + 1:  # the whole request is running
            assert time.monotonic() < deadline, "the whole request did not start"
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        for t in [*threads, asker]:
            t.join(60)
        assert server.process.wait(30) == 0
    finally:
        server.close()
    for out in outs:
        assert out["status"] == 200 and out["error"]["code"] == "shutting_down", out
        assert out.get("tokens") is None  # no finish: the reply was cut
    assert whole["status"] == 503, whole
    assert "--drain-timeout" in whole["body"]["error"]["message"], whole
