"""The real coding agents, unmodified, against `mlx-glm4v serve`: Codex CLI through the Responses
API, Claude Code through Anthropic's Messages API.

The agents come from npm (`.ci/run` installs the versions pinned in `.ci/agents/` into `.agents/`);
without them these tests are skipped. The server runs a tiny GLM-4.5V checkpoint (its template
has tools) scripted to reply a fixed text or a fixed tool call for a tool the agent really has.
Each agent talks to the server through tests/capture_server.py relaying to it, so the tests see
every request the agent made and every status and reply it got back.

A scripted model calls its tool again after every result: the agents are stopped once their
second request, carrying the tool's output, has been answered in full and they have acted on it.

The agents' own options shorten their system prompts (Codex's `model_instructions_file`, Claude
Code's `--system-prompt` and `--tools Bash`) to 8k and 4k tokens of the tiny tokenizer: their
default requests, 40-50 KB, are 20k tokens, minutes of prefill on a small CPU. Every other part of
the requests (tools of every kind, message roles, reasoning and thinking settings, headers) is
what the agents send.
"""

import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import tiny
from capture_server import Recorder
from helpers import picture
from servers import Server

pytestmark = pytest.mark.agents

ROOT = Path(__file__).resolve().parent.parent
AGENTS = ROOT / ".agents" / "node_modules" / ".bin"
MODEL = "glm-tiny"
# Whole tokens in the tiny tokenizer, so that every scripted reply's tokens differ.
WORDS = ["exec_command", "cmd", "Bash", "command", "echo hi"]
HELLO = "Hello!"
# GLM-4.5V's tool-call form, for Codex's shell tool and Claude Code's Bash tool.
CODEX_CALL = (
    "<tool_call>exec_command<arg_key>cmd</arg_key><arg_value>echo hi</arg_value></tool_call>"
)
CLAUDE_CALL = "<tool_call>Bash<arg_key>command</arg_key><arg_value>echo hi</arg_value></tool_call>"
TIMEOUT = 180
INSTRUCTIONS = "You are a coding agent. Run shell commands when asked."


def agent(name: str) -> str:
    """The agent's binary: the project-local npm prefix first, then PATH."""
    found = AGENTS / name
    if found.exists():
        return str(found)
    if path := shutil.which(name):
        return path
    pytest.skip(
        f"`{name}` is not installed: `npm ci --prefix .agents` with .ci/agents/package*.json "
        "(.ci/run does)"
    )


@pytest.fixture(scope="module")
def codex_bin():
    return agent("codex")


@pytest.fixture(scope="module")
def claude_bin():
    return agent("claude")


# ---- checkpoints and servers
# -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent_checkpoint(tmp_path_factory):
    """A tiny GLM-4.5V checkpoint whose tokenizer keeps the scripts' words whole, with the real
    model's context (the tiny config's 4096 tokens hold not even an agent's first request)."""
    path = tmp_path_factory.mktemp("agents-tiny")
    tiny.build_checkpoint(path, family="glm4v_moe", words=WORDS, vocab_size=480)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 65536
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def scripted(agent_checkpoint, tmp_path_factory, script):
    # GLM-4.5V's generation prompt ends with "\n", with thinking on or off: the script follows it.
    return tiny.scripted_checkpoint(
        agent_checkpoint, tmp_path_factory.mktemp("agents-script") / MODEL, script
    )


def serve(checkpoint, tmp_path_factory, *args):
    return Server(checkpoint, list(args), tmp_path_factory.mktemp("agents-log") / "server.log")


@pytest.fixture(scope="module")
def hello_server(agent_checkpoint, tmp_path_factory):
    server = serve(
        scripted(agent_checkpoint, tmp_path_factory, HELLO), tmp_path_factory, "--answer-any-model"
    )
    yield server
    server.close()


@pytest.fixture(scope="module")
def codex_tool_server(agent_checkpoint, tmp_path_factory):
    server = serve(scripted(agent_checkpoint, tmp_path_factory, CODEX_CALL), tmp_path_factory)
    yield server
    server.close()


@pytest.fixture(scope="module")
def claude_tool_server(agent_checkpoint, tmp_path_factory):
    server = serve(scripted(agent_checkpoint, tmp_path_factory, CLAUDE_CALL), tmp_path_factory)
    yield server
    server.close()


@pytest.fixture
def relay(request, tmp_path):
    """A recorder relaying to the test's server; prints what it saw when the test fails."""
    recorders = []

    def start(server) -> Recorder:
        recorder = Recorder(tmp_path / f"requests-{len(recorders)}", upstream=server.url).start()
        recorders.append((recorder, server))
        return recorder

    yield start
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for recorder, server in recorders:
        recorder.shutdown()
        recorder.server_close()
        if failed:
            for r in recorder.records():
                print(r["method"], r["path"], r.get("status"), (r.get("reply") or "")[-2000:])
            print(Path(server.log_path).read_text()[-4000:])


def metric(server, name) -> float:
    return server.metrics()[name]


# ---- running the agents
# -----------------------------------------------------------------------------


def agent_env(home: Path, **extra) -> dict:
    """A clean environment: a temporary HOME, no credentials or settings from the machine."""
    keep = {
        k: v
        for k, v in os.environ.items()
        if k in ("PATH", "LANG", "LC_ALL", "TERM", "TMPDIR", "SYSTEMROOT")
    }
    home.mkdir(parents=True, exist_ok=True)
    return {**keep, "HOME": str(home), "NO_COLOR": "1", **extra}


def codex_home(tmp_path: Path, url: str) -> Path:
    """CODEX_HOME with a config.toml naming the server as a custom Responses provider (README,
    Agents)."""
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "instructions.md").write_text(INSTRUCTIONS)
    (home / "config.toml").write_text(f"""model = "{MODEL}"
model_provider = "mlx-glm4v"
model_instructions_file = "{home / "instructions.md"}"

[model_providers.mlx-glm4v]
name = "mlx-glm4v"
base_url = "{url}/v1"
wire_api = "responses"
env_key = "MLX_GLM4V_API_KEY"
""")
    return home


def codex(binary, tmp_path, url, prompt, *args):
    """`codex exec --json` as a process, in a fresh work folder; its stdout is the event stream."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    env = agent_env(
        tmp_path / "home", CODEX_HOME=str(codex_home(tmp_path, url)), MLX_GLM4V_API_KEY="unused"
    )
    command = [
        binary,
        "exec",
        "--json",
        "--skip-git-repo-check",
        "--ephemeral",
        "--dangerously-bypass-approvals-and-sandbox",
        "-C",
        str(work),
        prompt,
        *args,
    ]
    return subprocess.Popen(
        command,
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def claude_env(tmp_path, url, named=True) -> dict:
    """Claude Code pointed at the server (README, Agents): side tasks on the one served model, or
    (named=False) its own model names, for a server that answers any (`--answer-any-model`)."""
    models = dict(
        ANTHROPIC_MODEL=MODEL,
        ANTHROPIC_DEFAULT_HAIKU_MODEL=MODEL,
        ANTHROPIC_DEFAULT_SONNET_MODEL=MODEL,
        ANTHROPIC_DEFAULT_OPUS_MODEL=MODEL,
        CLAUDE_CODE_SUBAGENT_MODEL=MODEL,
    )
    return agent_env(
        tmp_path / "home",
        ANTHROPIC_BASE_URL=url,
        ANTHROPIC_AUTH_TOKEN="unused",
        **(models if named else {}),
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        DISABLE_TELEMETRY="1",
        DISABLE_AUTOUPDATER="1",
        DISABLE_ERROR_REPORTING="1",
    )


def claude(binary, tmp_path, url, prompt, *args, named=True):
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    model = ["--model", MODEL] if named else []
    command = [
        binary,
        "-p",
        prompt,
        *model,
        "--system-prompt",
        INSTRUCTIONS,
        "--tools",
        "Bash",
        *args,
    ]
    return subprocess.Popen(
        command,
        cwd=work,
        env=claude_env(tmp_path, url, named),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(process, timeout=TIMEOUT) -> tuple:
    """(exit status, stdout, stderr) of an agent that ends by itself."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        stop(process)
        out, err = process.communicate()
        raise AssertionError(
            f"the agent did not finish in {timeout} s:\n{out[-3000:]}\n{err[-3000:]}"
        ) from e
    return process.returncode, out, err


def stop(process):
    """End an agent and whatever it started (its own process group)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def events(process, until, timeout=TIMEOUT) -> list:
    """The agent's JSON lines read until `until(events)` holds; then the agent is stopped."""
    lines = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(line) for line in process.stdout] + [lines.put(None)], daemon=True
    ).start()
    seen, deadline = [], time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            if line.strip().startswith("{"):
                seen.append(json.loads(line))
            if until(seen):
                return seen
    finally:
        stop(process)
    raise AssertionError(
        f"the agent stopped or ran out of time first:\n{json.dumps(seen, indent=1)[-4000:]}\n"
        f"{process.stderr.read()[-3000:]}"
    )


def streamed(record) -> list:
    """The events of a relayed streamed reply."""
    return [
        json.loads(line[6:])
        for line in (record.get("reply") or "").splitlines()
        if line.startswith("data: {")
    ]


def cached_share(record) -> float:
    """The share of a streamed reply's prompt read from the prefix cache, as its final usage
    says."""
    for event in reversed(streamed(record)):
        if event["type"] == "response.completed":
            usage = event["response"]["usage"]
            return usage["input_tokens_details"]["cached_tokens"] / usage["input_tokens"]
        if event["type"] == "message_delta":  # Anthropic's input_tokens leave out the cached ones
            usage = event["usage"]
            return usage["cache_read_input_tokens"] / (
                usage["input_tokens"]
                + usage["cache_read_input_tokens"]
                + usage["cache_creation_input_tokens"]
            )
    raise AssertionError(f"no usage in {record.get('reply')!r}")


def answered(record) -> bool:
    """A relayed request answered 200 whose streamed reply ran to its last event."""
    reply = record.get("reply") or ""
    return record.get("status") == 200 and (
        "response.completed" in reply or "message_stop" in reply
    )


# ---- Codex CLI
# -----------------------------------------------------------------------------------------


def test_codex_exec_completes_a_turn(codex_bin, hello_server, relay, tmp_path):
    recorder = relay(hello_server)
    status, out, err = finish(codex(codex_bin, tmp_path, recorder.url, "Say hello"))
    assert status == 0, out + err
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    said = [
        e["item"]["text"]
        for e in lines
        if e["type"] == "item.completed" and e["item"]["type"] == "agent_message"
    ]
    assert said == [HELLO], lines
    requests = recorder.records()
    assert [(r["method"], r["path"]) for r in requests] == [("POST", "/v1/responses")]
    assert answered(requests[0])


def test_codex_exec_with_an_image(codex_bin, hello_server, relay, tmp_path):
    recorder = relay(hello_server)
    picture(64, 48, 7).save(tmp_path / "photo.png")
    encoded = metric(hello_server, "vision_encodes_total")
    prompt, photo = "What is in this picture?", str(tmp_path / "photo.png")
    status, out, err = finish(codex(codex_bin, tmp_path, recorder.url, prompt, "-i", photo))
    assert status == 0, out + err
    assert f'"text":"{HELLO}"' in out.replace(" ", "")
    (request,) = recorder.records()
    parts = [p["type"] for item in request["body"]["input"] for p in item.get("content", [])]
    assert "input_image" in parts
    assert answered(request)
    # the picture went through the vision tower
    assert metric(hello_server, "vision_encodes_total") > encoded


def test_codex_runs_the_shell_tool_and_sends_its_output_back(
    codex_bin, codex_tool_server, relay, tmp_path
):
    recorder = relay(codex_tool_server)
    process = codex(codex_bin, tmp_path, recorder.url, "Run echo hi")

    def commands(seen):
        return [
            e["item"]
            for e in seen
            if e["type"] == "item.completed" and e["item"]["type"] == "command_execution"
        ]

    # The second command is what the model answered to the first one's output.
    seen = events(process, lambda seen: len(commands(seen)) >= 2)
    first = commands(seen)[0]
    assert (
        "echo hi" in first["command"]
        and first["exit_code"] == 0
        and first["aggregated_output"].strip() == "hi"
    )
    requests = recorder.records()
    assert len(requests) >= 2 and all(r["path"] == "/v1/responses" for r in requests)
    follow_up = requests[1]
    outputs = [
        item for item in follow_up["body"]["input"] if item.get("type") == "function_call_output"
    ]
    calls = [item for item in follow_up["body"]["input"] if item.get("type") == "function_call"]
    assert [c["name"] for c in calls] == ["exec_command"] and json.loads(calls[0]["arguments"]) == {
        "cmd": "echo hi"
    }
    assert (
        len(outputs) == 1
        and outputs[0]["call_id"] == calls[0]["call_id"]
        and "hi" in json.dumps(outputs[0])
    )
    assert answered(follow_up)
    assert cached_share(follow_up) >= 0.9  # the conversation so far came from the prefix cache


# ---- Claude Code
# ---------------------------------------------------------------------------------------


def test_claude_completes_a_turn(claude_bin, hello_server, relay, tmp_path):
    recorder = relay(hello_server)
    status, out, err = finish(
        claude(claude_bin, tmp_path, recorder.url, "Say hello", "--output-format", "json")
    )
    assert status == 0, out + err
    result = json.loads(out)
    assert (
        result["subtype"] == "success" and not result["is_error"] and result["result"] == HELLO
    ), result
    requests = recorder.records()
    assert [(r["method"], r["path"]) for r in requests] == [("POST", "/v1/messages?beta=true")]
    assert answered(requests[0])


def test_claude_with_its_own_model_names(claude_bin, hello_server, relay, tmp_path):
    """No model variables: Claude Code asks for its own default model, which `--answer-any-model`
    serves."""
    recorder = relay(hello_server)
    process = claude(
        claude_bin, tmp_path, recorder.url, "Say hello", "--output-format", "json", named=False
    )
    status, out, err = finish(process)
    assert status == 0, out + err
    assert json.loads(out)["result"] == HELLO
    (request,) = recorder.records()
    assert request["body"]["model"] != MODEL and answered(request)


def test_claude_second_run_reads_its_prompt_from_the_cache(
    claude_bin, hello_server, relay, tmp_path
):
    """Same system prompt and tools, a new session: the server's prefix cache serves the prompt."""
    recorder = relay(hello_server)
    runs = []
    for _ in range(2):
        process = claude(
            claude_bin, tmp_path, recorder.url, "Say hello again", "--output-format", "json"
        )
        status, out, err = finish(process)
        assert status == 0, out + err
        runs.append(json.loads(out)["usage"])
    second = runs[1]  # Anthropic's input_tokens leave out the cached ones
    prompt = (
        second["input_tokens"]
        + second["cache_read_input_tokens"]
        + second["cache_creation_input_tokens"]
    )
    assert prompt > 1000 and second["cache_read_input_tokens"] >= 0.9 * prompt, runs


def test_claude_runs_bash_and_sends_its_output_back(
    claude_bin, claude_tool_server, relay, tmp_path
):
    recorder = relay(claude_tool_server)
    # Two model turns: the call, then the answer to its result (the scripted model calls again).
    process = claude(
        claude_bin,
        tmp_path,
        recorder.url,
        "Run echo hi",
        "--output-format",
        "stream-json",
        "--verbose",
        "--max-turns",
        "2",
        "--allowedTools",
        "Bash(echo hi)",
    )

    def blocks(seen, role, kind):
        return [
            b
            for e in seen
            if e.get("type") == role
            for b in e["message"]["content"]
            if isinstance(b, dict) and b.get("type") == kind
        ]

    seen = events(process, lambda seen: any(e.get("type") == "result" for e in seen))
    uses, results = blocks(seen, "assistant", "tool_use"), blocks(seen, "user", "tool_result")
    assert len(uses) == 2, seen  # the second: the model's answer to the tool's output
    assert uses[0]["name"] == "Bash" and uses[0]["input"] == {"command": "echo hi"}
    assert results[0]["tool_use_id"] == uses[0]["id"] and not results[0].get("is_error")
    assert "hi" in json.dumps(results[0]["content"])
    requests = recorder.records()
    assert len(requests) == 2 and all(r["path"] == "/v1/messages?beta=true" for r in requests)
    last = requests[1]["body"]["messages"][-1]
    sent = [b for b in last["content"] if b["type"] == "tool_result"]
    assert last["role"] == "user" and sent and sent[0]["tool_use_id"] == uses[0]["id"]
    assert all(answered(r) for r in requests)
    assert cached_share(requests[1]) >= 0.9  # the conversation so far came from the prefix cache
