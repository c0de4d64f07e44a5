"""`mlx-glm4v serve` under `mlx.launch`: rank 0 serves HTTP, every rank runs the engine's steps.

Real launches (ring backend on 127.0.0.1, CPU) of the real server, asked by httpx. A request
sent concurrently with others must get, byte for byte and logprobs included, the reply it gets
alone from the same ranks; and the tokens a one-process server gives it, with log-probabilities
within 1e-4 (split over ranks, sums run in another order).
"""

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import data_url, picture, png_bytes, write_scrolling_video
from ranks import REPORT, TOL, cli_env, mlx_launch, rank_pid, seconds_until_gone
from servers import Server

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.distributed


def requests(media: Path) -> dict:
    """OpenAI request bodies: greedy text, images (sent inline and named in the media root), a
    video, sampled."""
    inline = data_url(png_bytes(picture(84, 112, 3)))
    clip = data_url(write_scrolling_video(media / "clip.mp4").read_bytes(), "video/mp4")
    return {
        "text": {"messages": [{"role": "user", "content": "Hello! How are you today?"}]},
        "image": {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": inline}},
                        {"type": "text", "text": "Describe this image."},
                    ],
                }
            ],
            "logprobs": True,
            "top_logprobs": 2,
        },
        "file": {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "picture-file.png"}},
                        {"type": "text", "text": "What is it?"},
                    ],
                }
            ]
        },
        "video": {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "video_url", "video_url": {"url": clip}},
                        {"type": "text", "text": "What happens?"},
                    ],
                }
            ]
        },
        "sampled": {
            "messages": [{"role": "user", "content": "Tell me a story."}],
            "temperature": 1.0,
            "seed": 5,
        },
        "schema": {
            "messages": [{"role": "user", "content": "Read the form."}],
            "temperature": 0.8,
            "seed": 2,
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "form",
                    "schema": {
                        "type": "object",
                        "properties": {"n": {"type": "integer"}, "tags": {"type": "array"}},
                    },
                },
            },
        },
    }


def same_tokens(got: dict, expected: dict, label: str):
    """The same text and tokens; log-probabilities within TOL."""
    assert (got["content"], got["finish"], got["usage"]) == (
        expected["content"],
        expected["finish"],
        expected["usage"],
    ), f"{label}: {got} != {expected}"
    if expected["logprobs"] is None:
        return assert_none(got["logprobs"], label)
    pairs = list(zip(got["logprobs"]["content"], expected["logprobs"]["content"], strict=True))
    assert [a["token"] for a, _ in pairs] == [b["token"] for _, b in pairs], label
    worst = max(abs(a["logprob"] - b["logprob"]) for a, b in pairs)
    assert worst <= TOL, f"{label}: log-probabilities differ by {worst:.2e}"
    REPORT[f"{label}: max |logprob difference| against one process"] = worst


def assert_none(value, label):
    assert value is None, label


def reply(server, body) -> dict:
    response = server.post({"model": server.model, "max_tokens": 16, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return {
        "content": choice["message"]["content"],
        "logprobs": choice["logprobs"],
        "finish": choice["finish_reason"],
        "usage": response.json()["usage"]["completion_tokens"],
    }


def stop(server, marker: str) -> tuple:
    """Ctrl-C to rank 0 (the server); (seconds until every rank and the launcher ended, log).

    (Ctrl-C in a terminal reaches the launcher too, which then dies with a traceback of its own.)"""
    started = time.monotonic()
    os.kill(rank_pid(marker, 0), signal.SIGINT)
    try:
        server.process.wait(timeout=60)
    finally:
        if server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGKILL)
        server.log.close()
    return time.monotonic() - started, Path(server.log_path).read_text()


def cancelled_stream(server, seen: list):
    """A long streamed reply its client leaves after three pieces."""
    body = {
        "model": server.model,
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
        "messages": [{"role": "user", "content": "Count to a thousand."}],
    }
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, timeout=60
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                seen.append(line)
                if len(seen) == 3:
                    return


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_serve_on_two_ranks_equals_one_process(tmp_path, glm4v_moe_checkpoint, mode):
    path = glm4v_moe_checkpoint[0]
    media = tmp_path / "media"
    media.mkdir()
    picture(56, 84, 9).save(media / "picture-file.png")
    bodies = requests(media)
    args = ["--media-root", str(media), "--keepalive", "0.05"]

    alone = Server(path, args, tmp_path / "single.log")
    try:
        expected = {name: reply(alone, body) for name, body in bodies.items()}
    finally:
        alone.close()

    marker = f"serve-{mode}-{os.getpid()}"
    # tensor parallel: each rank's share of the heads, a head a piece (prompt chunks and the tower
    # alike)
    pieces = {"ATTENTION_PIECE_WORK": "16"} if mode == "tensor" else {}
    env = cli_env(
        tmp_path,
        WATCH_OPENS=str(tmp_path / "opens"),
        MLX_GLM4V_PARALLEL=mode,
        RANK_TEST=marker,
        **pieces,
    )
    ranks = Server(path, args, tmp_path / "ranks.log", launcher=mlx_launch(2), env=env)
    try:
        apart = {name: reply(ranks, body) for name, body in bodies.items()}
        for name in bodies:
            same_tokens(apart[name], expected[name], f"serve, {mode} parallel, {name}")
        got, threads, seen = {}, [], []
        for name, body in bodies.items():
            threads.append(
                threading.Thread(target=lambda n=name, b=body: got.__setitem__(n, reply(ranks, b)))
            )
        threads.append(threading.Thread(target=cancelled_stream, args=(ranks, seen)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert len(seen) == 3
        for name in bodies:
            assert got[name] == apart[name], f"{mode}, {name}: {got[name]} != {apart[name]}"
        assert expected["image"]["logprobs"]["content"] and expected["text"]["content"]
        # refusals happen on rank 0 before the engine: a path outside the media root, a malformed
        # body
        outside = {
            "model": ranks.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "../../etc/passwd"}},
                        {"type": "text", "text": "Hi"},
                    ],
                }
            ],
        }
        for bad, status in (
            (outside, 403),
            ({"model": ranks.model, "messages": "not a list"}, 400),
        ):
            refused = ranks.post(bad)
            assert refused.status_code == status and refused.json()["error"]["message"], (
                refused.text
            )
            assert str(media) not in refused.text, refused.text
        # after a cancellation, a batch and refusals, a request alone is still the same reply, also
        # as the openai package asks it
        assert reply(ranks, bodies["image"]) == apart["image"]
        asked = ranks.client.chat.completions.create(
            model=ranks.model, max_tokens=16, temperature=0, messages=bodies["text"]["messages"]
        )
        assert asked.choices[0].message.content == apart["text"]["content"]
        metrics = ranks.metrics()
        assert metrics["requests_cancelled_total"] >= 1
        assert (metrics['prefill_pieces_total{kind="attention"}'] > 0) == (mode == "tensor"), (
            metrics
        )
    finally:
        seconds, log = stop(ranks, marker)
    assert f"rank 1 of 2: {mode} parallel" in log, log
    assert "Traceback" not in log and "error:" not in log, log
    assert seconds < 30, f"{seconds:.1f} s to stop"
    REPORT[f"serve on 2 ranks ({mode}): seconds to stop after Ctrl-C"] = seconds
    opened = {p.name.split(".")[-1]: p.read_text() for p in tmp_path.glob("opens.*")}
    assert "picture-file.png" in opened.get("0", ""), opened
    assert "picture-file.png" not in opened.get("1", ""), opened


@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_a_lost_rank_ends_the_server(tmp_path, glm4v_checkpoint, fault):
    """Rank 1 killed, or frozen with its connections open (SIGSTOP), while a reply streams: the
    client's stream ends and rank 0 stops with one line (a frozen rank after
    MLX_GLM4V_RANK_TIMEOUT)."""
    marker = f"serve-{fault}-{os.getpid()}"
    env = cli_env(tmp_path, RANK_TEST=marker, MLX_GLM4V_RANK_TIMEOUT="3")
    server = Server(
        glm4v_checkpoint[0], [], tmp_path / "ranks.log", launcher=mlx_launch(2), env=env
    )
    victim = None
    try:
        body = {
            "model": server.model,
            "max_tokens": 100000,
            "stream": True,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": "Hello!"}],
        }
        pieces, struck = 0, None
        with pytest.raises(httpx.HTTPError):
            with httpx.stream(
                "POST", f"{server.url}/v1/chat/completions", json=body, timeout=60
            ) as response:
                for line in response.iter_lines():
                    pieces += line.startswith("data: {")
                    if pieces == 3 and struck is None:
                        victim = rank_pid(marker, 1)
                        os.kill(victim, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
                        struck = time.monotonic()
        elapsed = seconds_until_gone(marker, 0, struck, 60)
        if fault == "frozen":
            os.kill(victim, signal.SIGCONT)
        server.process.wait(timeout=60)
    finally:
        if server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGKILL)
        server.log.close()
    log = Path(server.log_path).read_text()
    REPORT[f"serve, {fault} rank: seconds until rank 0 ended"] = elapsed
    assert "Traceback" not in log, log
    if fault == "killed":
        assert elapsed < 30, f"{elapsed:.1f} s"
        assert log.count("error:") == 1, log
    else:
        assert 3 <= elapsed < 30, f"{elapsed:.1f} s\n{log}"
        assert "error: rank 0 waited 3 s for the other ranks" in log, log
