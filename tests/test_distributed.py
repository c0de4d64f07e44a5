"""Several ranks, one model: real `mlx.launch` runs (ring backend on 127.0.0.1, CPU) against one
process.

Each launch loads one or more checkpoints split over its ranks and runs a batch of cases
(tests/distributed_worker.py); every rank's logits must be within 1e-4 of the single process
and its tokens identical. `mlx.launch` exits 0 even when a rank fails, so every rank's output
file is checked for.
"""

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tiny
from distributed_worker import run_case
from helpers import clip, picture
from ranks import REPORT, TOL, cli_env, mlx_launch, rank_pid, seconds_until_gone
from reference import prepare, user

from mlx_glm4v.checkpoints.loader import load_model

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
LAUNCH_TIMEOUT = 300


def make_cases(
    processor, folder: Path, which=("text", "image", "video", "batch", "sampled")
) -> list:
    """Processor outputs of each case saved to `folder`, as the worker reads them."""
    video_meta = [{"fps": 2.0, "total_num_frames": 4, "frames_indices": [0, 1, 2, 3]}]
    inputs = {
        "text": lambda: prepare(processor, [user("The quick brown fox jumps over the lazy dog.")]),
        "image": lambda: prepare(
            processor, [user("image", "Describe this image.")], images=[picture(84, 112, 1)]
        ),
        "video": lambda: prepare(
            processor,
            [user("video", "What happens?")],
            videos=[clip(4, 56, 84, 2)],
            do_sample_frames=False,
            video_metadata=video_meta,
        ),
        "batch": lambda: prepare(
            processor,
            [
                user("image", "Describe this image."),
                user("A cat sits on a red sofa next to a window.", "image", "Why?"),
            ],
            images=[picture(56, 56, 7), picture(112, 84, 8)],
        ),
        "sampled": lambda: prepare(processor, [user("Hello! How are you today?")]),
    }
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for name in which:
        np.savez(folder / f"{name}.npz", **inputs[name]())
        case = {"name": name, "inputs": str(folder / f"{name}.npz")}
        if name == "sampled":
            case.update(temp=1.0, seed=11)
        cases.append(case)
    return cases


def launch(n: int, plan: list, out: Path):
    """Run the worker on `n` ranks over every model of `plan`; returns [per model: [per rank:
    (layout, results)]]."""
    out.mkdir(parents=True, exist_ok=True)
    for i, item in enumerate(plan):
        item["out"] = str(out / str(i))
        Path(item["out"]).mkdir(exist_ok=True)
    (out / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run(
        [*mlx_launch(n), "--", sys.executable, str(WORKER), str(out / "plan.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
        cwd=ROOT,
    )
    answers = []
    for item in plan:
        folder = Path(item["out"])
        missing = [r for r in range(n) if not (folder / f"results{r}.npz").exists()]
        assert not missing, (
            f"ranks {missing} wrote no results:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
        )
        answers.append(
            [
                (
                    json.loads((folder / f"rank{r}.json").read_text()),
                    dict(np.load(folder / f"results{r}.npz")),
                )
                for r in range(n)
            ]
        )
    return answers


def compare(label: str, checkpoint, cases, ranks):
    """Every rank against one process: logits within TOL on real tokens, identical tokens."""
    model = load_model(checkpoint)
    single = sum(v.nbytes for v in _leaves(model))
    layers = sum(v.nbytes for layer in model.layers for v in _leaves(layer))
    REPORT[f"{label}: weight bytes"] = {
        "one process": single,
        "per rank": [layout["weight_bytes"] for layout, _ in ranks],
        "decoder layers, one process": layers,
        "decoder layers per rank": [layout["layer_bytes"] for layout, _ in ranks],
        "peak while loading per rank": [layout["peak_load_bytes"] for layout, _ in ranks],
    }
    # Read layer by layer: beyond its share a rank briefly holds a layer's whole tensors, never the
    # decoder's.
    for rank, (layout, _) in enumerate(ranks):
        extra = layout["peak_load_bytes"] - layout["weight_bytes"]
        assert extra < layers, (
            f"{label}, rank {rank}: {extra} bytes beyond its weights while loading"
        )
    for case in cases:
        inputs = dict(np.load(case["inputs"]))
        ref = run_case(model, inputs, temp=case.get("temp", 0.0), seed=case.get("seed", 0))
        real = inputs["attention_mask"].astype(bool)
        worst = 0.0
        for rank, (_, results) in enumerate(ranks):
            diff = float(np.abs(results[f"{case['name']}/logits"] - ref["logits"])[real].max())
            worst = max(worst, diff)
            assert diff <= TOL, (
                f"{label} {case['name']}, rank {rank}: max |logit difference| {diff:.2e}"
            )
            np.testing.assert_array_equal(
                results[f"{case['name']}/tokens"],
                ref["tokens"],
                err_msg=f"{label} {case['name']}, rank {rank}: tokens differ",
            )
        REPORT[f"{label}: {case['name']}"] = worst
    return single


def _leaves(module):
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(module.parameters())]


def build_deeper(path: Path, layers: int):
    """A tiny GLM-4.1V checkpoint with `layers` decoder layers (tiny.build_checkpoint's steps)."""
    import torch

    tokenizer = tiny.build_tokenizer(path)
    model_class, config = tiny.model_class_and_config("glm4v", tokenizer)
    config.text_config.num_hidden_layers = layers
    torch.manual_seed(1)
    model = model_class(config).eval()
    tiny.perturb_(model, 1)
    model.save_pretrained(path, max_shard_size="400KB")
    tiny.build_processor(tokenizer).save_pretrained(path)
    return path


def test_two_ranks_tensor_parallel(
    tmp_path, glm4v_checkpoint, glm4v_moe_checkpoint, glm_ocr_checkpoint
):
    """GLM-4.1V, GLM-4.5V, a 4-bit GLM-4.5V and GLM-OCR (head_dim wider than hidden/heads, its
    MTP layer loaded), each split over 2 ranks by heads and features."""
    from mlx_glm4v.checkpoints.convert import convert

    q4 = convert(
        str(glm4v_moe_checkpoint[0]), str(tmp_path / "q4"), quantize=True, q_bits=4, q_group_size=32
    )
    models = [
        ("GLM-4.1V", glm4v_checkpoint),
        ("GLM-4.5V", glm4v_moe_checkpoint),
        ("GLM-4.5V 4-bit", (q4, None, glm4v_moe_checkpoint[2])),
        ("GLM-OCR", glm_ocr_checkpoint),
    ]
    plan, cases = [], {}
    for label, (path, _, processor) in models:
        which = (
            ("text", "image")
            if "4-bit" in label
            else ("text", "image", "video", "batch", "sampled")
        )
        cases[label] = make_cases(processor, tmp_path / label, which)
        plan.append({"checkpoint": str(path), "cases": cases[label]})
    answers = launch(2, plan, tmp_path / "run")
    for (label, (path, _, _)), ranks in zip(models, answers):
        single = compare(label, path, cases[label], ranks)
        for layout, _ in ranks:
            assert layout["mode"] == "tensor"
            assert layout["weight_bytes"] < single
    # 4-bit at group 32: the dense layer's 96 features split to 48, not whole groups, so it stays
    # whole
    assert answers[2][0][0]["whole"] == ["language_model.layers.0.mlp"]
    assert answers[1][0][0]["whole"] == []


def test_four_ranks_two_kv_heads(tmp_path, glm4v_checkpoint):
    """4 ranks, 4 heads, 2 KV heads: each KV head repeated so every rank holds one."""
    path, _, processor = glm4v_checkpoint
    cases = make_cases(processor, tmp_path / "cases", ("image",))
    [ranks] = launch(4, [{"checkpoint": str(path), "cases": cases}], tmp_path / "run")
    single = compare("GLM-4.1V, 4 ranks", path, cases, ranks)
    assert all(
        layout["mode"] == "tensor" and layout["weight_bytes"] < single for layout, _ in ranks
    )


def test_three_ranks_fall_back_to_pipeline(tmp_path, glm4v_checkpoint):
    """4 heads do not split 3 ways: pipeline, 5 layers as 2 + 2 + 1, none dropped."""
    path = build_deeper(tmp_path / "five", 5)
    cases = make_cases(glm4v_checkpoint[2], tmp_path / "cases", ("text", "image", "batch"))
    [ranks] = launch(3, [{"checkpoint": str(path), "cases": cases}], tmp_path / "run")
    assert [tuple(layout["layers"]) for layout, _ in ranks] == [(0, 2), (2, 4), (4, 5)]
    assert all(layout["mode"] == "pipeline" for layout, _ in ranks)
    compare("GLM-4.1V 5 layers, 3 ranks pipeline", path, cases, ranks)


def test_generate_command_under_mlx_launch(tmp_path, glm4v_moe_checkpoint):
    """`python -m mlx_glm4v generate` on 2 ranks prints the single-process reply once; only rank 0
    opens the image; a sampled reply with a seed is the same too."""
    path = glm4v_moe_checkpoint[0]
    image = tmp_path / "picture.png"
    picture(84, 112, 3).save(image)
    env = cli_env(tmp_path, WATCH_OPENS=str(tmp_path / "opens"))
    runs = {
        "greedy": ["--image", str(image), "-p", "Describe this image.", "--max-tokens", "12"],
        "sampled": [
            "-p",
            "Hello! How are you today?",
            "--max-tokens",
            "12",
            "--temp",
            "1.0",
            "--seed",
            "5",
        ],
    }
    for name, options in runs.items():
        command = ["-m", "mlx_glm4v", "generate", "-m", str(path), *options]
        single = subprocess.run(
            [sys.executable, *command], env=env, capture_output=True, text=True, timeout=120
        )
        assert single.returncode == 0, single.stderr
        launched = subprocess.run(
            [*mlx_launch(2), "--", sys.executable, *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=LAUNCH_TIMEOUT,
            cwd=tmp_path,
        )
        assert launched.stdout == single.stdout, (
            f"{name}: {launched.stdout!r} != {single.stdout!r}\n{launched.stderr}"
        )
        assert len(single.stdout.strip()) > 0
        assert launched.stderr.count("Prompt:") == 1, launched.stderr
        assert "rank 1 of 2: tensor parallel" in launched.stderr
        assert "error" not in launched.stderr.lower() and "WARN" not in launched.stderr, (
            launched.stderr
        )
    opened = {p.name.split(".")[-1]: p.read_text() for p in tmp_path.glob("opens.*")}
    assert str(image) in opened["0"] and str(image) in opened["single"]
    assert "1" not in opened or str(image) not in opened["1"], opened


def test_killed_rank_stops_the_others(tmp_path, glm4v_checkpoint):
    """Rank 1 killed mid-generation: rank 0 stops within seconds with one line, no hang."""
    marker = str(os.getpid())
    env = cli_env(tmp_path, RANK_TEST=marker)
    command = [
        sys.executable,
        "-m",
        "mlx_glm4v",
        "generate",
        "-m",
        str(glm4v_checkpoint[0]),
        "-p",
        "Hello!",
        "--max-tokens",
        "1000000",
        "--ignore-eos",
    ]
    launcher = subprocess.Popen(
        [*mlx_launch(2), "--", *command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        read_until(launcher, len, b"")  # rank 0 is printing the reply
        pid = rank_pid(marker, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        _, err = launcher.communicate(timeout=60)
        elapsed = time.monotonic() - killed
    finally:
        launcher.kill()
    err = err.decode(errors="replace")
    assert elapsed < 30, f"{elapsed:.1f} s"
    REPORT["killed rank: seconds until the launch ended"] = elapsed
    # rank 0 notices the lost connection, or mlx.launch ends it first: either way one line
    assert err.count("error:") == 1, err
    assert (
        "error: rank 0 lost contact with another rank" in err
        or "error: mlx.launch stopped rank 0" in err
    ), err
    assert "Traceback" not in err, err


def endless_generate(tmp_path, checkpoint, marker: str, rank_timeout: float):
    """`generate` on 2 ranks that never ends by itself, its ranks findable by `marker`
    (rank_pid)."""
    env = cli_env(tmp_path, RANK_TEST=marker, MLX_GLM4V_RANK_TIMEOUT=str(rank_timeout))
    command = [
        sys.executable,
        "-m",
        "mlx_glm4v",
        "generate",
        "-m",
        str(checkpoint),
        "-p",
        "Hello!",
        "--max-tokens",
        "1000000",
        "--ignore-eos",
    ]
    return subprocess.Popen(
        [*mlx_launch(2), "--", *command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )


def drain(launcher):
    """Read both of the launch's pipes from now on as it writes, so that no write can block a rank
    (an endless reply fills a pipe in about a second): ({name: lines}, reader threads)."""
    drained = {name: [] for name in ("stdout", "stderr")}
    readers = [
        threading.Thread(
            target=lambda f=getattr(launcher, name), into=into: into.extend(iter(f.readline, b"")),
            daemon=True,
        )
        for name, into in drained.items()
    ]
    for reader in readers:
        reader.start()
    return drained, readers


def test_hung_rank_times_out(tmp_path, glm4v_checkpoint):
    """Rank 1 frozen (SIGSTOP) mid-generation keeps its connections open: rank 0 gives up after
    MLX_GLM4V_RANK_TIMEOUT seconds with one line."""
    marker = f"hang{os.getpid()}"
    launcher = endless_generate(tmp_path, glm4v_checkpoint[0], marker, rank_timeout=3)
    frozen = None
    try:
        read_until(launcher, len, b"")
        drained, readers = drain(launcher)
        frozen = rank_pid(marker, 1)
        os.kill(frozen, signal.SIGSTOP)
        elapsed = seconds_until_gone(marker, 0, time.monotonic(), 60)
        os.kill(frozen, signal.SIGCONT)
        launcher.wait(timeout=60)
        for reader in readers:
            reader.join(timeout=10)
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGKILL) if rank_pid(marker, 1) else None
        launcher.kill()
    err = b"".join(drained["stderr"]).decode(errors="replace")
    REPORT["hung rank: seconds until rank 0 gave up (timeout 3 s)"] = elapsed
    assert 3 <= elapsed < 30, f"{elapsed:.1f} s\n{err}"
    assert "error: rank 0 waited 3 s for the other ranks" in err, err
    assert "Traceback" not in err, err


def test_sigterm_while_waiting_on_a_collective(tmp_path, glm4v_checkpoint):
    """mlx.launch ends the other ranks with SIGTERM when one fails; a rank blocked in a collective
    (its peer frozen, no timeout) still ends at once with one line."""
    marker = f"term{os.getpid()}"
    launcher = endless_generate(tmp_path, glm4v_checkpoint[0], marker, rank_timeout=0)
    frozen = None
    try:
        read_until(launcher, len, b"")
        drained, readers = drain(launcher)
        frozen = rank_pid(marker, 1)
        os.kill(frozen, signal.SIGSTOP)
        time.sleep(1)  # rank 0 now waits on rank 1
        os.kill(rank_pid(marker, 0), signal.SIGTERM)
        elapsed = seconds_until_gone(marker, 0, time.monotonic(), 30)
        os.kill(frozen, signal.SIGKILL)
        frozen = None
        launcher.wait(timeout=60)  # the launcher passes on what rank 0 wrote, then ends
        for reader in readers:
            reader.join(timeout=10)
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGKILL)
        launcher.kill()
    err = b"".join(drained["stderr"]).decode(errors="replace")
    assert elapsed < 5, f"{elapsed:.1f} s"
    assert "error: mlx.launch stopped rank 0 (another rank ended)" in err, err


def read_until(proc, done, seen: bytes, timeout: float = 120) -> bytes:
    """`seen` plus what `proc` prints on stdout until `done(seen)`; fails on its exit or after
    `timeout` s."""
    deadline = time.monotonic() + timeout
    while not done(seen):
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"nothing more after {timeout} s: {seen[-500:]!r}"
        chunk = os.read(proc.stdout.fileno(), 4096)
        assert chunk, (
            f"the launch ended: {seen[-500:]!r} {proc.stderr.read().decode(errors='replace')}"
        )
        seen += chunk
    return seen


def test_chat_stopped_on_rank_0_stops_every_rank(tmp_path, glm4v_checkpoint):
    """`chat` on 2 ranks: Ctrl-C on rank 0 stops the reply on both at the same token, the next
    turn still runs in step, and /exit ends both cleanly."""
    marker = f"chat{os.getpid()}"
    env = cli_env(tmp_path, RANK_TEST=marker)
    command = [
        sys.executable,
        "-m",
        "mlx_glm4v",
        "chat",
        "-m",
        str(glm4v_checkpoint[0]),
        "--ignore-eos",
        "--max-tokens",
        "1000000",
    ]
    launcher = subprocess.Popen(
        [*mlx_launch(2), "--", *command],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        seen = b""
        for n, turn in enumerate(("Hello!\n", "Tell me more.\n"), start=1):
            launcher.stdin.write(turn.encode())
            launcher.stdin.flush()
            start = len(seen)
            # the reply streams
            seen = read_until(launcher, lambda out, start=start: len(out) - start >= 20, seen)
            os.kill(rank_pid(marker, 0), signal.SIGINT)
            seen = read_until(launcher, lambda out, n=n: out.count(b"(stopped)") == n, seen)
        launcher.stdin.write(b"/exit\n")
        launcher.stdin.flush()
        out, err = launcher.communicate(timeout=60)
    finally:
        launcher.kill()
    out, err = (seen + out).decode(errors="replace"), err.decode(errors="replace")
    assert out.count("(stopped)") == 2, out[-2000:]
    assert "error" not in err and "WARN" not in err, err


def test_auto_mode_picks_pipeline_when_most_would_stay_whole(tmp_path, glm4v_moe_checkpoint):
    """4-bit in groups of 32: experts 64 wide split 2 ways (32) but not 4 (16), so 4 ranks pipeline
    (as GLM-4.5V's 1408-wide experts in groups of 64)."""
    from mlx_glm4v.checkpoints.convert import convert
    from mlx_glm4v.serving.distributed import choose_mode

    q4 = load_model(
        convert(
            str(glm4v_moe_checkpoint[0]),
            str(tmp_path / "q4"),
            quantize=True,
            q_bits=4,
            q_group_size=32,
        ),
        lazy=True,
    )
    assert q4.language_model.unsplittable(2) == ["layers.0.mlp"]
    assert choose_mode(q4, 2) == "tensor"
    assert {"layers.0.mlp", "layers.1.mlp", "layers.2.mlp"} <= set(
        q4.language_model.unsplittable(4)
    )
    assert choose_mode(q4, 4) == "pipeline"
    assert choose_mode(q4, 3) == "pipeline"  # 4 heads


def test_zzz_report():
    """Print the figures the issue asks for (run with -s to see them)."""
    for key, value in REPORT.items():
        print(f"{key}: {value if isinstance(value, dict) else f'{value:.2e}'}")
