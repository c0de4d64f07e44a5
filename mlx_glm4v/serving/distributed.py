"""One model over several machines, on MLX's own distributed engine (`mx.distributed`).

Started by `mlx.launch`, every rank runs the same command. Each loads its part of the model
(`load`): tensor parallel (`Model.shard`) when the attention heads divide over the ranks,
else pipeline parallel (`Model.pipeline`). Rank 0 alone talks to the user: it reads the
terminal and the media files and hands each request, media bytes included, to the other
ranks through a collective (`share_request`), so a file need exist on rank 0 only. The seed
travels with the request, so every rank samples the same tokens.

A rank that stops makes the collectives of the others fail ("connection to a peer was
lost"); `lost_rank` turns that into one line and a non-zero exit instead of a traceback.
A rank that hangs without closing its connections (a frozen machine, a cut cable) is caught
by `watched`: a reply that makes no progress for `MLX_GLM4V_RANK_TIMEOUT` seconds ends the
process with one line.
"""

import dataclasses
import io
import json
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import Glm4vError

_watching_sigterm = False
_wakeup = None
_last_words = threading.Lock()
_said = False


def say_once(line: str):
    """Write why this rank stops, unless it already has: the main thread and the SIGTERM and
    timeout watchers may all find a reason at about the same moment."""
    global _said
    with _last_words:
        if not _said:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            _said = True


def launched():
    """The group of ranks when started by `mlx.launch` (or mpirun), else None: one process."""
    global _watching_sigterm
    if not any(
        k in os.environ
        for k in ("MLX_HOSTFILE", "MLX_RANK", "OMPI_COMM_WORLD_SIZE", "MLX_JACCL_COORDINATOR")
    ):
        return None
    group = mx.distributed.init()
    if group.size() == 1:
        return None
    if not _watching_sigterm and threading.current_thread() is threading.main_thread():
        _exit_on_sigterm(group.rank())
        _watching_sigterm = True
    return group


def _exit_on_sigterm(rank: int):
    """When one rank fails, mlx.launch ends the others with SIGTERM, maybe while they wait in a
    collective: a thread woken through Python's signal wakeup fd says so in one line and exits,
    whatever the main thread is blocked in."""
    import socket

    global _wakeup
    _wakeup = reader, writer = socket.socketpair()  # kept open as long as the process lives
    writer.setblocking(False)
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.set_wakeup_fd(writer.fileno())

    def watch():
        while signal.SIGTERM not in reader.recv(64):
            pass
        say_once(f"error: mlx.launch stopped rank {rank} (another rank ended); every rank stops.")
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def is_follower() -> bool:
    """Whether this process is a rank other than 0 of a launched group (it never reads user
    files)."""
    group = launched()
    return group is not None and group.rank() != 0


@dataclass
class Layout:
    """How the model is split: `mode` "tensor" or "pipeline", the decoder sub-modules kept whole
    (tensor), this rank's decoder layers [first, last), and the weight bytes it holds, in all
    and in its decoder layers."""

    mode: str
    ranks: int
    rank: int
    whole: list = field(default_factory=list)
    layers: tuple = (0, 0)
    weight_bytes: int = 0
    layer_bytes: int = 0

    def describe(self) -> str:
        if self.mode == "pipeline":
            what = f"pipeline parallel, layers {self.layers[0]}-{self.layers[1] - 1}"
        else:
            what = "tensor parallel" + (
                f", kept whole: {', '.join(self.whole)}" if self.whole else ""
            )
        return f"rank {self.rank} of {self.ranks}: {what}; {_size(self.weight_bytes)} of weights"


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def choose_mode(model, n: int) -> str:
    """ "tensor" when the attention heads split `n` ways and the sub-modules that would stay whole
    (widths that do not divide, in whole quantization groups) hold under half of the decoder's
    weights; else "pipeline". GLM-4.5V's experts (1408 wide) split 2 ways in groups of 64 but not
    4."""
    text = model.language_model
    whole = text.unsplittable(n)
    if any(name.endswith("self_attn") for name in whole):
        return "pipeline"
    modules = dict(text.named_modules())
    whole_bytes = sum(weight_bytes(modules[name]) for name in whole)
    return (
        "tensor"
        if 2 * whole_bytes < sum(weight_bytes(layer) for layer in text.layers)
        else "pipeline"
    )


def parallelize(model, group, mode: str = "auto") -> Layout:
    """Split `model` (weights still lazy) over `group`: "tensor", "pipeline", or "auto" (see
    `choose_mode`)."""
    n = group.size()
    if mode == "auto":
        mode = choose_mode(model, n)
    layout = Layout(mode, n, group.rank())
    if mode == "tensor":
        layout.whole = model.shard(group)
        layout.layers = (0, len(model.layers))
    elif mode == "pipeline":
        model.pipeline(group)
        first = model.language_model.first_layer
        layout.layers = (first, first + len(model.layers))
    else:
        raise Glm4vError(
            f"parallel mode {mode!r} (MLX_GLM4V_PARALLEL) is unknown; choose auto, "
            "tensor or pipeline."
        )
    return layout


def evaluate_by_layer(model):
    """Read the weights one decoder layer at a time: each layer's whole tensors are sliced and
    dropped before the next is read, so no rank ever holds the whole model."""
    mx.eval(model.visual.parameters())
    for layer in model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())


def weight_bytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def load(
    path_or_repo: str, group, dtype=None, revision: Optional[str] = None, mode: Optional[str] = None
):
    """(model, processor, layout): this rank's part of a checkpoint, read layer by layer; `mode`
    (default: $MLX_GLM4V_PARALLEL, else "auto") as in `parallelize`.

    Layers a pipeline stage does not keep are never read (safetensors are read lazily).
    """
    from ..checkpoints.loader import load_model, resolve
    from ..inputs.processor import Processor

    path = resolve(path_or_repo, revision)
    model = load_model(path, dtype, lazy=True)
    layout = parallelize(model, group, mode or os.environ.get("MLX_GLM4V_PARALLEL", "auto"))
    evaluate_by_layer(model)
    layout.weight_bytes = weight_bytes(model)
    layout.layer_bytes = sum(weight_bytes(layer) for layer in model.layers)
    barrier(group)
    return model, Processor.from_pretrained(path), layout


def barrier(group):
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))


def broadcast_bytes(data: Optional[bytes], group) -> bytes:
    """Rank 0's `data` on every rank (the others pass None): a sum where all but rank 0 add
    zeros."""
    root = group.rank() == 0
    size = mx.array([len(data) if root else 0], dtype=mx.int64)
    size = int(mx.distributed.all_sum(size, group=group, stream=mx.cpu).item())
    if size == 0:
        return b""
    buffer = mx.array(memoryview(data)) if root else mx.zeros(size, dtype=mx.uint8)
    buffer = mx.distributed.all_sum(buffer, group=group, stream=mx.cpu)
    mx.eval(buffer)
    return bytes(memoryview(buffer))


def pack(message, blobs: list) -> bytes:
    """A JSON-able message and byte strings as one payload (see `unpack`)."""
    head = json.dumps({"message": message, "sizes": [len(b) for b in blobs]}).encode()
    return len(head).to_bytes(8, "little") + head + b"".join(blobs)


def unpack(payload: bytes) -> tuple:
    n = int.from_bytes(payload[:8], "little")
    head = json.loads(payload[8 : 8 + n])
    blobs, at = [], 8 + n
    for size in head["sizes"]:
        blobs.append(payload[at : at + size])
        at += size
    return head["message"], blobs


def share(message: Optional[dict], blobs: Optional[list], group) -> tuple[dict, list]:
    """Rank 0's JSON-able `message` and list of byte strings `blobs`, on every rank."""
    return unpack(broadcast_bytes(pack(message, blobs) if group.rank() == 0 else None, group))


def _read(path) -> bytes:
    if hasattr(path, "save"):  # a rendered PDF page (chat's /image doc.pdf): lossless PNG
        buffer = io.BytesIO()
        path.save(buffer, "PNG")
        return buffer.getvalue()
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise Glm4vError(f"{path} could not be read: {e.strerror}.") from None


def _suffix(source) -> str:
    return ".png" if hasattr(source, "save") else Path(source).suffix


def share_request(group, request: dict, media: dict, seed: Optional[int]):
    """A request as rank 0 has it, on every rank: rank 0 reads the files named in `media`
    ({"images": [...], "videos": [...]}) and sends their bytes; the other ranks write them to
    a private temporary directory and get those paths instead. Returns (request, media, seed),
    the seed drawn on rank 0 when none was given.
    """
    root = group.rank() == 0
    blobs = None
    if root:
        seed = seed if seed is not None else secrets.randbits(31)
        blobs = [_read(p) for kind in ("images", "videos") for p in media[kind]]
        message = {
            "request": request,
            "seed": seed,
            "media": {k: [_suffix(p) for p in v] for k, v in media.items()},
        }
    message, blobs = share(message if root else None, blobs, group)
    if root:
        return request, media, seed
    folder = Path(tempfile.mkdtemp(prefix="mlx-glm4v-rank-"))
    paths, i = {}, 0
    for kind, suffixes in message["media"].items():
        paths[kind] = []
        for suffix in suffixes:
            path = folder / f"{i}{suffix}"
            path.write_bytes(blobs[i])
            paths[kind].append(str(path))
            i += 1
    return message["request"], paths, message["seed"]


def share_reply(group, prompt: str, reply):
    """The CLI's prompt and `Reply` (options, media, seed) as rank 0 has them, on every rank."""
    request = {"prompt": prompt, "system": reply.system, "settings": reply.settings}
    request, media, seed = share_request(
        group, request, {"images": reply.images, "videos": reply.videos}, reply.seed
    )
    reply = dataclasses.replace(
        reply,
        system=request["system"],
        settings=request["settings"],
        seed=seed,
        images=media["images"],
        videos=media["videos"],
    )
    return request["prompt"], reply


def share_options(group, reply):
    """The CLI's `Reply` options (system prompt, settings, seed) as rank 0 has them, media left
    out."""
    request, _, seed = share_request(
        group,
        {"system": reply.system, "settings": reply.settings},
        {"images": [], "videos": []},
        reply.seed,
    )
    return dataclasses.replace(
        reply, system=request["system"], settings=request["settings"], seed=seed
    )


def share_turn(group, op: str, text: str = "", images=(), videos=()):
    """One chat turn from rank 0 ("ask", "reset" or "exit") with its media: (op, text, images,
    videos)."""
    request, media, _ = share_request(
        group, {"op": op, "text": text}, {"images": list(images), "videos": list(videos)}, 0
    )
    return request["op"], request["text"], media["images"], media["videos"]


def rank_timeout() -> float:
    """Seconds a reply may go without a new token before the ranks are taken for hung (0: never)."""
    value = os.environ.get("MLX_GLM4V_RANK_TIMEOUT", "600")
    try:
        return float(value)
    except ValueError:
        raise Glm4vError(f"MLX_GLM4V_RANK_TIMEOUT={value!r} is not a number of seconds.") from None


def watched(group, responses):
    """`responses`, ending this process with one line when the next one takes longer than
    `rank_timeout()` (the prompt's prefill included): another rank has stopped answering."""
    timeout = rank_timeout()
    if timeout <= 0:
        yield from responses
        return
    last, done = [time.monotonic()], threading.Event()

    def watch():
        while not done.wait(min(1.0, timeout / 4)):
            if time.monotonic() - last[0] > timeout:
                say_once(
                    f"error: rank {group.rank()} waited {timeout:g} s for the other ranks "
                    "(MLX_GLM4V_RANK_TIMEOUT); every rank stops."
                )
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
    try:
        for response in responses:
            last[0] = time.monotonic()
            yield response
            last[0] = time.monotonic()
    finally:
        done.set()


def in_step(group, responses, stop_asked=lambda: False):
    """`responses`, stopped on every rank at the same token when rank 0 asks (`stop_asked`).

    After each token the ranks agree whether to go on, so a reply stopped on rank 0 stops
    everywhere at the same point and the caches stay alike.
    """
    for response in watched(group, responses):
        yield response
        stop = mx.array([int(group.rank() == 0 and stop_asked())])
        if mx.distributed.all_sum(stop, group=group, stream=mx.cpu).item():
            responses.close()
            raise KeyboardInterrupt


class CtrlC:
    """While active on rank 0, Ctrl-C only asks the reply to stop at the next token (see
    `in_step`)."""

    def __init__(self):
        self.asked = False

    def __call__(self) -> bool:
        return self.asked

    def __enter__(self):
        self.asked = False
        self.previous = signal.signal(signal.SIGINT, lambda *_: setattr(self, "asked", True))
        return self

    def __exit__(self, *_):
        signal.signal(signal.SIGINT, self.previous)


class SharedSession:
    """Rank 0's `ChatSession` in `chat`: each turn (and reset) is sent to the other ranks, which
    replay it in step (`follow_chat`); Ctrl-C stops the reply on every rank at the same token."""

    def __init__(self, group, session):
        self.group, self.session = group, session

    def __getattr__(self, name):
        return getattr(self.session, name)

    def reset(self):
        share_turn(self.group, "reset")
        self.session.reset()

    def ask(self, text: str, images=(), videos=(), progress=None):
        share_turn(self.group, "ask", text, images, videos)
        with CtrlC() as ctrl_c:
            yield from in_step(
                self.group, self.session.ask(text, images, videos, progress=progress), ctrl_c
            )


def follow_chat(group, model, processor, reply):
    """A rank other than 0 in `chat`: replay each turn rank 0 sends, in step, until it says exit.

    Ctrl-C reaches every rank started from one terminal; here it is ignored, rank 0 decides.
    """
    from ..generation.chat import ChatSession

    session = ChatSession(model, processor, reply.system, **reply.settings)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        op, text, images, videos = share_turn(group, "")
        if op == "exit":
            return finish(group)
        if op == "reset":
            session.reset()
            continue
        try:
            for _ in in_step(group, session.ask(text, images, videos)):
                pass
        except (KeyboardInterrupt, Glm4vError):
            # rank 0 stopped the reply or met the same problem; it forgets a question left
            # unanswered
            if session.messages and session.messages[-1]["role"] == "user":
                session.messages.pop()


def follow(group, responses):
    """A rank other than 0: run the same generation in step with rank 0, showing nothing."""
    for _ in responses:
        pass
    finish(group)


def finish(group):
    """Wait for the steps still queued and for every rank, so none leaves a collective
    unanswered."""
    from ..generation.generate import generation_stream

    mx.synchronize(generation_stream)
    barrier(group)


def lost_rank(error: Exception) -> Optional[Glm4vError]:
    """The one-line error for a collective that failed because another rank stopped, else None."""
    text = str(error)
    if isinstance(error, RuntimeError) and any(
        s in text for s in ("[ring]", "[jaccl]", "[mpi]", "peer")
    ):
        # not launched(): when joining the group is what failed, trying again would fail again
        rank = os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or "0"
        if "connect" in text.lower() and "lost" not in text:
            return Glm4vError(
                f"rank {rank} could not reach the other ranks ({text.strip()}); check the "
                "hostfile's addresses and that every Mac runs the command; every rank stops."
            )
        return Glm4vError(
            f"rank {rank} lost contact with another rank ({text.strip()}); every rank stops."
        )
    return None
