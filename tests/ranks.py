"""`mlx.launch` ranks for the tests that start them (test_distributed.py, test_serve_ranks.py): the
launch command, the environment their processes see, and finding a rank's process."""

import os
import random
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # the most a rank's logits (or log-probabilities) may differ from one process's
# case -> worst logit difference over ranks; checkpoint -> weight bytes per rank; seconds to stop
REPORT = {}


def mlx_launch(n: int) -> list:
    """`mlx.launch -n N --backend ring` run by this interpreter, its ring on free ports of
    127.0.0.1.

    The ports are taken below Linux's ephemeral range, so that no connection another process
    opens meanwhile can take one of them before its rank listens."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 32000 - n)
        try:
            for i in range(n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + i))
            break
        except OSError:
            continue
    return [
        sys.executable,
        "-c",
        "import sys; from mlx._distributed_utils.launch import main; main()",
        "-n",
        str(n),
        "--backend",
        "ring",
        "--starting-port",
        str(port),
    ]


# Logs, per rank, every file a process opens whose name holds "picture" (Python's audit hook).
WATCH_OPENS = """
import os, sys
if os.environ.get("WATCH_OPENS"):
    _log = open(os.environ["WATCH_OPENS"] + "." + os.environ.get("MLX_RANK", "single"), "a")

    def _hook(event, args):
        if event == "open" and isinstance(args[0], str) and "picture" in args[0]:
            _log.write(args[0] + "\\n")
            _log.flush()

    sys.addaudithook(_hook)
if os.environ.get("ATTENTION_PIECE_WORK"):  # the engine's attention cut into a head or two a piece
    import mlx_glm4v.models.head_groups

    _work = int(os.environ["ATTENTION_PIECE_WORK"])
    mlx_glm4v.models.head_groups.ATTENTION_PIECE_WORK = {"cpu": _work, "gpu": _work}
"""


def cli_env(tmp_path, **extra):
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(WATCH_OPENS)
    path = os.pathsep.join([str(hooks), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **extra}


def rank_pid(marker: str, rank: int):
    """The process launched with MLX_RANK=`rank` and our marker in its environment, if running."""
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"RANK_TEST={marker}".encode() in environ and f"MLX_RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


def seconds_until_gone(marker: str, rank: int, since: float, limit: float) -> float:
    """Seconds from `since` until the rank's process is gone (or `limit`, if it lives on)."""
    while rank_pid(marker, rank) is not None and time.monotonic() - since < limit:
        time.sleep(0.1)
    return time.monotonic() - since
