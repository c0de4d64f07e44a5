"""Time to first token after a restart, for a request whose long prefix an earlier server kept on
disk (`serve --prompt-cache-dir`), against the same request's cold time; and that both replies
are the same bytes.

A small random checkpoint is built with transformers (the tests' builder, a larger text model:
512 wide, 8 layers), then: server 1 over an empty cache directory answers the request (cold: the
whole prompt runs) and writes its prompt to disk; it stops; server 2 over the same directory
answers the same request (its prompt read from disk). Both are streamed; time to first token is
taken at the client, from sending the request to the first content chunk.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/disk_cache_bench.py --work /tmp/disk-bench [--tokens 8192]
"""

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
TEXT = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "mrope_section": [4, 6, 6],  # half of a 64-wide head's rotary half
    },
)
WORDS = (
    "the quick brown fox jumps over lazy dog what is shown in picture cat sits on red sofa".split()
)


def checkpoint(work: Path) -> Path:
    path = work / "ckpt-512x8"
    if not (path / "config.json").exists():
        import tiny

        tiny.build_checkpoint(path, text_overrides=TEXT)
    return path


def system_text(path: Path, tokens: int) -> str:
    """Random words that the checkpoint's tokenizer makes about `tokens` tokens of."""
    from mlx_glm4v.inputs.processor import Processor

    tokenizer = Processor.from_pretrained(path).tokenizer
    rng = random.Random(0)
    words = [rng.choice(WORDS) for _ in range(tokens)]
    while len(tokenizer.encode(" ".join(words))) > tokens:
        words = words[: int(len(words) * 0.95)]
    return " ".join(words)


class Server:
    def __init__(self, path: Path, cache: Path, log: Path, env: dict):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlx_glm4v", "serve", "--model", str(path)]
            + ["--port", str(self.port), "--prompt-cache-dir", str(cache)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server stopped; see {log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"the server did not start; see {log}")

    def ask(self, body: dict):
        """(seconds to the first content chunk, the reply's text, its usage)."""
        start, first, text, usage = time.perf_counter(), None, "", None
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=3600) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices", []):
                    piece = choice["delta"].get("content") or ""
                    if piece and first is None:
                        first = time.perf_counter() - start
                    text += piece
                usage = chunk.get("usage") or usage
        return first, text, usage

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith(f"mlx_glm4v_{name} "):
                return float(line.split()[1])
        return 0.0

    def close(self):
        self.process.terminate()
        self.process.wait(timeout=120)
        self.log.close()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "mlx-glm4v-disk-bench"))
    ap.add_argument("--tokens", type=int, default=8192, help="the kept prefix's length")
    ap.add_argument("--blas", choices=["openblas", "bundled"], default="openblas")
    args = ap.parse_args(argv)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if args.blas == "openblas":
        env["LD_PRELOAD"] = OPENBLAS
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = checkpoint(work)
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))
    body = {
        "model": path.name,
        "messages": [
            {"role": "system", "content": system_text(path, args.tokens)},
            {"role": "user", "content": "What is shown?"},
        ],
        "max_tokens": 16,
        "temperature": 0,
    }
    server = Server(path, cache, work / "cold.log", env)
    try:
        cold, cold_text, cold_usage = server.ask(body)
        while server.metric("prompt_cache_disk_writes_total") < 1:
            time.sleep(0.1)
    finally:
        server.close()
    server = Server(path, cache, work / "warm.log", env)
    try:
        warm, warm_text, warm_usage = server.ask(body)
        reads = server.metric("prompt_cache_disk_reads_total")
    finally:
        server.close()
    size = sum(f.stat().st_size for f in cache.glob("*.safetensors"))
    row = dict(
        blas=args.blas,
        prompt_tokens=cold_usage["prompt_tokens"],
        cached_after_restart=warm_usage["prompt_tokens_details"]["cached_tokens"],
        disk_reads=reads,
        cache_mb=round(size / 2**20, 1),
        cold_ttft_s=round(cold, 3),
        restart_ttft_s=round(warm, 3),
        ratio=round(warm / cold, 4),
        same_reply=warm_text == cold_text,
    )
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
