"""Serving benchmark: N concurrent OpenAI clients against `mlx-glm4v serve` and `mlx_vlm.server`.

Both servers load the same random GLM-4.1V checkpoint (make_checkpoint.py, ~120M parameters,
float32, text weights wide enough that greedy replies vary) on the same backend, OpenBLAS
preloaded into both on Linux. Two request sets:

  mixed   64-token replies, half the prompts with one image of 140-224 px, half text only
  decode  256-token replies to text prompts (decode-heavy)
  schema  text prompts answered under `response_format` json_schema (a receipt: nested objects,
          an array of objects, enums, a date, bounded numbers), at most 384 tokens; each reply
          is checked against the schema (`valid`). The random checkpoint may open <think> and
          never close it, so these requests carry `thinking_budget` 16 (our extension)
  stall   (ours only, through HTTP) one long streamed text reply; once it streams, a 10 s
          640x480 clip; 1 s later a short text question. Reported: the stream's median, p99 and
          max gap between tokens, the question's and the clip's time to first token against
          their times alone (each alone on a fresh server), and whether all three replies equal
          their solo runs. `--max-stall-ms` is passed to the server when given.

For each tool, set and client count a fresh server process is started (no caches carried from
one run to the next), warmed with one short request, then N clients (threads with the `openai`
package, streaming) each send one request at once; with 1 client the first `--sequential` of
them go one after another. Reported: aggregate generated tokens/s (all tokens over the wall
time from the first request to the last reply), p50/p95 time to first token, the server's peak
resident memory, and whether each request's text equals the one that tool gave it
sequentially (for the requests both runs sent). All greedy.

    # both tools, both sets, 1 2 4 8 16 clients
    python benchmarks/serve_bench.py
    python benchmarks/serve_bench.py --tools ours --sets decode --clients 1,8 --json-out r.json
    # the engine without HTTP (no server needed)
    python benchmarks/serve_bench.py --in-process

Only 127.0.0.1 is used. Run it in a torch-free environment with the `bench` extra installed.
"""

import argparse
import base64
import io
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_checkpoint  # noqa: E402

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
TOPICS = [
    "a fox",
    "the sea",
    "a red sofa",
    "the time",
    "a cat",
    "a window",
    "the sun",
    "a dog",
    "a clock",
    "a river",
    "a train",
    "a city",
    "a garden",
    "a storm",
    "a book",
    "a song",
]
SIZES = [(140, 168), (224, 196), (168, 224), (196, 140)]


def image_url(width: int, height: int, seed: int) -> str:
    from PIL import Image

    rng = np.random.RandomState(seed)
    buffer = io.BytesIO()
    Image.fromarray((rng.rand(height, width, 3) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


RECEIPT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["vendor", "total", "items"],
    "properties": {
        "vendor": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "maxLength": 16},
                "date": {"type": "string", "format": "date"},
            },
        },
        "total": {"type": "number", "minimum": 0, "maximum": 10000, "multipleOf": 0.01},
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 4,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "qty"],
                "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    "kind": {"enum": ["food", "drink", "other"]},
                },
            },
        },
    },
}
SCHEMA_THINKING = 16
SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "receipt", "schema": RECEIPT, "strict": True},
}


def request_set(name: str, n: int, tiny: bool = False) -> list:
    """n requests: (messages, max_tokens, response_format or None); `tiny`: a few tokens each."""
    out = []
    for i in range(n):
        text = f"Tell me about {TOPICS[i % len(TOPICS)]}. " + "Be detailed. " * (i % 3)
        if name == "mixed" and i % 2 == 1:
            w, h = SIZES[(i // 2) % len(SIZES)]
            content = [
                {"type": "image_url", "image_url": {"url": image_url(w, h, i)}},
                {"type": "text", "text": f"Describe this image ({i})."},
            ]
            out.append(([{"role": "user", "content": content}], 8 if tiny else 64, None))
        elif name == "schema":
            prompt = f"Make up a receipt from {TOPICS[i % len(TOPICS)]}'s shop, as JSON."
            out.append(([{"role": "user", "content": prompt}], 384, SCHEMA_FORMAT))
        else:
            out.append(
                (
                    [{"role": "user", "content": text}],
                    (8 if tiny else 64) if name == "mixed" else (16 if tiny else 256),
                    None,
                )
            )
    return out


def valid(text: str, response_format) -> Optional[bool]:
    """Whether a reply satisfies its request's json_schema (None without one)."""
    if response_format is None:
        return None
    import jsonschema

    try:
        jsonschema.validate(
            json.loads(text),
            response_format["json_schema"]["schema"],
            format_checker=jsonschema.FormatChecker(),
        )
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_gb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return float("nan")


class Server:
    """A server process on 127.0.0.1, ready once /health answers 200 and a first request went
    through."""

    def __init__(self, tool: str, model: Path, python: str, env: dict, log: Path, extra=()):
        self.port = free_port()
        if tool == "ours":
            cmd = [
                python,
                "-m",
                "mlx_glm4v.cli",
                "serve",
                "--model",
                str(model),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--no-ui",
                "--log-level",
                "warning",
                *extra,
            ]
        else:
            cmd = [
                python,
                "-m",
                "mlx_vlm.server",
                "--model",
                str(model),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "WARNING",
            ]
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=log.parent
        )
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{tool} server exited with {self.proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            self.close()
            raise RuntimeError(f"{tool} server did not become ready; see {log}")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def one_request(
    client, model: str, messages, max_tokens: int, response_format=None, arrivals=None
) -> dict:
    """One streamed request; `arrivals` (a list) gets the time each token arrived: the request asks
    for log-probabilities, which come one per token, also for tokens whose text is held back (the
    random checkpoint's replies are full of partial characters and hidden control tokens)."""
    start = time.perf_counter()
    first, text, usage = None, "", None
    extra = (
        {}
        if response_format is None
        else {
            "response_format": response_format,
            "extra_body": {"thinking_budget": SCHEMA_THINKING},
        }
    )
    if arrivals is not None:
        extra["logprobs"] = True
    from openai import APIError

    try:
        stream = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            **extra,
        )
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                piece = choice.delta.content or ""
                if piece and first is None:
                    first = time.perf_counter() - start
                if arrivals is not None and choice.logprobs is not None and choice.logprobs.content:
                    arrivals.extend([time.perf_counter()] * len(choice.logprobs.content))
                text += piece
    except APIError as e:  # a server that fails a request is counted, not a crash of the benchmark
        return dict(
            ttft=float("nan"),
            text="",
            tokens=0,
            seconds=time.perf_counter() - start,
            valid=False if response_format is not None else None,
            failed=f"{type(e).__name__}: {e}",
        )
    tokens = usage.completion_tokens if usage is not None else max_tokens
    return dict(
        ttft=first if first is not None else float("nan"),
        text=text,
        tokens=tokens,
        seconds=time.perf_counter() - start,
        valid=valid(text, response_format),
    )


def run_clients(send, n_requests: int, clients: int) -> tuple:
    """(results in request order, wall seconds): `clients` threads, requests dealt round-robin."""
    results = [None] * n_requests

    def work(c):
        for i in range(c, n_requests, clients):
            results[i] = send(i)

    threads = [threading.Thread(target=work, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def http_run(base: str, requests: list, clients: int) -> tuple:
    from openai import OpenAI

    client = OpenAI(base_url=base + "/v1", api_key="none", timeout=1800, max_retries=0)
    model = client.models.list().data[0].id
    return run_clients(lambda i: one_request(client, model, *requests[i]), len(requests), clients)


def decoded_image(url: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def in_process_run(model, processor, requests: list, clients: int) -> tuple:
    """The same measurement on the engine itself (max_concurrency = clients), no HTTP."""
    from mlx_glm4v.generation.reply import split_reply
    from mlx_glm4v.generation.settings import GenerationSettings
    from mlx_glm4v.server.formats import openai_response_format
    from mlx_glm4v.serving.engine import Engine, Request

    def ours(message):  # OpenAI's image_url parts as our image parts
        if isinstance(message["content"], str):
            return message
        return dict(
            message,
            content=[
                {"type": "image", "image": decoded_image(c["image_url"]["url"])}
                if c["type"] == "image_url"
                else c
                for c in message["content"]
            ],
        )

    prepared = []
    for messages, max_tokens, fmt in requests:
        messages = [ours(m) for m in messages]
        inputs = processor.process_messages(messages)
        prepared.append(
            Request(
                inputs,
                GenerationSettings(
                    max_tokens=max_tokens,
                    constraint=openai_response_format(fmt),
                    thinking_budget=SCHEMA_THINKING if fmt is not None else None,
                ),
            )
        )
    engine = Engine(model, processor, max_concurrency=clients)
    list(engine.submit(Request(prepared[0].inputs, GenerationSettings(max_tokens=2))))  # warm-up

    def send(i):
        start, first, text, n = time.perf_counter(), None, "", 0
        for event in engine.submit(prepared[i]):
            if event.token is not None:
                n += 1
                first = first if first is not None else time.perf_counter() - start
            text += event.text
        answer = split_reply(text).answer  # the server's content
        return dict(
            ttft=first,
            text=text,
            tokens=n,
            seconds=time.perf_counter() - start,
            valid=valid(answer, requests[i][2]),
        )

    try:
        return run_clients(send, len(prepared), clients)
    finally:
        engine.close()


def clip_url(seconds: float, width: int, height: int, fps: float = 2.0) -> str:
    """A data URL of an mp4 clip of moving noise."""
    import tempfile

    import av

    rng = np.random.RandomState(7)
    base = (rng.rand(height, width, 3) * 255).astype(np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("mpeg4", rate=int(fps))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for i in range(int(seconds * fps)):
                frame = av.VideoFrame.from_ndarray(np.roll(base, 9 * i, axis=1), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def stall_requests(tiny: bool) -> list:
    """(messages, max_tokens, None): the long stream, the clip, the short question."""
    clip = clip_url(2, 84, 56) if tiny else clip_url(10, 640, 480)
    return [
        (
            [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}],
            24 if tiny else 400,
            None,
        ),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "video_url", "video_url": {"url": clip}},
                        {"type": "text", "text": "What happens in this video?"},
                    ],
                }
            ],
            8 if tiny else 16,
            None,
        ),
        ([{"role": "user", "content": "What is the capital of France?"}], 8 if tiny else 16, None),
    ]


def stall_run(ckpt, args, env, work, extra=()) -> dict:
    """The stall set: solo runs on fresh servers, then the three together on another fresh one."""
    from openai import OpenAI

    requests = stall_requests(args.tiny)

    def fresh():
        server = Server("ours", ckpt, args.python, env, work / "server-stall.log", extra)
        client = OpenAI(base_url=server.base + "/v1", api_key="none", timeout=1800, max_retries=0)
        model = client.models.list().data[0].id
        one_request(client, model, [{"role": "user", "content": "Hi"}], 4)  # warm
        return server, client, model

    alone = []
    for messages, max_tokens, _ in requests:  # each alone, with nothing cached from another
        server, client, model = fresh()
        try:
            alone.append(one_request(client, model, messages, max_tokens))
        finally:
            server.close()
    server, client, model = fresh()
    arrivals, results = [], [None] * 3
    try:

        def send(i):
            results[i] = one_request(
                client, model, *requests[i][:2], arrivals=arrivals if i == 0 else None
            )

        threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
        threads[0].start()
        while not arrivals and threads[0].is_alive():
            time.sleep(0.01)
        time.sleep(0.5)  # the stream is running
        threads[1].start()
        time.sleep(1.0)
        threads[2].start()
        for t in threads:
            t.join()
    finally:
        server.close()
    gaps = np.diff(np.array(arrivals))
    return dict(
        gap_p50=float(np.median(gaps)),
        gap_p99=float(np.percentile(gaps, 99)),
        gap_max=float(gaps.max()),
        question_ttft=results[2]["ttft"],
        question_alone=alone[2]["ttft"],
        clip_ttft=results[1]["ttft"],
        clip_alone=alone[1]["ttft"],
        identical=all(r["text"] == a["text"] for r, a in zip(results, alone)),
    )


def stall_table(rows: list) -> str:
    out = [
        "| server | stream gap p50 | p99 | max | question TTFT (alone) | clip TTFT (alone) | "
        "same as alone |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['label']} | {r['gap_p50'] * 1000:.0f} ms | {r['gap_p99'] * 1000:.0f} ms | "
            f"{r['gap_max']:.2f} s | {r['question_ttft']:.2f} s ({r['question_alone']:.2f} s) | "
            f"{r['clip_ttft']:.2f} s ({r['clip_alone']:.2f} s) | "
            f"{'yes' if r['identical'] else 'NO'} |"
        )
    return "\n".join(out)


def summarize(results: list, wall: float, sequential: list, rss: float) -> dict:
    ttft = np.array([r["ttft"] for r in results], dtype=float)
    tokens = sum(r["tokens"] for r in results)
    same = (
        None
        if sequential is None
        else all(r["text"] == s["text"] for r, s in zip(results, sequential))
    )
    checked = [r["valid"] for r in results if r.get("valid") is not None]
    return dict(
        requests=len(results),
        tokens=tokens,
        wall=wall,
        tps=tokens / wall,
        valid=f"{sum(checked)}/{len(checked)}" if checked else None,
        failed=sum(1 for r in results if r.get("failed")),
        ttft_p50=float(np.nanpercentile(ttft, 50)),
        ttft_p95=float(np.nanpercentile(ttft, 95)),
        peak_rss_gb=rss,
        identical=same,
    )


def measure(tool, reqs, n, loaded, ckpt, args, env, work) -> tuple:
    """(results, wall seconds, peak RSS) of one run: in-process, or a fresh server warmed with
    one request."""
    if loaded is not None:
        results, wall = in_process_run(*loaded, reqs, n)
        return results, wall, peak_rss_gb(os.getpid())
    server = Server(tool, ckpt, args.python, env, work / f"server-{tool}.log")
    try:
        http_run(server.base, [(reqs[0][0], 4, None)], 1)
        results, wall = http_run(server.base, reqs, n)
        return results, wall, peak_rss_gb(server.proc.pid)
    finally:
        server.close()


def median_of(summaries: list) -> dict:
    """Medians over rounds; outputs count as identical only if they were in every round."""
    keys = ("tps", "ttft_p50", "ttft_p95", "peak_rss_gb", "wall")
    out = {k: float(np.median([s[k] for s in summaries])) for k in keys}
    same = [s["identical"] for s in summaries]
    out.update(
        requests=summaries[0]["requests"],
        tokens=summaries[0]["tokens"],
        valid=summaries[-1]["valid"],
        failed=max(s["failed"] for s in summaries),
        identical=None if same[0] is None else all(same),
    )
    return out


def machine() -> str:
    import mlx.core as mx

    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in open("/proc/cpuinfo")
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GB, {platform.system()}; MLX {mx.__version__} "
        f"({'GPU' if mx.metal.is_available() else 'CPU'}); load average at start {load:.1f}"
    )


def table(rows: list) -> str:
    out = [
        "| set | clients | tool | tokens/s | x own sequential | TTFT p50 | TTFT p95 | peak RSS "
        "| same as sequential | valid | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = "-" if r["identical"] is None else ("yes" if r["identical"] else "NO")
        out.append(
            f"| {r['set']} | {r['clients']} | {r['tool']} | {r['tps']:.1f} | {r['speedup']:.2f} | "
            f"{r['ttft_p50']:.2f} s | {r['ttft_p95']:.2f} s | {r['peak_rss_gb']:.2f} GB | {same} | "
            f"{r.get('valid') or '-'} | {r.get('failed') or 0} |"
        )
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--tools", default="ours,mlx-vlm")
    ap.add_argument("--sets", default="mixed,decode")
    ap.add_argument("--clients", default="1,2,4,8,16")
    ap.add_argument(
        "--checkpoint", help="a float32 GLM-4.1V checkpoint (default: build the random one)"
    )
    ap.add_argument("--work", default=str(HERE.parent / ".bench" / "work"))
    ap.add_argument("--python", default=sys.executable, help="the Python both servers run in")
    ap.add_argument(
        "--blas",
        choices=("openblas", "bundled"),
        default="openblas" if Path(OPENBLAS).exists() else "bundled",
    )
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="measure the engine without HTTP (tool 'ours' only)",
    )
    ap.add_argument(
        "--sequential",
        type=int,
        default=8,
        help="requests sent one after another for the 1-client run (the reference for the others)",
    )
    ap.add_argument(
        "--rounds", type=int, default=1, help="runs of each tool at each client count (medians)"
    )
    ap.add_argument("--tiny", action="store_true", help="a tiny checkpoint and a few tokens (CI)")
    ap.add_argument("--max-stall-ms", help="passed to `mlx-glm4v serve` (the stall set)")
    ap.add_argument("--label", default="ours", help="the stall set's row name")
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    size = "tiny" if args.tiny else "bench"
    ckpt = Path(args.checkpoint) if args.checkpoint else work / f"ckpt-{size}-f32-varied"
    if not (ckpt / "config.json").exists():
        make_checkpoint.build(ckpt, size, text_std=0.1)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.blas == "openblas":
        env["LD_PRELOAD"] = OPENBLAS
        if args.in_process and os.environ.get("LD_PRELOAD") != OPENBLAS:
            # the BLAS must be there from the start
            os.execve(sys.executable, [sys.executable, *sys.argv], env)
    clients = [int(c) for c in args.clients.split(",")]
    tools = args.tools.split(",") if not args.in_process else ["ours"]
    header = f"Machine: {machine()}. BLAS: {args.blas}. Checkpoint: {ckpt.name}."
    print(header, flush=True)
    loaded = None
    if args.in_process:
        from mlx_glm4v.checkpoints.loader import load

        loaded = load(ckpt)
    rows = []
    if "stall" in args.sets.split(","):
        extra = ("--max-stall-ms", args.max_stall_ms) if args.max_stall_ms else ()
        row = dict(set="stall", label=args.label, **stall_run(ckpt, args, env, work, extra))
        print(stall_table([row]), flush=True)
        rows.append(row)
    for name in [n for n in args.sets.split(",") if n != "stall"]:
        requests = request_set(name, max(clients), args.tiny)
        sequential = {}
        for n in clients:
            reqs = requests[: min(args.sequential, max(clients))] if n == 1 else requests[:n]
            runs = {tool: [] for tool in tools}
            for r in range(args.rounds):  # the tools take turns, so load drift hits both alike
                for tool in tools if r % 2 == 0 else tools[::-1]:
                    runs[tool].append(measure(tool, reqs, n, loaded, ckpt, args, env, work))
                    if n == 1:
                        sequential.setdefault(tool, runs[tool][0][0])
            for tool in tools:
                reference = sequential[tool][:n] if tool in sequential and n > 1 else None
                summaries = [
                    summarize(results, wall, reference, rss) for results, wall, rss in runs[tool]
                ]
                row = dict(
                    set=name,
                    clients=n,
                    tool=tool + (" (in-process)" if loaded else ""),
                    rounds=len(summaries),
                    **median_of(summaries),
                )
                base = next(
                    (
                        r
                        for r in rows
                        if (r["set"], r["tool"], r["clients"]) == (name, row["tool"], 1)
                    ),
                    row,
                )
                # nothing answered
                row["speedup"] = row["tps"] / base["tps"] if base["tps"] else float("nan")
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
    print()
    print(header)
    print(table([r for r in rows if r["set"] != "stall"]))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(dict(header=header, rows=rows), indent=2))
    return rows


if __name__ == "__main__":
    main()
