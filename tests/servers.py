"""Real `mlx-glm4v serve` processes for the HTTP tests, and what the dialect tests (Responses,
Anthropic Messages) share: a checkpoint scripted to call a tool, and its conversation through chat
completions."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import data_url, free_port, picture, png_bytes

from mlx_glm4v.inputs.processor import REPLY_MARKERS, Processor

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parent.parent


class Server:
    """`serve` in a process of its own (`launcher`: a command that starts it, e.g. mlx.launch;
    `checkpoint` None: the models come from `args`, e.g. --models)."""

    def __init__(self, checkpoint, args, log_path, key=None, launcher=(), env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = key
        self.log_path = log_path
        # this checkout first; what the caller's PYTHONPATH adds (packages installed aside) after
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path, **(env or {})}
        env.pop("MLX_GLM4V_API_KEY", None)
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [
                *launcher,
                sys.executable,
                "-m",
                "mlx_glm4v",
                "serve",
                *(["--model", str(checkpoint)] if checkpoint is not None else []),
                "--port",
                str(self.port),
                *args,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, Path(log_path).read_text()
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError("the server did not become ready: " + Path(log_path).read_text())
        self.model = Path(checkpoint).name if checkpoint is not None else None
        self.client = openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=key or "unused", max_retries=0, timeout=60
        )

    def post(self, body, key="default", **kwargs):
        key = self.key if key == "default" else key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        kwargs.setdefault("timeout", 60)
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=headers, **kwargs)

    def metrics(self) -> dict:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        text = httpx.get(f"{self.url}/metrics", headers=headers, timeout=10).text
        return {k: float(v) for k, v in re.findall(r"^mlx_glm4v_(\S+) (\S+)$", text, re.M)}

    def close(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


# ---- the dialect tests' scripted server ----------------------------------------------------------

SCRIPTED_KEY = "dialect-key-3b1"  # the scripted servers' API key
# Every token differs (a scripted reply's rule: no newline, the prompt ends with one); the argument
# holds a quote and a backslash. a space and a comma: never part of base64, so never in a sealed
# blob by chance
THOUGHT = "Hm, Jug"
TOOL_SCRIPT = (
    f"<think>{THOUGHT}</think>OK<tool_call>fox<arg_key>city</arg_key>"
    '<arg_value>Pa"r\\is</arg_value></tool_call>'
)
FOX = {
    "type": "function",
    "name": "fox",
    "description": "Look a city up.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def images(n):
    """`n` pictures of different sizes, as PNG data URLs."""
    return [data_url(png_bytes(picture(112 + 28 * i, 140, 50 + i))) for i in range(n)]


def special_text(server):
    """Every special token of the served tokenizer as text; and those an assistant's content may
    not hold as text (GLM-V's reply markers stay markers there, in every dialect)."""
    tokens = list(Processor.from_pretrained(server.checkpoint).tokenizer.added)
    return " ".join(tokens), " ".join(t for t in tokens if t not in REPLY_MARKERS)


def chat_twin(server, text, assistant, reasoning=True):
    """The same conversation through chat completions: its prompt tokens (test_text_is_data
    checks them)."""
    tool = {
        "type": "function",
        "function": {"name": "fox", "description": f"Look {text}", "parameters": FOX["parameters"]},
    }
    messages = [
        {"role": "system", "content": f"Rules {text}"},
        {"role": "user", "content": f"Hi {text}"},
        {
            "role": "assistant",
            "content": f"Calling {assistant}",
            **({"reasoning_content": f"Think {text}"} if reasoning else {}),
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "fox", "arguments": json.dumps({"city": text})},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": f"Found {text}"},
    ]
    out = server.client.chat.completions.create(
        model=server.model, messages=messages, tools=[tool], max_completion_tokens=1
    )
    return out.usage.prompt_tokens
