"""Several models in one server: which are loaded, loading on first use, unloading when idle.

The registry sits above the engines: each loaded model is whatever its `load` callable built
(anything with an `engine` and a `close()`; the server's is a model, its processor and its own
`Engine`, which owns its MLX thread). A request holds its model for as long as it runs
(`acquire` ... `release`); a model nobody holds is idle and unloads when its time-to-live
passes (a request's `keep_alive`, else the model's, else the server's; negative: never), or
sooner when another model needs its memory. Pinned models load at start and never unload.

The memory budget counts weights plus KV caches: a model not yet loaded by its safetensors
files' sizes, a loaded one by its weights' bytes plus the KV its engine's admitted rows reserve
and its prefix cache holds. Before a load, idle models go least recently used first; when that
cannot make room, `NoRoom` says so (the server answers 503 with Retry-After). Unloading stops
the engine's thread, drops every reference and clears MLX's buffer cache, so MLX's active and
cache memory return to what they were before the load.
"""

import gc
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

from ..errors import Glm4vError
from .engine import kv_bytes_per_token, memory_bytes

log = logging.getLogger("mlx_glm4v.serving")

DEFAULT_KEEP_ALIVE = 300.0  # seconds an idle model stays loaded (Ollama's default, 5 minutes)
# of the memory MLX may use (Metal's recommended working set, else the machine's RAM): the rest
# is left for what the budget does not count (a prefill step's activations, the vision tower's
# frames, the server's own Python objects)
BUDGET_FRACTION = 0.8
RETRY_AFTER = 5  # seconds a client is told to wait when no model could make room

_DURATION = re.compile(r"-?\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h)?")
_PART = re.compile(r"^(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)?$")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, None: 1}


def duration(value) -> float:
    """Seconds from a number of seconds or a duration such as "5m" or "1h30m" (Ollama's and Go's
    form); any negative value is -1, forever. Raises ValueError on anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(value)
    if not isinstance(value, str):
        return -1.0 if value < 0 else float(value)
    text = value.strip()
    parts = _DURATION.findall(text)
    if not text or "".join(parts) != text:
        raise ValueError(value)
    total = 0.0
    for part in parts:
        amount, unit = _PART.match(part).groups()
        total += float(amount) * _UNITS[unit]
    return -1.0 if total < 0 else total


@dataclass
class ModelSpec:
    """One model the server may run."""

    name: str  # what clients send (default: the last part of the path or repo id)
    path: str  # a local directory or a hub repo id
    pin: bool = False  # loaded at start, never unloaded
    keep_alive: Optional[float] = None  # idle seconds before unloading; None: the server's
    kv_bits: Optional[int] = None  # quantized KV caches for this model's requests
    adapter: Optional[str] = None  # a LoRA/DoRA adapter directory applied to it

    @property
    def names(self) -> set:
        return {self.name, self.path}


def default_name(path: str, adapter: Optional[str] = None) -> str:
    """The path's or repo's last part, and the adapter directory's (the adapter is part of what
    is served)."""
    name = path.rstrip("/").split("/")[-1]
    if adapter:
        name += "+" + Path(adapter).expanduser().resolve().name
    return name


def read_models_file(path) -> list:
    """A models file: a JSON list of objects {name?, path, pin?, keep_alive?, kv_bits?,
    adapter?}."""
    path = Path(path).expanduser()
    try:
        items = json.loads(path.read_text())
    except OSError as e:
        raise Glm4vError(f"--models {path}: cannot read it ({e.strerror}).") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Glm4vError(f"--models {path} is not valid JSON ({e}).") from None
    if not isinstance(items, list) or not items:
        raise Glm4vError(f"--models {path} must hold a JSON list of models, one object each.")
    known = {f.name for f in fields(ModelSpec)}
    specs = []
    for i, item in enumerate(items):
        where = f"--models {path}, model {i}"
        if not isinstance(item, dict):
            raise Glm4vError(f"{where} is not a JSON object.")
        if extra := sorted(set(item) - known):
            raise Glm4vError(f"{where}: unknown field {extra[0]!r} (known: {', '.join(known)}).")
        if not isinstance(item.get("path"), str) or not item["path"]:
            raise Glm4vError(f"{where}: `path` (a checkpoint directory or repo id) is required.")
        adapter = item.get("adapter")
        if adapter is not None and (not isinstance(adapter, str) or not adapter):
            raise Glm4vError(f"{where}: `adapter` must be an adapter directory's path.")
        name = item.get("name", default_name(item["path"], adapter))
        if not isinstance(name, str) or not name:
            raise Glm4vError(f"{where}: `name` must be a non-empty string.")
        if not isinstance(item.get("pin", False), bool):
            raise Glm4vError(f"{where}: `pin` must be true or false.")
        kv_bits = item.get("kv_bits")
        if kv_bits is not None and kv_bits not in (2, 3, 4, 5, 6, 8):
            raise Glm4vError(f"{where}: `kv_bits` {kv_bits!r} is not one of 2, 3, 4, 5, 6, 8.")
        keep = item.get("keep_alive")
        try:
            keep = None if keep is None else duration(keep)
        except ValueError:
            raise Glm4vError(
                f'{where}: `keep_alive` {keep!r} is not seconds or a duration such as "5m".'
            ) from None
        specs.append(ModelSpec(name, item["path"], item.get("pin", False), keep, kv_bits, adapter))
    return specs


def check_specs(specs: list):
    """Two models under one name cannot both be reached."""
    seen = {}
    for spec in specs:
        if spec.name in seen:
            raise Glm4vError(
                f"two models are named {spec.name!r} ({seen[spec.name]} and {spec.path}); "
                "give one a `name` in a models file."
            )
        seen[spec.name] = spec.path


def default_budget() -> int:
    return int(BUDGET_FRACTION * memory_bytes())


def weight_file_bytes(directory: Path) -> int:
    """A checkpoint's size before loading: its safetensors files."""
    return sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))


class NoRoom(Glm4vError):
    """No model could be unloaded to make room for the one asked for."""

    retry_after = RETRY_AFTER


class Entry:
    """A model's place in the registry: loaded or not, who holds it, when it expires."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.loaded = None  # what `load` built
        self.loading = False
        self.users = 0  # requests holding it
        self.last_used = 0.0
        self.expires: Optional[float] = None  # when it unloads once idle; None: never
        self.estimate = 0  # bytes, from its files, once known
        self.keep_alive: Optional[float] = None  # the latest request's wish, for the next release

    def footprint(self) -> int:
        """Bytes it counts against the budget: weights plus KV (reserved by rows, kept prefixes)."""
        loaded = self.loaded
        if loaded is None:
            return self.estimate if self.loading else 0
        engine = loaded.engine
        kv = kv_bytes_per_token(engine.model) * engine.reserved_tokens + engine.prefixes.nbytes
        return loaded.weight_bytes + kv

    @property
    def idle(self) -> bool:
        engine = self.loaded and self.loaded.engine
        return self.users == 0 and not (engine and (engine.active or engine.queue_depth))


class Registry:
    """The models a server may run, loaded by `load(spec, directory)` -> an object with `engine`,
    `weight_bytes` and `close()`; `resolve(path)` -> the checkpoint's local directory."""

    def __init__(
        self,
        specs: list,
        load: Callable,
        resolve: Callable,
        budget: Optional[int] = None,
        keep_alive: float = DEFAULT_KEEP_ALIVE,
        clock=time.monotonic,
    ):
        check_specs(specs)
        self.entries = {s.name: Entry(s) for s in specs}
        self.load, self.resolve, self.clock = load, resolve, clock
        self.budget = default_budget() if budget is None else budget
        self.keep_alive = keep_alive
        self._cond = threading.Condition()
        self._loading = threading.Lock()  # one load at a time, so the budget's sums hold
        self._closed = False
        self.unloads = 0  # models unloaded so far (each one's memory given back when counted)
        self._reaper = threading.Thread(target=self._reap, name="mlx-glm4v-models", daemon=True)
        self._reaper.start()

    def find(self, name) -> Optional[Entry]:
        """The entry served under `name` (its name or its path)."""
        if name in self.entries:
            return self.entries[name]
        return next((e for e in self.entries.values() if name in e.spec.names), None)

    def loaded(self) -> list:
        return [e for e in self.entries.values() if e.loaded is not None]

    def used(self) -> int:
        return sum(e.footprint() for e in self.entries.values())

    def acquire(self, name: str) -> Entry:
        """Hold the model (loading it first if it is not loaded); blocks while it loads. Raises
        NoRoom, or the loader's error."""
        entry = self.find(name)
        with self._cond:
            entry.users += 1
            while entry.loading:
                self._cond.wait()
            if entry.loaded is not None:
                entry.last_used = self.clock()
                return entry
        try:
            with self._loading:
                if entry.loaded is None:
                    self._load(entry)
        except BaseException:
            with self._cond:
                entry.users -= 1
                self._cond.notify_all()
            raise
        with self._cond:
            entry.last_used = self.clock()
        return entry

    def _load(self, entry: Entry):
        directory = self.resolve(entry.spec.path)
        entry.estimate = weight_file_bytes(directory)
        with self._cond:
            self._make_room(entry)
            entry.loading = True
        started = time.perf_counter()
        try:
            loaded = self.load(entry.spec, directory)
        finally:
            with self._cond:
                entry.loading = False
                self._cond.notify_all()
        with self._cond:
            entry.loaded = loaded
            entry.expires = None
            self._cond.notify_all()
        log.info(
            "model %s loaded in %.1f s (%.2f GB of %.2f GB in use)",
            entry.spec.name,
            time.perf_counter() - started,
            self.used() / 1e9,
            self.budget / 1e9,
        )

    def _make_room(self, entry: Entry):
        """Unload idle models, least recently used first, until `entry` fits (under the lock)."""
        need, name = entry.estimate, entry.spec.name
        if need > self.budget:
            raise NoRoom(
                f"the model {name!r} needs about {need / 1e9:.2f} GB, over the server's memory "
                f"budget of {self.budget / 1e9:.2f} GB (--max-memory-gb)."
            )
        while self.used() + need > self.budget:
            idle = [e for e in self.loaded() if e.idle and not e.spec.pin]
            if not idle:
                raise NoRoom(
                    f"the model {name!r} needs about {need / 1e9:.2f} GB and the models loaded "
                    f"are busy within the memory budget of {self.budget / 1e9:.2f} GB "
                    "(--max-memory-gb); try again shortly."
                )
            self._unload(min(idle, key=lambda e: e.last_used), "to make room for " + name)

    def release(self, entry: Entry, keep_alive: Optional[float] = None):
        """A request is done with the model; `keep_alive` seconds (0: unload now, negative:
        never) is its wish for how long the model stays loaded once idle."""
        with self._cond:
            entry.users -= 1
            entry.last_used = now = self.clock()
            if keep_alive is not None:
                entry.keep_alive = keep_alive
            seconds = entry.keep_alive
            if seconds is None:
                seconds = (
                    self.keep_alive if entry.spec.keep_alive is None else entry.spec.keep_alive
                )
            entry.expires = None if seconds < 0 else now + seconds
            self._cond.notify_all()

    def wish(self, name: str, keep_alive: Optional[float]):
        """A request's keep_alive, kept for its model's next release."""
        if keep_alive is not None and (entry := self.find(name)) is not None:
            with self._cond:
                entry.keep_alive = keep_alive

    def unload(self, name: str) -> bool:
        """Unload the model now if it is loaded and idle."""
        with self._cond:
            entry = self.find(name)
            if entry is None or entry.loaded is None or not entry.idle:
                return False
            self._unload(entry, "as asked")
            return True

    def _unload(self, entry: Entry, why: str):
        """Stop its engine, drop it, give MLX's buffers back (under the lock)."""
        loaded, entry.expires, entry.keep_alive = entry.loaded, None, None
        loaded.close()
        entry.loaded = loaded = None
        gc.collect()
        mx.clear_cache()
        self.unloads += 1
        log.info("model %s unloaded %s", entry.spec.name, why)

    def _reap(self):
        """Unload idle models whose time-to-live has passed."""
        with self._cond:
            while not self._closed:
                now, wait = self.clock(), 1.0
                for entry in self.loaded():
                    if entry.spec.pin or entry.expires is None:
                        continue
                    if not entry.idle:  # its last row is ending: look again soon
                        wait = min(wait, 0.02)
                    elif entry.expires <= now:
                        self._unload(entry, "after its keep-alive")
                    else:
                        wait = min(wait, entry.expires - now)
                self._cond.wait(max(0.01, wait))

    def close(self):
        """Stop the reaper and every engine (at shutdown)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._reaper.join()
        for entry in self.loaded():
            loaded, entry.loaded = entry.loaded, None
            loaded.close()
