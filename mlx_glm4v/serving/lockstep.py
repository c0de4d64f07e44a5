"""The serving engine on several ranks: rank 0's engine decides, the others' follow in lockstep.

Under `mlx.launch`, every rank holds part of the model, so every rank must run every batch
step, with the same rows, in the same order. Rank 0 alone takes requests (HTTP, the queue,
admission, cancellation); at the top of each engine turn it sends the others what it decided:
the requests that start now (their processor outputs, settings and seed, so media need exist
on rank 0 only) and the ones cancelled. Everything else in a turn (prefill chunks, which rows
decode, when a row stops) follows from the requests' own tokens, which are the same on every
rank, except how many prefill pieces fit in a turn's time budget: rank 0 measures that on its
own clock and tells the others before each piece past the first (`another`). A turn that
decides nothing costs one small collective.

A rank that stops makes the others' collectives fail; a rank that hangs is caught by a watch
on every turn that has work: past `MLX_GLM4V_RANK_TIMEOUT` seconds the process ends with one line.
"""

import contextlib
import dataclasses
import os
import secrets
import threading
import time
from typing import Optional

import numpy as np

from ..generation.settings import GenerationSettings
from .distributed import (
    broadcast_bytes,
    finish,
    lost_rank,
    pack,
    rank_timeout,
    say_once,
    share,
    unpack,
)
from .engine import Engine, Request


class Mirror:
    """A request as a rank other than 0 holds it: the same number, no reader for its events."""

    def __init__(self, request, number: int):
        self.request, self.number = request, number
        self.submitted = time.perf_counter()

    def put(self, event):
        pass


def _request_message(handle) -> tuple:
    """(JSON part, array bytes) of a submitted request; a missing seed is drawn here, once for
    all ranks."""
    request = handle.request
    if request.seed is None:
        request.seed = secrets.randbits(31)
    arrays = {k: np.ascontiguousarray(v) for k, v in request.inputs.items() if v is not None}
    message = {
        "number": handle.number,
        "settings": dataclasses.asdict(request.settings),
        "seed": request.seed,
        "arrays": [[k, str(a.dtype), list(a.shape)] for k, a in arrays.items()],
    }
    return message, [a.tobytes() for a in arrays.values()]


def _request(message: dict, blobs: list):
    inputs = {
        name: np.frombuffer(blob, dtype=dtype).reshape(shape)
        for (name, dtype, shape), blob in zip(message["arrays"], blobs)
    }
    # no log-probabilities: nobody reads a mirror's events, and they decide nothing
    request = Request(inputs, GenerationSettings(**message["settings"]), message["seed"])
    return Mirror(request, message["number"])


class Link:
    """Rank 0's engine telling the others each turn (`tell`), and theirs hearing it (`hear`)."""

    def __init__(self, group):
        self.group = group
        self.timeout = rank_timeout()
        self.busy_since: Optional[float] = None
        if self.timeout > 0:
            threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            since = self.busy_since
            if since is not None and time.monotonic() - since > self.timeout:
                say_once(
                    f"error: rank {self.group.rank()} waited {self.timeout:g} s for the other "
                    "ranks (MLX_GLM4V_RANK_TIMEOUT); every rank stops."
                )
                os._exit(1)

    @contextlib.contextmanager
    def watched(self, busy: bool):
        """A turn: with work in it, the other ranks must keep up within the timeout."""
        self.busy_since = time.monotonic() if busy else None
        try:
            yield
        finally:
            self.busy_since = None

    def tell(self, admitted: Optional[list], cancelled: Optional[list]):
        """Rank 0: this turn's new requests and cancelled numbers (None, None: the engine stops)."""
        if admitted is None:
            payload = pack({"stop": True}, [])
        elif admitted or cancelled:
            messages, blobs = [], []
            for handle in admitted:
                message, arrays = _request_message(handle)
                messages.append(message)
                blobs += arrays
            payload = pack({"admit": messages, "cancel": sorted(cancelled)}, blobs)
        else:
            payload = b""
        broadcast_bytes(payload, self.group)

    def another(self, fits: Optional[bool]) -> bool:
        """Whether one more prefill piece runs this turn: rank 0 says (`fits`), the others pass
        None. Rank 0 measures the turn on its own clock; sending its answer keeps every rank
        cutting alike."""
        return broadcast_bytes(b"1" if fits else b"", self.group) == b"1"

    def hear(self, busy: bool):
        """The others: (admitted, cancelled numbers) of rank 0's next turn, or None when it
        stops."""
        with self.watched(busy):
            payload = broadcast_bytes(None, self.group)
        if not payload:
            return [], set()
        message, blobs = unpack(payload)
        if message.get("stop"):
            return None
        admitted, at = [], 0
        for m in message["admit"]:
            n = len(m["arrays"])
            admitted.append(_request(m, blobs[at : at + n]))
            at += n
        return admitted, set(message["cancel"])

    def fail(self, error: Exception):
        """Rank 0's engine failed mid-turn: the ranks may have parted ways, so every rank stops."""
        lost = lost_rank(error)
        say_once(
            f"error: {lost}"
            if lost
            else f"error: the engine failed ({type(error).__name__}: {error}); every rank stops."
        )
        os._exit(1)

    def close(self):
        """Rank 0: tell the others the engine stops, and wait for them."""
        self.tell(None, None)
        finish(self.group)


def serving_engine(group, model, processor, **options):
    """This rank's engine, with rank 0's `options` on every rank (they shape each turn's work).

    On rank 0 it returns the engine that takes requests; on the others it follows rank 0's
    engine and returns when that one is closed.
    """
    options, _ = share(options if group.rank() == 0 else None, [], group)
    engine = Engine(model, processor, group=group, link=Link(group), **options)
    if group.rank() != 0:
        engine.follow()
    return engine
