"""The command line's options: media caps, thinking, the JSON fields, loading, standard input,
`--version`, `python -m mlx_glm4v`, and what a failed download says.

Every command runs as `python -m mlx_glm4v`, the module entry point, in a fresh process. Hub
errors come from huggingface_hub itself: offline mode, or a hub on 127.0.0.1 that answers as
huggingface.co does for missing, private, gated or refused requests.
"""

import errno
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import picture, write_noise_video

from mlx_glm4v.checkpoints.loader import load
from mlx_glm4v.errors import Glm4vError
from mlx_glm4v.generation.generate import generate, stream_generate
from mlx_glm4v.generation.reply import split_reply

PROMPT = "Describe this image."


def cli(*args, input=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "mlx_glm4v", *args],
        capture_output=True,
        text=True,
        input=input,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def one_line_error(out, message):
    assert out.returncode == 1, out.stderr
    assert message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def tiny(glm4v_checkpoint, tmp_path_factory):
    path = glm4v_checkpoint[0]
    model, processor = load(path)
    media = tmp_path_factory.mktemp("cli-media")
    image = media / "photo.png"
    picture(420, 588, 5).save(image)  # 15 x 21 patches of 28 pixels: 315 tokens at full size
    video = media / "clip.mp4"
    write_noise_video(video, seconds=4, fps=8, size=56)
    return dict(path=path, model=model, processor=processor, image=image, video=video)


def prompt_tokens(s, images=(), videos=(), **caps):
    processor = s["processor"]
    content = (
        [{"type": "image"}] * len(images)
        + [{"type": "video"}] * len(videos)
        + [{"type": "text", "text": PROMPT}]
    )
    text = processor.apply_chat_template([{"role": "user", "content": content}])
    return processor(text, images=list(images), videos=list(videos), **caps)["input_ids"].shape[1]


def run_json(s, *args):
    out = cli(
        "generate",
        "--model",
        str(s["path"]),
        "--prompt",
        PROMPT,
        "--max-tokens",
        "2",
        "--json",
        *args,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_version_and_module_entry_point():
    from importlib.metadata import version

    out = cli("--version")
    assert out.returncode == 0 and out.stdout.startswith(f"mlx-glm4v {version('mlx-glm4v')} (mlx ")
    out = cli("--help")
    assert out.returncode == 0 and "generate" in out.stdout and "convert" in out.stdout


def test_max_pixels_caps_each_image(tiny):
    full = run_json(tiny, "--image", str(tiny["image"]))
    capped = run_json(tiny, "--image", str(tiny["image"]), "--max-pixels", str(28 * 28 * 64))
    assert full["prompt_tokens"] == prompt_tokens(tiny, [tiny["image"]])
    assert capped["prompt_tokens"] == prompt_tokens(tiny, [tiny["image"]], max_pixels=28 * 28 * 64)
    # 315 image tokens -> at most 64
    assert full["prompt_tokens"] - capped["prompt_tokens"] >= 315 - 64


def test_fps_and_max_frames_sample_videos(tiny):
    video = tiny["video"]
    full = run_json(tiny, "--video", str(video))
    slow = run_json(tiny, "--video", str(video), "--fps", "1")
    few = run_json(tiny, "--video", str(video), "--max-frames", "2", "--max-pixels", str(28 * 28))
    assert full["prompt_tokens"] == prompt_tokens(tiny, videos=[video])
    assert slow["prompt_tokens"] == prompt_tokens(tiny, videos=[video], fps=1)
    assert few["prompt_tokens"] == prompt_tokens(
        tiny, videos=[video], max_frames=2, max_pixels=28 * 28
    )
    assert few["prompt_tokens"] < slow["prompt_tokens"] < full["prompt_tokens"]


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize(
    "args,message",
    [
        (["--max-pixels", "0"], "max-pixels 0 must be a positive number of pixels"),
        (["--fps", "0"], "fps 0.0 must be positive"),
        (["--max-frames", "1"], "max-frames 1 is too small"),
        (["--thinking-budget", "-2"], "thinking budget -2 must be 0 or a positive number"),
    ],
)
def test_bad_generation_options_are_one_line(tiny, command, args, message):
    extra = ["--prompt", "hi"] if command == "generate" else []
    one_line_error(cli(command, "--model", str(tiny["path"]), *extra, *args), message)


def test_prompt_from_standard_input(tiny):
    given = run_json(tiny, "--image", str(tiny["image"]))
    out = cli(
        "generate",
        "--model",
        str(tiny["path"]),
        "--image",
        str(tiny["image"]),
        "-p",
        "-",
        "--max-tokens",
        "2",
        "--json",
        input=PROMPT + "\n",
    )
    assert out.returncode == 0, out.stderr
    piped = json.loads(out.stdout)
    assert (piped["text"], piped["prompt_tokens"]) == (given["text"], given["prompt_tokens"])
    one_line_error(
        cli("generate", "--model", str(tiny["path"]), "-p", "-", input="\n"), "standard input"
    )


@pytest.fixture(scope="module")
def thinker(glm4v_checkpoint, tmp_path_factory):
    """The tiny GLM-4.1V, except that `<think>` takes the place of the token the model says
    first, so that a reply starts thinking as GLM-4.1V's do: its lm_head row is that token's, a
    little larger."""
    from safetensors.numpy import load_file, save_file

    path = glm4v_checkpoint[0]
    model, processor = load(path)
    first = next(r.token for r in stream_generate(model, processor, PROMPT, max_tokens=1))
    think = processor.convert_tokens_to_ids("<think>")
    copy = tmp_path_factory.mktemp("glm4v-thinker")
    shard = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][
        "lm_head.weight"
    ]
    for f in path.iterdir():
        if f.name != shard:
            (copy / f.name).symlink_to(f)
    tensors = load_file(str(path / shard))
    tensors["lm_head.weight"][think] = tensors["lm_head.weight"][first] * 1.05
    save_file(tensors, str(copy / shard), metadata={"format": "pt"})
    model, processor = load(copy)
    return dict(path=copy, model=model, processor=processor)


def test_json_splits_reasoning_and_answer_and_budget_closes_thinking(thinker):
    free = run_json(thinker, "--max-tokens", "12")
    assert free["text"].startswith("<think>") and "</think>" not in free["text"]
    out = run_json(thinker, "--max-tokens", "12", "--thinking-budget", "3")
    assert out["text"] == generate(
        thinker["model"], thinker["processor"], PROMPT, max_tokens=12, thinking_budget=3
    )
    assert "</think>" in out["text"] and out["text"] != free["text"]
    parts = split_reply(out["text"])
    assert (out["reasoning"], out["answer"]) == (parts.reasoning, parts.answer)
    assert out["reasoning"] and out["answer"] and "think>" not in out["reasoning"] + out["answer"]
    assert out["load_s"] > 0


def test_hide_thinking_prints_the_answer_only(thinker):
    reply = run_json(thinker, "--max-tokens", "12", "--thinking-budget", "3")
    out = cli(
        "generate",
        "--model",
        str(thinker["path"]),
        "--prompt",
        PROMPT,
        "--max-tokens",
        "12",
        "--thinking-budget",
        "3",
        "--hide-thinking",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == reply["answer"] and reply["reasoning"] not in out.stdout
    assert out.stderr.startswith("Load: ") and "Prompt: " in out.stderr


def test_loads_eagerly_unless_asked(glm4v_checkpoint):
    """Weights are read at load (their memory is in use then), or, with --lazy-load, when first
    used."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_glm4v.commands.reply import Reply, load_for_cli

    def loaded_bytes(lazy):
        mx.clear_cache()
        before = mx.get_active_memory()
        model, _, seconds = load_for_cli(
            Reply(str(glm4v_checkpoint[0]), [], [], None, None, {}, lazy_load=lazy)
        )
        assert seconds > 0
        return (
            mx.get_active_memory() - before,
            sum(v.nbytes for _, v in tree_flatten(model.parameters())),
            model,
        )

    used, total, eager = loaded_bytes(False)
    assert used >= 0.9 * total
    used, total, lazy = loaded_bytes(True)
    assert used <= 0.1 * total
    del eager, lazy


def test_kv_bits_on_an_odd_head_size_is_one_line(glm4v_moe_checkpoint, glm4v_checkpoint):
    one_line_error(
        cli(
            "generate", "--model", str(glm4v_moe_checkpoint[0]), "--prompt", "hi", "--kv-bits", "4"
        ),
        "kv-bits needs the attention head size (48) to be a multiple of 32, 64 or 128",
    )
    out = cli(
        "generate",
        "--model",
        str(glm4v_checkpoint[0]),
        "--prompt",
        "hi",
        "--kv-bits",
        "4",
        "--max-tokens",
        "3",
    )
    assert out.returncode == 0, out.stderr


# ---------------------------------------------------------------- download errors


class FakeHub(BaseHTTPRequestHandler):
    """Answers repo look-ups as huggingface.co does: by the repo's name."""

    ANSWERS = {
        "missing": (404, {"X-Error-Code": "RepoNotFound"}),
        "private": (401, {}),
        "gated": (
            403,
            {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this repo is restricted."},
        ),
        "badtoken": (401, {"X-Error-Message": "Invalid credentials in Authorization header"}),
    }

    def do_GET(self):
        name = self.path.split("/")[4] if self.path.startswith("/api/models/") else ""
        status, headers = self.ANSWERS.get(name, (500, {}))
        self.send_response(status)
        for k, v in {**headers, "Content-Type": "application/json"}.items():
            self.send_header(k, v)
        body = b'{"error": "no"}'
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def no_env(*names):
    return {k: v for k, v in os.environ.items() if k not in names}


def cli_clean(args, env, input=None):
    """The CLI with none of the user's hub or model settings, then `env`."""
    base = no_env(
        "HF_HUB_OFFLINE", "HF_TOKEN", "MLX_GLM4V_MODEL", "HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE"
    )
    return subprocess.run(
        [sys.executable, "-m", "mlx_glm4v", *args],
        capture_output=True,
        text=True,
        input=input,
        env={**base, **env},
        timeout=300,
    )


@pytest.mark.parametrize(
    "repo,message",
    [
        (
            "someone/missing",
            "someone/missing was not found on the Hugging Face hub; "
            "if it is private or gated, log in",
        ),
        (
            "someone/private",
            "someone/private was not found on the Hugging Face hub; "
            "if it is private or gated, log in",
        ),
        (
            "someone/gated",
            "someone/gated is gated: accept its conditions on "
            "https://huggingface.co/someone/gated and log in",
        ),
        (
            "someone/badtoken",
            "the Hugging Face hub refused the token sent for someone/badtoken; log in",
        ),
    ],
)
def test_hub_answers_become_one_sentence(hub, tmp_path, repo, message):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": hub}
    out = cli_clean(["generate", "--model", repo, "--prompt", "hi"], env)
    one_line_error(out, message)
    assert "--model LOCAL_DIR" not in out.stderr  # the user chose this model


def test_offline_mode_and_the_default_model(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = cli_clean(["generate", "--model", "someone/not-cached", "--prompt", "hi"], env)
    one_line_error(
        out,
        "someone/not-cached is not in the local Hugging Face cache and offline mode is set "
        "(HF_HUB_OFFLINE)",
    )
    verbose = cli_clean(
        ["generate", "--model", "someone/not-cached", "--prompt", "hi", "--verbose"], env
    )
    # the cause, chained
    assert verbose.returncode != 0 and "OfflineModeIsEnabled" in verbose.stderr
    default = cli_clean(["generate", "--prompt", "hi"], env)
    one_line_error(default, "zai-org/GLM-4.1V-9B-Thinking is not in the local Hugging Face cache")
    assert "--model LOCAL_DIR" in default.stderr


def test_unreachable_hub(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    one_line_error(
        cli_clean(["generate", "--model", "someone/model", "--prompt", "hi"], env),
        "someone/model could not be downloaded: the Hugging Face hub cannot be reached "
        "(ConnectError)",
    )


def test_full_disk(monkeypatch):
    """A disk cannot be filled here: the download raises what Python raises on a full one."""
    import huggingface_hub

    from mlx_glm4v.checkpoints.loader import resolve

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", full)
    with pytest.raises(Glm4vError, match="someone/model could not be downloaded: the disk is full"):
        resolve("someone/model")
