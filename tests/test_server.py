"""`mlx-glm4v serve` as clients see it: real server processes on loopback ports, the official
`openai` package and raw HTTP, on tiny checkpoints. One server per configuration (module scope):
`plain` (defaults, small limits), `guarded` (API key, media root, URL fetching), `tools` (GLM-4.5V).

Greedy replies are compared with `generate` (what `mlx-glm4v generate` prints), itself compared
with transformers in test_generate.py.
"""

import json
import os
import re
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import tiny
from helpers import data_url, free_port, picture, png_bytes, write_scrolling_video
from PIL import Image
from servers import Server

from mlx_glm4v.checkpoints.loader import load
from mlx_glm4v.generation.generate import generate, stream_generate
from mlx_glm4v.generation.messages import build_messages
from mlx_glm4v.generation.reply import (
    Content,
    Reasoning,
    ReplyParser,
    ToolArgs,
    ToolEnd,
    parse_reply,
    split_reply,
)
from mlx_glm4v.server.openai import parse_messages

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key-7f3a"


# ---- media ---------------------------------------------------------------------------------------


def png_bomb(width, height) -> bytes:
    """A PNG whose header claims width x height pixels; a few bytes long."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("server-media")
    files = {
        "a.png": picture(196, 280, 21),
        "b.png": picture(112, 168, 22),
        "c.png": picture(140, 140, 23),
        "d.png": picture(168, 112, 24),
    }
    for name, image in files.items():
        image.save(d / name)
    write_scrolling_video(d / "clip.mp4")
    return d


# ---- servers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(glm4v_checkpoint):
    path = glm4v_checkpoint[0]
    model, processor = load(path)
    return path, model, processor


@pytest.fixture(scope="module")
def plain(glm4v_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("plain-log") / "server.log"
    server = Server(
        glm4v_checkpoint[0],
        [
            "--max-body-mb",
            "1",
            "--request-timeout",
            "6",
            "--keepalive",
            "0.05",
            "--max-prompt-tokens",
            "300",
            "--max-video-seconds",
            "5",
            "--max-image-pixels",
            "20000000",
        ],
        log,
    )
    yield server
    server.close()


@pytest.fixture(scope="module")
def single(glm4v_checkpoint, tmp_path_factory):
    """One request decoded at a time and one more waiting: the queue, and what a waiting stream
    sees."""
    log = tmp_path_factory.mktemp("single-log") / "server.log"
    server = Server(
        glm4v_checkpoint[0],
        ["--max-concurrency", "1", "--max-queue", "1", "--keepalive", "0.05"],
        log,
    )
    yield server
    server.close()


@pytest.fixture(scope="module")
def guarded(glm4v_checkpoint, media, tmp_path_factory):
    log = tmp_path_factory.mktemp("guarded-log") / "server.log"
    server = Server(
        glm4v_checkpoint[0],
        [
            "--api-key",
            KEY,
            "--media-root",
            str(media),
            "--allow-url-fetch",
            "--alias",
            "glm-tiny",
            "--max-images",
            "3",
            "--max-video-frames",
            "4",
        ],
        log,
        key=KEY,
    )
    server.model = "glm-tiny"
    yield server
    server.close()


@pytest.fixture(scope="module")
def tools_server(glm4v_moe_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("tools-log") / "server.log"
    server = Server(glm4v_moe_checkpoint[0], [], log)
    yield server
    server.close()


def ask(server, content, **options):
    options = {"temperature": 0, "max_completion_tokens": 12, **options}
    return server.client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": content}], **options
    )


def ask_streamed(server, content, **options):
    options = {"temperature": 0, "max_completion_tokens": 12, **options}
    chunks = list(
        server.client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": content}],
            stream=True,
            **options,
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(
        getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices
    )
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    return content, reasoning, finish, chunks


def image_part(path, **extra):
    return {"type": "image_url", "image_url": {"url": data_url(Path(path).read_bytes()), **extra}}


def video_part(path):
    return {
        "type": "video_url",
        "video_url": {"url": data_url(Path(path).read_bytes(), "video/mp4")},
    }


def expected(loaded, text, images=(), videos=(), max_tokens=12, **settings):
    """(reply as `generate` gives it, prompt tokens as the processor counts them)."""
    _, model, processor = loaded
    reply = generate(
        model,
        processor,
        text,
        images=[str(i) for i in images],
        videos=[str(v) for v in videos],
        max_tokens=max_tokens,
        **settings,
    )
    messages = build_messages(text, [str(i) for i in images], [str(v) for v in videos])
    prompt = processor.apply_chat_template(
        messages, add_generation_prompt=True, **settings.get("template_kwargs", {})
    )
    found = processor.media_from_messages(messages)
    return reply, int(processor(prompt, images=found[0], videos=found[1])["input_ids"].shape[-1])


def expected_tokens(loaded, text, images=(), videos=(), max_tokens=12):
    """The tokens `stream_generate` picks (the stop token left out), as text, with their
    log-probabilities."""
    _, model, processor = loaded
    out = []
    for r in stream_generate(
        model,
        processor,
        text,
        images=[str(i) for i in images],
        videos=[str(v) for v in videos],
        max_tokens=max_tokens,
    ):
        if r.token is not None and not (
            r.finish_reason == "stop" and r.token in model.config.eos_token_id
        ):
            out.append((processor.tokenizer.decode([r.token]), r.logprobs[r.token].item()))
    return out


# ---- replies -------------------------------------------------------------------------------------

CASES = {
    "text": ([], [], "Describe this image in detail."),
    "image": (["a.png"], [], "Describe this image in detail."),
    "two images": (["a.png", "b.png"], [], "Describe this image in detail."),
    "video": ([], ["clip.mp4"], "What happens in this video?"),
    "image and video": (["a.png"], ["clip.mp4"], "What happens in this video?"),
}


@pytest.mark.parametrize("case", CASES)
def test_greedy_reply_equals_generate(plain, loaded, media, case):
    images, videos = ([media / n for n in names] for names in CASES[case][:2])
    text = CASES[case][2]
    parts = (
        [image_part(i) for i in images]
        + [video_part(v) for v in videos]
        + [{"type": "text", "text": text}]
    )
    reply, prompt_tokens = expected(loaded, text, images, videos)
    want = split_reply(reply)

    whole = ask(plain, parts if images or videos else text, logprobs=True)
    tokens = [(e.token, e.logprob) for e in whole.choices[0].logprobs.content]
    want_tokens = expected_tokens(loaded, text, images, videos)
    assert [t for t, _ in tokens] == [t for t, _ in want_tokens]
    np.testing.assert_allclose([lp for _, lp in tokens], [lp for _, lp in want_tokens], atol=1e-5)
    message = whole.choices[0].message
    assert message.content == want.answer
    assert (getattr(message, "reasoning_content", None) or "") == want.reasoning
    assert whole.usage.prompt_tokens == prompt_tokens
    assert whole.usage.total_tokens == prompt_tokens + whole.usage.completion_tokens
    assert whole.usage.prompt_tokens_details.cached_tokens >= 0

    content, reasoning, finish, chunks = ask_streamed(
        plain, parts if images or videos else text, stream_options={"include_usage": True}
    )
    assert (content, reasoning) == (want.answer, want.reasoning)
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    streamed = chunks[-1].usage
    assert (streamed.prompt_tokens, streamed.completion_tokens, streamed.total_tokens) == (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
        whole.usage.total_tokens,
    )
    # the same prompt again starts from the one the engine kept: all of it but the last token
    assert streamed.prompt_tokens_details.cached_tokens == prompt_tokens - 1


def test_stop_and_max_completion_tokens(plain, loaded):
    text = "Hello! How are you today?"
    reply, _ = expected(loaded, text, max_tokens=12)
    start = next(i for i in range(1, len(reply) - 2) if reply[i : i + 2].isalnum())
    stop = reply[start : start + 2]
    cut = split_reply(reply[: reply.find(stop)]).answer
    for streamed in (False, True):
        if streamed:
            content, _, finish, _ = ask_streamed(plain, text, stop=stop)
        else:
            out = ask(plain, text, stop=[stop, "never-seen"])
            content, finish = out.choices[0].message.content, [out.choices[0].finish_reason]
        assert (content, finish) == (cut, ["stop"])

    short = ask(plain, text, max_completion_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    legacy = plain.client.chat.completions.create(
        model=plain.model, messages=[{"role": "user", "content": text}], max_tokens=3, temperature=0
    )
    assert legacy.choices[0].message.content == short.choices[0].message.content


def test_history_drops_earlier_thinking(plain, loaded):
    """GLM-4.1V's template keeps <think> in history; the server drops it, as the GLM-V authors
    ask."""
    _, _, processor = loaded
    history = [
        {"role": "user", "content": "Hi"},
        {
            "role": "assistant",
            "content": "<think>Some long reasoning here.</think><answer>Hello!</answer>",
        },
        {"role": "user", "content": "And now?"},
    ]
    out = plain.client.chat.completions.create(model=plain.model, messages=history, max_tokens=1)
    dropped = [history[0], {"role": "assistant", "content": "<answer>Hello!</answer>"}, history[2]]
    prompt = processor.apply_chat_template(dropped, add_generation_prompt=True)
    assert out.usage.prompt_tokens == len(processor(prompt)["input_ids"][0])


def test_seed_reproduces_sampling(plain):
    runs = [
        ask(
            plain,
            "Tell me a story.",
            temperature=1.0,
            seed=seed,
            max_completion_tokens=20,
            extra_body={"top_k": 50, "min_p": 0.01},
        )
        .choices[0]
        .message.content
        for seed in (7, 7, 8)
    ]
    assert runs[0] == runs[1] != runs[2]


def test_logprobs(plain):
    out = ask(plain, "Hello!", logprobs=True, top_logprobs=3, max_completion_tokens=5)
    entries = out.choices[0].logprobs.content
    assert len(entries) == out.usage.completion_tokens
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == pytest.approx(
            entry.logprob
        )
        assert entry.logprob <= 0


def test_thinking_switch_reaches_template(tools_server, glm4v_moe_checkpoint):
    model, processor = load(glm4v_moe_checkpoint[0])
    reply = generate(
        model, processor, "Hello!", max_tokens=8, template_kwargs={"enable_thinking": False}
    )
    out = ask(
        tools_server,
        "Hello!",
        max_completion_tokens=8,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert out.choices[0].message.content == split_reply(reply).answer


def test_vision_features_shared_by_pixels(guarded, loaded, media, tmp_path):
    fresh = media / "fresh.png"
    picture(112, 112, 31).save(fresh)
    before = guarded.metrics()
    first = ask(guarded, [image_part(fresh), {"type": "text", "text": "What is it?"}])
    middle = guarded.metrics()
    assert middle["vision_encodes_total"] == before["vision_encodes_total"] + 1
    # the same pixels from a file (and as a Responses-style input_image): no tower
    for part in (
        {"type": "image_url", "image_url": "fresh.png"},
        {"type": "input_image", "image_url": "fresh.png"},
    ):
        again = ask(guarded, [part, {"type": "text", "text": "What is it?"}])
        assert again.choices[0].message.content == first.choices[0].message.content
    after = guarded.metrics()
    assert after["vision_encodes_total"] == middle["vision_encodes_total"]
    assert after["vision_cache_hits_total"] == middle["vision_cache_hits_total"] + 2
    # a different picture under the same name is a different image
    picture(112, 112, 32).save(fresh)
    changed = ask(
        guarded,
        [
            {"type": "image_url", "image_url": {"url": "fresh.png"}},
            {"type": "text", "text": "What is it?"},
        ],
    )
    assert guarded.metrics()["vision_encodes_total"] == after["vision_encodes_total"] + 1
    reply, _ = expected(loaded, "What is it?", [fresh])
    assert changed.choices[0].message.content == split_reply(reply).answer


def test_second_request_reads_cached_prefix(plain, media):
    parts = [image_part(media / "c.png"), {"type": "text", "text": "Describe it."}]
    ask(plain, parts)
    assert ask(plain, parts).usage.prompt_tokens_details.cached_tokens > 0


def test_detail_low_uses_a_small_budget(plain):
    """Counted by the prompt-token cap's refusal (plain's is 300), so no vision tower runs."""
    ramp = np.linspace(0, 255, 600, dtype=np.float32)
    smooth = np.stack(
        [ramp[:, None] + 0 * ramp, 0 * ramp[:, None] + ramp, 128 + 0 * ramp[:, None] * ramp], -1
    )
    url = data_url(png_bytes(Image.fromarray(smooth.astype(np.uint8))))
    counts = {}
    for detail in ("high", "low"):
        error = refused(
            plain,
            body(plain, [{"type": "image_url", "image_url": {"url": url, "detail": detail}}]),
            400,
            r"over the limit of 300 \(--max-prompt-tokens\)",
        )
        assert error["code"] == "context_length_exceeded"
        counts[detail] = int(re.search(r"the prompt is (\d+) tokens", error["message"]).group(1))
    assert counts["high"] > 420  # 588 x 588 pixels: 441 image tokens
    assert 300 < counts["low"] <= 512 * 512 // (28 * 28) + 20  # about 512 x 512


def test_media_root_files(guarded, loaded, media):
    out = ask(
        guarded,
        [
            {"type": "image_url", "image_url": {"url": "a.png"}},
            {"type": "text", "text": "Describe."},
        ],
    )
    reply, _ = expected(loaded, "Describe.", [media / "a.png"])
    assert out.choices[0].message.content == split_reply(reply).answer


def test_health_while_loading(glm4v_checkpoint):
    """503 (and chat requests 503 with Retry-After) until the model is in, then 200; the real
    loader, held back."""
    from starlette.testclient import TestClient

    from mlx_glm4v.server.app import create_app
    from mlx_glm4v.server.state import ServerConfig

    gate = threading.Event()

    def held_load(model):
        assert gate.wait(60)
        return load(model)

    app = create_app(ServerConfig(model=str(glm4v_checkpoint[0]), alias="tiny"), loader=held_load)
    request = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with TestClient(app) as client:
        assert client.get("/health").status_code == 503
        busy = client.post("/v1/chat/completions", json=request)
        assert (
            busy.status_code == 503
            and busy.headers["retry-after"]
            and "loading" in busy.json()["error"]["message"]
        )
        gate.set()
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.post("/v1/chat/completions", json=request).status_code == 200


# ---- refusals ------------------------------------------------------------------------------------


def refused(server, body, status, words, key="default"):
    response = server.post(body, key=key)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    message = error["message"]
    assert message.endswith(".") and "\n" not in message and "Traceback" not in message, message
    assert "/tmp" not in message and str(ROOT) not in message, message
    assert re.search(words, message), message
    assert (
        server.post(
            {
                "model": server.model,
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 1,
            }
        ).status_code
        == 200
    )
    return error


def body(server, content, **extra):
    return {
        "model": server.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 2,
        **extra,
    }


def image_body(server, url):
    return body(
        server,
        [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}],
    )


def test_refusals_plain(plain, media):
    s = plain
    for calls, words in [  # an assistant turn's tool calls in the history
        ("f", r"^messages\[1\]\.tool_calls must be a list\.$"),
        ([{"function": {}}], r"^messages\[1\]\.tool_calls\[0\] needs a function with a name\.$"),
        ([{"function": {"name": "f", "arguments": "{oops"}}], r"arguments is not valid JSON\.$"),
        ([{"function": {"name": "f", "arguments": "[1]"}}], r"arguments must be a JSON object\.$"),
    ]:
        turn = {"role": "assistant", "content": "", "tool_calls": calls}
        history = {**body(s, "Hi"), "messages": [{"role": "user", "content": "Hi"}, turn]}
        refused(s, history, 400, words)
    refused(s, body(s, "x" * (1 << 20)), 413, r"over the limit of \d+ bytes")
    refused(s, image_body(s, "data:image/png;base64,@@not base64@@"), 400, "not valid base64")
    refused(s, image_body(s, data_url(b"just some text, not a picture")), 400, "not an image")
    with_warnings = refused(
        s, image_body(s, data_url(png_bomb(6000, 6000))), 400, "over the limit of 20000000"
    )
    assert with_warnings["code"] == "image_too_large"
    refused(s, image_body(s, data_url(png_bomb(100000, 100000))), 400, "over the limit")
    refused(s, image_body(s, str(media / "a.png")), 400, "--media-root")
    refused(s, image_body(s, "https://example.com/cat.png"), 400, "--allow-url-fetch")
    refused(s, {**body(s, "Hi"), "model": "gpt-4o"}, 404, "does not exist")
    refused(s, body(s, "Hi", n=2), 400, "n=2")
    refused(
        s,
        body(
            s,
            "Hi",
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
            },
        ),
        400,
        "uniqueItems",
    )
    refused(s, body(s, "Hi", stop=["a", "b", "c", "d", "e"]), 400, "at most 4")
    refused(s, body(s, "Hi", presence_penalty=0.5), 400, "presence_penalty")
    refused(s, body(s, "Hi", logit_bias={"1": 5}), 400, "logit_bias")
    refused(s, body(s, "Hi", bogus=1), 400, "unknown field 'bogus'")
    refused(s, body(s, "Hi", temperature=5), 400, "temperature")
    tool = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": {}}},
    }
    refused(s, body(s, "Hi", tools=[tool]), 400, "template does not render them")
    refused(s, {"model": s.model, "messages": [{"role": "wizard", "content": "Hi"}]}, 400, "role")
    refused(s, body(s, [{"type": "input_audio", "input_audio": {}}]), 400, "not supported")
    refused(s, {**body(s, "Hi"), "max_tokens": 0}, 400, "max_tokens")
    long_clip = write_scrolling_video(media / "long.mp4", frames=12)  # 6 s
    refused(
        s,
        body(s, [video_part(long_clip)]),
        400,
        r"lasts 6.0 s, over the limit of 5 s \(--max-video-seconds\)",
    )
    refused(
        s,
        body(
            s, [{"type": "video_url", "video_url": {"url": data_url(b"not a video", "video/mp4")}}]
        ),
        400,
        "not a video",
    )
    chunked = httpx.post(
        f"{s.url}/v1/chat/completions", content=(b"x" * 65536 for _ in range(20)), timeout=10
    )
    assert chunked.status_code == 413 and "request body" in chunked.json()["error"]["message"]
    no_cors = httpx.get(
        f"{s.url}/v1/models", headers={"Origin": "https://evil.example"}, timeout=10
    )
    assert "access-control-allow-origin" not in no_cors.headers
    response = httpx.post(f"{s.url}/v1/chat/completions", content=b"{not json", timeout=10)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_refusals_guarded(guarded, media, tmp_path_factory):
    s = guarded
    refused(s, body(s, "Hi"), 401, "API key", key=None)
    refused(s, body(s, "Hi"), 401, "API key", key="wrong-key")
    assert httpx.get(f"{s.url}/health", timeout=5).status_code == 200
    assert httpx.get(f"{s.url}/v1/models", timeout=5).status_code == 401
    assert httpx.get(f"{s.url}/metrics", timeout=5).status_code == 401
    outside = tmp_path_factory.mktemp("outside")
    picture(56, 56, 5).save(outside / "secret.png")
    link = media / "escape.png"
    if not link.exists():
        link.symlink_to(outside / "secret.png")
    refused(s, image_body(s, str(outside / "secret.png")), 403, "outside the server's --media-root")
    refused(s, image_body(s, "../" + outside.name + "/secret.png"), 403, "outside")
    refused(s, image_body(s, "escape.png"), 403, "outside")
    refused(s, image_body(s, "file://" + str(outside / "secret.png")), 403, "outside")
    refused(
        s,
        image_body(s, f"http://127.0.0.1:{s.port}/health"),
        403,
        "private, loopback or link-local",
    )
    refused(s, image_body(s, "http://localhost/cat.png"), 403, "private, loopback or link-local")
    refused(s, image_body(s, "http://169.254.169.254/latest/meta-data"), 403, "private")
    refused(s, {**body(s, "Hi"), "model": "glm4v-tiny-other"}, 404, "glm-tiny")
    four = [{"type": "image_url", "image_url": {"url": f"{n}.png"}} for n in "abcd"]
    refused(s, body(s, four), 400, r"4 images; this server takes at most 3 \(--max-images\)")
    refused(
        s,
        body(s, [video_part(media / "clip.mp4")]),
        400,
        r"sampled into 6 frames, over the limit of 4",
    )
    models = s.client.models.list()
    assert [m.id for m in models.data] == ["glm-tiny"]


def test_non_loopback_bind_needs_a_key(glm4v_checkpoint):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLX_GLM4V_API_KEY", None)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_glm4v.cli",
            "serve",
            "--model",
            str(glm4v_checkpoint[0]),
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert run.returncode == 1
    assert (
        "--api-key" in run.stderr
        and "--insecure-no-auth" in run.stderr
        and "Traceback" not in run.stderr
    )
    missing = subprocess.run(
        [sys.executable, "-m", "mlx_glm4v.cli", "serve", "--model", "./no-such-model"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert (
        missing.returncode == 1
        and "no-such-model" in missing.stderr
        and "Traceback" not in missing.stderr
    )


# ---- streams that end early ----------------------------------------------------------------------


def wait_idle(server, timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = server.metrics()
        if m["requests_running"] == 0 and m["queue_depth"] == 0:
            return m
        time.sleep(0.05)
    raise AssertionError("the server stayed busy")


def test_concurrent_requests_answer_as_alone(plain):
    prompts = ["Hello! How are you today?", "The quick brown fox", "What is the answer?"]
    alone = [ask(plain, p).choices[0].message.content for p in prompts]
    together = [None] * len(prompts)

    def run(i):
        together[i] = ask(plain, prompts[i]).choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_past_the_queue_429_with_retry_after_and_nothing_lost(single, loaded):
    text = "Hello! How are you today?"
    # long enough to keep the engine busy
    reply, _ = expected(loaded, text, max_tokens=100, ignore_eos=True)
    request = body(single, text, max_tokens=100, ignore_eos=True, temperature=0)
    responses = []
    threads = [
        threading.Thread(target=lambda: responses.append(single.post(request))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in responses)
    # one decoding and one waiting at most; the rest refused
    assert codes[0] == 200 and codes[-1] == 429
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "queue_full"
        else:
            assert r.json()["choices"][0]["message"]["content"] == split_reply(reply).answer


def test_client_disconnect_stops_generation(plain):
    before = wait_idle(plain)
    received = 0
    with plain.client.chat.completions.create(
        model=plain.model,
        messages=[{"role": "user", "content": "Go on forever."}],
        stream=True,
        max_completion_tokens=100000,
        temperature=0,
        extra_body={"ignore_eos": True},
    ) as stream:
        for _ in stream:
            received += 1
            if received == 5:
                break
    time.sleep(0.5)
    after = wait_idle(plain)
    generated = after["generated_tokens_total"] - before["generated_tokens_total"]
    assert after["requests_cancelled_total"] == before["requests_cancelled_total"] + 1
    print(f"\ndisconnect after {received} chunks: {generated:.0f} tokens generated in all")
    assert generated < 200  # of 100000 asked for


def test_disconnect_stops_a_whole_reply(plain):
    before = wait_idle(plain)
    with pytest.raises(httpx.ReadTimeout):
        plain.post(body(plain, "Go on forever.", max_tokens=1000000, ignore_eos=True), timeout=1.0)
    after = wait_idle(plain, timeout=3.0)  # well before the server's own 6 s timeout
    assert after["requests_cancelled_total"] == before["requests_cancelled_total"] + 1


@pytest.mark.slow
def test_request_timeout(plain):
    """Past --request-timeout (6 s here) a whole reply is a 504; a stream ends with an error
    event in OpenAI's format, then [DONE]. The two run at once (queued or batched, the deadline
    holds)."""
    streamed = {}

    def stream():
        request = body(plain, "Go on forever.", max_tokens=1000000, ignore_eos=True, stream=True)
        with httpx.stream(
            "POST", f"{plain.url}/v1/chat/completions", json=request, timeout=30
        ) as response:
            streamed["status"] = response.status_code
            streamed["lines"] = [
                line for line in response.iter_lines() if line.startswith("data: ")
            ]

    thread = threading.Thread(target=stream)
    start = time.monotonic()
    thread.start()
    response = plain.post(body(plain, "Go on forever.", max_tokens=1000000, ignore_eos=True))
    thread.join()
    assert time.monotonic() - start < 12
    assert (
        response.status_code == 504 and "--request-timeout" in response.json()["error"]["message"]
    )
    lines = streamed["lines"]
    error = json.loads(lines[-2][6:])["error"]
    assert streamed["status"] == 200 and lines[-1] == "data: [DONE]"
    assert error["code"] == "timeout" and "--request-timeout" in error["message"]
    wait_idle(plain)


def test_keepalive_while_waiting(single, media):
    """A streamed request waiting behind another (or on a long prompt) gets SSE comments
    meanwhile."""
    release = threading.Event()

    def busy():  # holds the one decoding slot until the waiting stream has seen comments
        request = body(single, "Go on.", max_tokens=100000, ignore_eos=True, stream=True)
        with httpx.stream(
            "POST", f"{single.url}/v1/chat/completions", json=request, timeout=60
        ) as response:
            for _ in response.iter_lines():
                if release.is_set():
                    break  # the client goes: the server cancels the request

    holder = threading.Thread(target=busy)
    holder.start()
    deadline = time.monotonic() + 30
    # the busy request is in the engine first, whatever the load
    while single.metrics()["requests_running"] < 1:
        assert time.monotonic() < deadline, "the busy request never started"
        time.sleep(0.02)
    lines = []
    try:
        with httpx.stream(
            "POST",
            f"{single.url}/v1/chat/completions",
            timeout=60,
            json=body(
                single,
                [video_part(media / "clip.mp4"), {"type": "text", "text": "What?"}],
                stream=True,
            ),
        ) as response:
            for line in response.iter_lines():
                if line:
                    lines.append((time.monotonic(), line))
                if sum(1 for _, x in lines if x == ": keepalive") == 5:
                    release.set()
    finally:
        release.set()
        holder.join()
    data = [json.loads(line[6:]) for _, line in lines if line.startswith("data: {")]
    first_token = next(
        t
        for t, line in lines
        if line.startswith("data: {") and "role" not in json.loads(line[6:])["choices"][0]["delta"]
    )
    comments = [t for t, line in lines if line == ": keepalive"]
    # sent while waiting, not in a burst at the end
    assert len(comments) >= 5 and comments[0] < first_token - 0.1
    assert lines[-1][1] == "data: [DONE]" and data[-1]["choices"][0]["finish_reason"] in (
        "stop",
        "length",
    )


# ---- tools ---------------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
OPENAI_CONVERSATION = [
    {"role": "system", "content": "You help with the weather."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "Rain, 15 C"},
]


def test_tools_render_as_transformers(glm4v_moe_checkpoint):
    from mlx_glm4v.inputs.processor import Processor

    path, _, hf = glm4v_moe_checkpoint
    ours = Processor.from_pretrained(path)
    assert ours.chat_template == tiny.CHAT_TEMPLATE_45V
    reference = [dict(m) for m in OPENAI_CONVERSATION]
    reference[2] = {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}},
            },
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Rome"}},
            },
        ],
    }
    want = hf.apply_chat_template(
        reference, tools=[WEATHER], tokenize=False, add_generation_prompt=True
    )
    got = ours.apply_chat_template(
        parse_messages(OPENAI_CONVERSATION), tools=[WEATHER], add_generation_prompt=True
    )
    assert got == want
    assert "<tools>" in got and "<tool_call>get_weather" in got and "<tool_response>" in got


def test_tools_through_the_server(tools_server):
    out = tools_server.client.chat.completions.create(
        model=tools_server.model,
        messages=OPENAI_CONVERSATION,
        tools=[WEATHER],
        tool_choice="auto",
        temperature=0,
        max_completion_tokens=8,
    )
    assert out.usage.prompt_tokens > 100  # the tool list and the calls were rendered
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    chunks = list(
        tools_server.client.chat.completions.create(
            model=tools_server.model,
            messages=OPENAI_CONVERSATION,
            tools=[WEATHER],
            temperature=0,
            max_completion_tokens=8,
            stream=True,
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == (out.choices[0].message.content or "")
    error = tools_server.post(
        {
            **body(tools_server, "Hi"),
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "nope"}},
        }
    )
    assert error.status_code == 400 and "tool_choice" in error.json()["error"]["message"]


GLM_CALLS = (
    "I will check.<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
    "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>"
    "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>123</arg_value>\n</tool_call>"
    "<tool_call>now</tool_call>"
)


def test_tool_call_parser():
    reply = parse_reply(GLM_CALLS, [WEATHER])
    assert reply.content == "I will check."
    assert [(c.name, json.loads(c.arguments)) for c in reply.calls] == [
        ("get_weather", {"city": "Paris", "days": 2}),
        ("get_weather", {"city": "123"}),
        ("now", {}),
    ]
    assert all(c.id.startswith("call_") for c in reply.calls)
    one = parse_reply(
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>', [WEATHER]
    )
    assert [(c.name, c.arguments) for c in one.calls] == [("get_weather", '{"city": "Oslo"}')]
    # streamed one character at a time: the same content and calls, nothing of a call leaks out
    parser = ReplyParser([WEATHER])
    events = [e for ch in GLM_CALLS for e in parser.feed(ch)] + parser.finish()
    assert "".join(e.text for e in events if isinstance(e, Content)) == "I will check."
    assert [(c.name, c.arguments) for c in events if isinstance(c, ToolEnd)] == [
        (c.name, c.arguments) for c in reply.calls
    ]
    # an unfinished call at the end, its name not yet written, stays text
    assert (
        parse_reply("ok <tool_call>get_we", [WEATHER]).content,
        parse_reply("ok <tool_call>get_we", [WEATHER]).calls,
    ) == ("ok <tool_call>get_we", [])


@pytest.mark.parametrize(
    "text",
    [
        "<think>\nLet me look.\n</think>\n\nIt is a cat.  ",
        "<think>Still thinking when the tokens ran out",
        "<answer>Forty-two<|begin_of_box|>[[1, 2, 3, 4]]<|end_of_box|></answer>",
        "<think>Weather?</think>\n" + GLM_CALLS + "\n",
        "plain <tool_call>get_we",
    ],
)
def test_streamed_reply_adds_up_to_whole(text):
    """Events from text arriving one character at a time add up to the whole reply's parts."""
    parser = ReplyParser([WEATHER])
    events = [e for ch in text for e in parser.feed(ch)] + parser.finish()
    want = parse_reply(text, [WEATHER])
    assert "".join(e.text for e in events if isinstance(e, Content)) == want.content
    assert "".join(e.text for e in events if isinstance(e, Reasoning)) == want.reasoning
    calls = [e for e in events if isinstance(e, ToolEnd)]
    assert [c.index for c in calls] == list(range(len(want.calls)))
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in want.calls]
    for c in calls:
        assert (
            "".join(e.text for e in events if isinstance(e, ToolArgs) and e.index == c.index)
            == c.arguments
        )
    assert "<" not in want.reasoning + want.content or "<tool_call>" in want.content


def test_thinking_budget(plain, loaded):
    request = body(plain, "Hello!", max_tokens=8, temperature=0, thinking_budget=0)
    response = plain.post(request)
    assert response.status_code == 200
    reply, _ = expected(loaded, "Hello!", max_tokens=8, thinking_budget=0)
    assert response.json()["choices"][0]["message"]["content"] == split_reply(reply).answer


def test_feature_memo_byte_budget():
    import mlx.core as mx

    from mlx_glm4v.models.media import FeatureMemo

    memo = FeatureMemo(size=10, max_bytes=3 * 400)
    for i in range(5):
        memo.put(i, mx.zeros((100,), mx.float32))  # 400 bytes each
    assert list(memo) == [2, 3, 4] and memo.bytes == 1200
    assert memo.get(2) is not None and memo.get(0) is None and (memo.hits, memo.misses) == (1, 1)
    memo.put(5, mx.zeros((1000,), mx.float32))  # larger than the budget: kept alone, as the newest
    assert list(memo) == [5] and memo.bytes == 4000


@pytest.mark.parametrize(
    "host",
    [
        "10.1.2.3",
        "172.16.0.9",
        "192.168.1.1",
        "127.0.0.2",
        "0.0.0.0",
        "100.64.0.1",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "fc00::5",
        "::ffff:127.0.0.1",
        "224.0.0.1",
    ],
)
def test_fetch_refuses_non_public_addresses(host):
    from mlx_glm4v.server.media import MediaPolicy, fetch
    from mlx_glm4v.server.neutral import ApiError

    url = f"http://[{host}]/x.png" if ":" in host else f"http://{host}/x.png"
    with pytest.raises(ApiError) as refused:
        fetch(url, MediaPolicy(allow_url_fetch=True), "part")
    assert refused.value.status == 403 and refused.value.code == "address_not_allowed"


def test_latency_histograms_in_metrics(plain, tmp_path):
    """Inter-token and first-token histograms, vision seconds per turn and the prefill queue, as
    Prometheus reads them."""
    picture(84, 112, 41).save(tmp_path / "new.png")  # not in the vision cache: the tower runs
    before = wait_idle(plain)
    ask_streamed(
        plain,
        [image_part(tmp_path / "new.png"), {"type": "text", "text": "Go on."}],
        max_completion_tokens=6,
        extra_body={"ignore_eos": True},
    )
    after = wait_idle(plain)
    for name in ("time_to_first_token_seconds", "inter_token_seconds", "vision_turn_seconds"):
        buckets = sorted(
            (float(k.split('"')[1]), v)
            for k, v in after.items()
            if k.startswith(f"{name}_bucket") and "+Inf" not in k
        )
        # cumulative
        assert len(buckets) > 5 and all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
        assert after[f'{name}_bucket{{le="+Inf"}}'] == after[f"{name}_count"] >= buckets[-1][1]
    assert (
        after["time_to_first_token_seconds_count"]
        == before["time_to_first_token_seconds_count"] + 1
    )
    # 6 tokens, 5 gaps
    assert after["inter_token_seconds_count"] == before["inter_token_seconds_count"] + 5
    assert after["inter_token_seconds_sum"] > before["inter_token_seconds_sum"]
    assert after["vision_turn_seconds_count"] > before["vision_turn_seconds_count"]
    # this small image and prompt: whole blocks and layers, no attention heads
    for kind in ("text", "vision"):
        assert (
            after[f'prefill_pieces_total{{kind="{kind}"}}']
            > before[f'prefill_pieces_total{{kind="{kind}"}}']
        )
    assert (
        after['prefill_pieces_total{kind="attention"}']
        == before['prefill_pieces_total{kind="attention"}']
    )
    assert after["prefill_rows"] == 0
