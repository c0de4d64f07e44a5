"""The prefix cache's disk tier through real `serve` processes: prompts kept across a restart,
damaged and foreign files skipped, the size cap, media told apart by pixels, sealed reasoning
that opens after a restart."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny
from helpers import data_url, picture, png_bytes
from servers import FOX as TOOL
from servers import SCRIPTED_KEY, TOOL_SCRIPT, Server

anthropic = pytest.importorskip("anthropic")

FILES = "*-*.safetensors"
FOX = {"name": TOOL["name"], "description": TOOL["description"], "input_schema": TOOL["parameters"]}


def messages(image, text):
    return [
        {"role": "system", "content": "You look at pictures carefully. " * 8},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image}},
                {"type": "text", "text": text},
            ],
        },
    ]


def ask(server, image, text="Describe it."):
    """A greedy request with one image; (reply content, usage)."""
    body = {
        "model": server.model,
        "messages": messages(image, text),
        "max_tokens": 6,
        "temperature": 0,
    }
    reply = server.post(body)
    assert reply.status_code == 200, reply.text
    out = reply.json()
    return out["choices"][0]["message"]["content"], out["usage"]


def written(server, n, timeout=30):
    """Wait until the server has written `n` prompts to disk."""
    deadline = time.monotonic() + timeout
    while server.metrics().get("prompt_cache_disk_writes_total", 0) < n:
        assert time.monotonic() < deadline, "the prompt cache was not written"
        time.sleep(0.05)


def cache_files(directory):
    return sorted(Path(directory).glob(FILES))


IMAGE_A = data_url(png_bytes(picture(112, 140, 7)))
IMAGE_B = data_url(png_bytes(picture(112, 140, 8)))  # the same size: the same tokens


@pytest.fixture(scope="module")
def cold(glm4v_checkpoint, tmp_path_factory):
    """A first server over an empty cache directory: (directory, a copy of the file it wrote,
    reply, usage)."""
    base = tmp_path_factory.mktemp("disk")
    directory = base / "cache"
    server = Server(glm4v_checkpoint[0], ["--prompt-cache-dir", str(directory)], base / "1.log")
    try:
        reply, usage = ask(server, IMAGE_A)
        written(server, 1)
    finally:
        server.close()
    (written_file,) = cache_files(directory)
    (base / "first").mkdir()
    good = shutil.copy2(written_file, base / "first" / written_file.name)
    return directory, Path(good), reply, usage


def test_a_restarted_server_reads_the_prompt_from_disk(glm4v_checkpoint, cold, tmp_path):
    directory, _, reply, usage = cold
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert len(cache_files(directory)) == 1
    key = directory / "sealing.key"
    assert key.stat().st_mode & 0o777 == 0o600
    server = Server(glm4v_checkpoint[0], ["--prompt-cache-dir", str(directory)], tmp_path / "2.log")
    try:
        again, usage2 = ask(server, IMAGE_A)
        metrics = server.metrics()
        # the last prompt token always runs: its logits give the first token
        assert usage2["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1
        assert metrics["prompt_cache_disk_reads_total"] == 1
        assert metrics["prompt_cache_disk_tokens_total"] >= usage["prompt_tokens"] - 1
        assert again == reply
        # an image of the same size with other pixels: the same token ids, another prompt
        other, usage3 = ask(server, IMAGE_B)
        assert usage3["prompt_tokens"] == usage["prompt_tokens"]
        assert usage3["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"] - 8
        written(server, 1)
        assert len(cache_files(directory)) == 2
    finally:
        server.close()


def test_sigterm_flushes_the_disk_tier(glm4v_checkpoint, cold, tmp_path):
    """SIGTERM right after a reply: the drain waits for the prompt's file before the exit."""
    directory = tmp_path / "cache"
    server = Server(glm4v_checkpoint[0], ["--prompt-cache-dir", str(directory)], tmp_path / "log")
    try:
        assert ask(server, IMAGE_A) == cold[2:]
        server.process.send_signal(signal.SIGTERM)  # no wait for the writer
        assert server.process.wait(60) == 0
    finally:
        server.close()
    (file,) = cache_files(directory)
    assert file.read_bytes() == cold[1].read_bytes()


def test_damaged_and_foreign_files_are_skipped(glm4v_checkpoint, cold, tmp_path):
    from mlx_glm4v.serving.disk_cache import CacheKey, read_entry, write_entry

    _, good, reply, usage = cold
    damaged = tmp_path / "cache"
    damaged.mkdir()
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    prefix = good.name.split("-")[0]
    (damaged / f"{prefix}-{'0' * 63}1.safetensors").write_bytes(data)  # one byte changed
    truncated = good.read_bytes()[: len(data) // 3]
    name = good.name.replace(good.name.split("-")[1][:8], "deadbeef")
    (damaged / name).write_bytes(truncated)
    # another model's file under a name that claims it is ours
    ours = CacheKey(**{**read_metadata_key(good)})
    foreign = CacheKey(**{**read_metadata_key(good), "model": "another checkpoint"})
    entry = read_entry(good, ours)
    path = write_entry(damaged, entry, foreign)
    path.rename(damaged / f"{prefix}-{path.name.split('-')[1]}")
    log = tmp_path / "3.log"
    server = Server(glm4v_checkpoint[0], ["--prompt-cache-dir", str(damaged)], log)
    try:
        again, usage2 = ask(server, IMAGE_A)
        assert again == reply
        assert usage2["prompt_tokens_details"]["cached_tokens"] == 0
        assert server.metrics()["prompt_cache_disk_skipped_total"] == 3
    finally:
        server.close()
    text = "\n".join(line for line in log.read_text().splitlines() if "prompt cache" in line)
    assert text.count("prompt cache: skipping") == 3
    assert "made with another model" in text and "do not match its name" in text, text


def read_metadata_key(file):
    from mlx_glm4v.serving.disk_cache import read_metadata

    return read_metadata(file)["key"]


def test_a_warm_prompt_and_a_tiny_cap(glm4v_checkpoint, cold, tmp_path):
    """--warm-prompt prefills at start-up (a request like it reads it whole); a cap with room
    for two prompts keeps the two most recently used."""
    good = cold[1]
    cap = good.stat().st_size * 5 // 2  # room for two prompts, not three
    capped = tmp_path / "cache"
    warm = tmp_path / "warm.json"
    warm.write_text(json.dumps({"messages": messages(IMAGE_A, "One.")}))
    server = Server(
        glm4v_checkpoint[0],
        [
            *("--prompt-cache-dir", str(capped), "--prompt-cache-size", str(cap)),
            *("--warm-prompt", str(warm)),
        ],
        tmp_path / "4.log",
    )
    try:
        written(server, 1)
        (first,) = cache_files(capped)
        ask(server, IMAGE_A, "Two, please.")
        written(server, 2)
        (second,) = set(cache_files(capped)) - {first}
        # the warm prompt again, from memory: its file is used too
        _, usage = ask(server, IMAGE_A, "One.")
        assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1
        ask(server, IMAGE_A, "Three, at last.")
        written(server, 3)
        files = cache_files(capped)
        assert len(files) == 2 and first in files and second not in files
    finally:
        server.close()
    bad = tmp_path / "bad.json"
    bad.write_text('{"messages": "hi"}')
    out = cli("serve", "--model", str(glm4v_checkpoint[0]), "--warm-prompt", str(bad))
    assert out.returncode == 1 and "is not a JSON object with a list of messages" in out.stderr
    out = cli("serve", "--model", str(glm4v_checkpoint[0]), "--prompt-cache-size", "lots")
    assert out.returncode == 1 and "is not a size such as 4GB" in out.stderr


def test_sealed_reasoning_opens_after_a_restart(glm4v_moe_checkpoint, tmp_path):
    """An agent's turn that resends the thinking it was given: after a restart the thinking
    still opens, so the prompt is the same one and it starts from the disk cache."""
    path = tiny.scripted_checkpoint(glm4v_moe_checkpoint[0], tmp_path / "fox", TOOL_SCRIPT)
    directory = tmp_path / "cache"
    args = ["--api-key", SCRIPTED_KEY, "--prompt-cache-dir", str(directory)]

    def second_turn(server):
        c = anthropic.Anthropic(base_url=server.url, api_key=SCRIPTED_KEY, max_retries=0)
        first_messages = [{"role": "user", "content": "Where?"}]
        first = c.messages.create(
            model=server.model,
            max_tokens=100,
            tools=[FOX],
            messages=first_messages,
            extra_body={"temperature": 0},
        )
        assert [b.type for b in first.content] == ["thinking", "text", "tool_use"], first
        use = first.content[2]
        turn = first_messages + [
            {
                "role": "assistant",
                "content": [b.model_dump(exclude_none=True) for b in first.content],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny"}],
            },
        ]
        return c, turn

    server = Server(path, args, tmp_path / "5.log", key=SCRIPTED_KEY)
    try:
        c, turn = second_turn(server)
        before = c.messages.create(
            model=server.model,
            max_tokens=3,
            tools=[FOX],
            messages=turn,
            extra_body={"temperature": 0},
        )
        written(server, 2)
    finally:
        server.close()
    server = Server(path, args, tmp_path / "6.log", key=SCRIPTED_KEY)
    try:
        after = server_anthropic(server).messages.create(
            model=server.model,
            max_tokens=3,
            tools=[FOX],
            messages=turn,
            extra_body={"temperature": 0},
        )
    finally:
        server.close()
    total = before.usage.input_tokens + before.usage.cache_read_input_tokens
    # the thinking opened: the same prompt, all of it but its last token read from disk
    assert after.usage.input_tokens + after.usage.cache_read_input_tokens == total
    assert after.usage.cache_read_input_tokens == total - 1
    # the same reply (each seal has a nonce of its own)
    unsealed = [{**b.model_dump(), "signature": None} for b in after.content]
    assert unsealed == [{**b.model_dump(), "signature": None} for b in before.content]


def server_anthropic(server):
    return anthropic.Anthropic(base_url=server.url, api_key=SCRIPTED_KEY, max_retries=0)


def test_a_new_directory_gets_a_private_key(tmp_path):
    from mlx_glm4v.server import neutral

    key = neutral.use_key_in(tmp_path / "k")
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
    sealed = neutral.seal("thought")
    assert neutral.unseal(sealed) == "thought"
    assert neutral.unseal(sealed[:-4] + "AAAA") is None  # altered
    neutral.use_key_in(tmp_path / "other")
    assert neutral.unseal(sealed) is None  # another server's
    neutral.use_key_in(tmp_path / "k")
    assert neutral.unseal(sealed) == "thought"  # the same directory's key again


# ---- prompt cache files: cache-prompt, generate --prompt-cache ----------------------------------


def cli(*args, input=None):
    return subprocess.run(
        [sys.executable, "-m", "mlx_glm4v", *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=300,
    )


def test_a_prompt_cache_file_round_trip(glm4v_checkpoint, glm4v_moe_checkpoint, tmp_path):
    """generate from a file cache-prompt saved prints the plain run's bytes, with the prompt's
    shared part not run again; a file of another model is refused in one sentence."""
    image = tmp_path / "a.png"
    picture(112, 140, 7).save(image)
    model = str(glm4v_checkpoint[0])
    common = ["--model", model, "--image", str(image), "--system", "Look carefully. " * 20]
    saved = tmp_path / "prompt.safetensors"
    made = cli(
        "cache-prompt", *common, "--prompt", "What is it?", "--prompt-cache-file", str(saved)
    )
    assert made.returncode == 0, made.stderr
    ask = [*common, "--prompt", "What is it, then?", "--max-tokens", "8", "--json"]
    plain = cli("generate", *ask)
    cached = cli("generate", *ask, "--prompt-cache", str(saved))
    assert plain.returncode == 0 and cached.returncode == 0, cached.stderr
    assert json.loads(cached.stdout)["text"] == json.loads(plain.stdout)["text"]
    # the same run, in process, counts what the file held
    from mlx_glm4v.checkpoints.loader import load
    from mlx_glm4v.commands.cache_prompt import cli_cache_key
    from mlx_glm4v.commands.reply import Reply
    from mlx_glm4v.generation.generate import stream_generate
    from mlx_glm4v.serving.disk_cache import prompt_file_reuse

    loaded, processor = load(model)
    reply = Reply(model, [str(image)], [], None, None, {"prefill_step_size": 2048})
    reuse = prompt_file_reuse(saved, cli_cache_key(loaded, reply), loaded.config)
    held = []

    def counted(inputs, cache):
        held.append(reuse(inputs, cache))
        return held[-1]

    for _ in stream_generate(
        loaded,
        processor,
        "What is it, then?",
        [str(image)],
        system="Look carefully. " * 20,
        max_tokens=1,
        reuse=counted,
    ):
        pass
    assert held[0] > 100  # the system prompt and the image at least
    # chat: the first turn starts from the file, later turns from the session's own cache
    from mlx_glm4v.generation.chat import ChatSession

    turns = {}
    for name, hook in (("plain", None), ("cached", counted)):
        session = ChatSession(
            loaded, processor, "Look carefully. " * 20, hook, max_tokens=6, temp=0.0
        )
        turns[name] = [
            "".join(r.text for r in session.ask("What is it, then?", [str(image)])),
            "".join(r.text for r in session.ask("And its colour?")),
        ]
    assert turns["cached"] == turns["plain"] and held[-1] == held[0]
    typed = "What is it, then?\n"
    plain_chat = cli("chat", *common, "--max-tokens", "6", input=typed)
    cached_chat = cli(
        "chat", *common, "--max-tokens", "6", "--prompt-cache", str(saved), input=typed
    )
    assert plain_chat.returncode == 0 and cached_chat.returncode == 0, cached_chat.stderr
    assert cached_chat.stdout == plain_chat.stdout and plain_chat.stdout.strip()
    # another model's file
    other = cli(
        "generate",
        "--model",
        str(glm4v_moe_checkpoint[0]),
        "--prompt",
        "Hi",
        "--prompt-cache",
        str(saved),
    )
    assert other.returncode == 1 and "Traceback" not in other.stderr
    assert other.stderr.strip().count("\n") == 0
    assert "cannot be used: it was made with another model" in other.stderr
    # another prefill chunk changes the bits too
    chunk = cli("generate", *ask, "--prefill-step-size", "64", "--prompt-cache", str(saved))
    assert chunk.returncode == 1 and "prefill_chunk" in chunk.stderr
