"""The prefix cache's disk tier: kept prompts' KV as safetensors files that outlive the process.

A file holds one prompt: each layer's keys and values, and in its metadata the token ids, the
media marks (start, end, pixel digest) and the `CacheKey` of everything that changes the KV's
bits. It is named by the SHA-256 of its own bytes, so a file that lost or changed a byte since
it was written (a crash, a full disk, a hand) no longer matches its name and is skipped with a
log line, never served; a file another model or other settings made is skipped likewise.

Files are written off the engine thread (one writer thread and its queue), each to a temporary
name and moved into place (`os.replace`), so a reader sees a whole file or none. The directory
keeps at most `max_bytes`; the least recently used files go first (a file's use is its
modification time, touched on every read), whoever made them.
"""

import hashlib
import json
import logging
import os
import queue
import struct
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..checkpoints.loader import weight_files
from ..errors import Glm4vError
from ..models.media import media_items
from ..models.mlxlm import KVCache
from .prefix import PrefixCache, PrefixEntry, media_marks, shared_length

log = logging.getLogger(__name__)

_stamp_lock = threading.Lock()
_last_stamp = 0


def use_stamp(path):
    """Set `path`'s modification time to now, later than any stamp this process gave before: the
    file's place in the LRU order. The kernel's own clock for file times is coarse (a few ms), so
    a file written and another touched in the same tick would tie and the size would decide."""
    global _last_stamp
    with _stamp_lock:
        _last_stamp = max(time.time_ns(), _last_stamp + 1)
        os.utime(path, ns=(_last_stamp, _last_stamp))


FORMAT = "mlx-glm4v prompt cache 1"
SUFFIX = ".safetensors"


def checkpoint_identity(path) -> str:
    """A digest of what a checkpoint directory's weights are, cheap to take at every start:
    config.json's bytes, and for each weight file its name, size, modification time and
    safetensors header (names, dtypes, shapes, offsets). A rewritten shard changes its time; a
    copy with fresh times reads as another checkpoint, which costs a cold cache, never a wrong
    one."""
    path = Path(path)
    h = hashlib.sha256((path / "config.json").read_bytes())
    for file in weight_files(path):
        stat = file.stat()
        h.update(f"\0{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        h.update(read_header_bytes(file))
    return h.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """Everything that changes the bits of a prompt's KV; two runs share a cache file only when
    every field is equal."""

    model: str  # checkpoint_identity of the weights
    dtype: str  # the parameters' dtypes
    quantization: str  # the stored quantization (JSON), "" for none
    kv_bits: Optional[int]
    kv_group_size: int
    prefill_chunk: int
    adapter: str = ""  # an adapter's identity, "" for none
    format: str = FORMAT

    @classmethod
    def of(cls, model, checkpoint, prefill_chunk, kv_bits=None, kv_group_size=64, adapter=""):
        dtypes = sorted({str(v.dtype) for _, v in tree_flatten(model.parameters())})
        config = json.loads((Path(checkpoint) / "config.json").read_text())
        quantization = config.get("quantization") or config.get("quantization_config") or ""
        return cls(
            checkpoint_identity(checkpoint),
            ",".join(dtypes),
            json.dumps(quantization, sort_keys=True) if quantization else "",
            kv_bits,
            kv_group_size,
            prefill_chunk,
            adapter,
        )

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def differences(self, other: dict) -> list:
        """The fields on which a file's key (as stored) differs from this one."""
        return [k for k, v in asdict(self).items() if other.get(k) != v]


def read_header_bytes(file: Path) -> bytes:
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise ValueError("its header length is implausible")
        return f.read(n)


def read_metadata(file: Path) -> dict:
    """The file's own metadata (what `write_entry` put there), from its header alone."""
    header = json.loads(read_header_bytes(file))
    return json.loads(header["__metadata__"]["mlx_glm4v"])


def file_digest(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def write_entry(directory: Path, entry: PrefixEntry, key: CacheKey, path: Optional[Path] = None):
    """Write `entry` under `directory` (or to `path`), whole or not at all; the file's path."""
    arrays = {}
    for i, (k, v) in enumerate(zip(entry.keys, entry.values)):
        arrays[f"keys.{i}"], arrays[f"values.{i}"] = k, v
    media = None if entry.media is None else [[s, e, d.hex()] for s, e, d in entry.media]
    meta = {
        "key": asdict(key),
        "ids": [int(t) for t in entry.ids],
        "media": media,
        "layers": len(entry.keys),
    }
    target = Path(path) if path is not None else None
    where = target.parent if target is not None else directory
    tmp = where / f".{os.getpid()}-{threading.get_ident()}.tmp{SUFFIX}"
    try:
        mx.save_safetensors(str(tmp), arrays, metadata={"mlx_glm4v": json.dumps(meta)})
        if target is None:
            target = directory / f"{key.digest()[:16]}-{file_digest(tmp)}{SUFFIX}"
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def read_entry(file: Path, key: CacheKey, check_name: bool = True) -> PrefixEntry:
    """The entry a file holds; ValueError saying why when it is damaged or not made by `key`'s
    model and settings."""
    if check_name:
        name = file.name[: -len(SUFFIX)]
        if name.split("-")[-1] != file_digest(file):
            raise ValueError("its bytes do not match its name (damaged or truncated)")
    try:
        meta = read_metadata(file)
        arrays = mx.load(str(file))
    except Exception as e:
        raise ValueError(f"it is not a readable prompt cache ({e})") from None
    different = key.differences(meta.get("key") or {})
    if different:
        raise ValueError(f"it was made with another {', '.join(different)}")
    layers = meta["layers"]
    keys = [arrays.get(f"keys.{i}") for i in range(layers)]
    values = [arrays.get(f"values.{i}") for i in range(layers)]
    ids = np.array(meta["ids"], dtype=np.int64)
    if any(a is None or a.ndim != 4 or a.shape[2] != len(ids) for a in keys + values):
        raise ValueError("its arrays do not match its token ids")
    mx.eval(keys, values)
    media = meta["media"]
    if media is not None:
        media = [(s, e, bytes.fromhex(d)) for s, e, d in media]
    nbytes = sum(a.nbytes for a in keys + values)
    return PrefixEntry(ids, media, keys, values, nbytes)


@dataclass
class DiskEntry:
    """A file of ours, as indexed: enough to match a prompt without reading its arrays."""

    path: Path
    ids: np.ndarray
    media: Optional[list]


class DiskCache:
    """Prompt KV files in `directory`, at most `max_bytes` of them, for the model and settings
    `key` names (other files there are left alone, but count towards the cap)."""

    def __init__(self, directory, max_bytes: int, key: CacheKey):
        self.directory = Path(directory)
        self.max_bytes, self.key = max_bytes, key
        self.prefix = key.digest()[:16]
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Glm4vError(
                f"the prompt cache directory {directory} cannot be made: {e}."
            ) from None
        self.entries: list = []
        self.reads = self.read_tokens = self.writes = self.skipped = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._index()
        self._writer = threading.Thread(target=self._write_loop, name="mlx-glm4v-disk", daemon=True)
        self._writer.start()

    def _index(self):
        for file in sorted(self.directory.glob(f"[!.]*{SUFFIX}")):
            if not file.name.startswith(self.prefix + "-"):
                continue  # another model's or other settings' file: theirs to use
            try:
                meta = read_metadata(file)
                different = self.key.differences(meta.get("key") or {})
                if different:
                    raise ValueError(f"it was made with another {', '.join(different)}")
                media = meta["media"]
                if media is not None:
                    media = [(s, e, bytes.fromhex(d)) for s, e, d in media]
                ids = np.array(meta["ids"], dtype=np.int64)
            except Exception as e:
                self._skip(file, e)
                continue
            self.entries.append(DiskEntry(file, ids, media))
        log.info("prompt cache %s: %d prompts of this model", self.directory, len(self.entries))

    def _skip(self, file: Path, why):
        self.skipped += 1
        log.warning("prompt cache: skipping %s: %s", file.name, why)

    def lookup(self, ids: np.ndarray, media):
        """(entry as read from disk, shared token count) of the longest match, or (None, 0)."""
        while True:
            with self._lock:
                found = [(shared_length(e, ids, media), i) for i, e in enumerate(self.entries)]
            n, i = max(found, default=(0, -1))
            if n == 0:
                return None, 0
            with self._lock:
                disk = self.entries[i]
            try:
                entry = read_entry(disk.path, self.key)
            except (OSError, ValueError) as e:
                if not isinstance(e, FileNotFoundError):  # gone: dropped or superseded meanwhile
                    self._skip(disk.path, e)
                with self._lock:
                    if disk in self.entries:
                        self.entries.remove(disk)
                continue
            self.touch(disk.path)
            entry.path = disk.path
            self.reads += 1
            self.read_tokens += n
            return entry, n

    @staticmethod
    def touch(path):
        """Mark a file used now (its modification time is its place in the LRU order)."""
        try:
            use_stamp(path)
        except OSError:
            pass  # dropped meanwhile

    def holds(self, ids: np.ndarray, media) -> bool:
        """Whether a file holds this whole prompt (from the index, no file read)."""
        with self._lock:
            return any(shared_length(e, ids, media) == len(ids) for e in self.entries)

    def save(self, entry: PrefixEntry):
        """Write `entry` on the writer thread (its arrays must be evaluated)."""
        self._queue.put(entry)

    def flush(self):
        """Wait until every entry given to `save` is on disk."""
        self._queue.join()

    def _write_loop(self):
        while True:
            entry = self._queue.get()
            try:
                self._write(entry)
            except Exception as e:  # a full disk or a vanished directory: the cache goes on
                log.warning("prompt cache: could not write a prompt to %s: %s", self.directory, e)
            finally:
                self._queue.task_done()

    def _write(self, entry: PrefixEntry):
        path = write_entry(self.directory, entry, self.key)
        use_stamp(path)
        entry.path = path
        self.writes += 1
        new = DiskEntry(path, entry.ids, entry.media)
        with self._lock:
            # an entry the new one holds whole serves nothing the new one does not
            for old in [
                e for e in self.entries if shared_length(new, e.ids, e.media) == len(e.ids)
            ]:
                self.entries.remove(old)
                old.path.unlink(missing_ok=True)
            self.entries.append(new)
        self._evict()

    def _evict(self):
        files = []
        for file in self.directory.glob(f"[!.]*{SUFFIX}"):
            try:
                stat = file.stat()
            except OSError:
                continue
            files.append((stat.st_mtime_ns, stat.st_size, file))
        total = sum(size for _, size, _ in files)
        for _, size, file in sorted(files, key=lambda f: f[:2]):
            if total <= self.max_bytes:
                break
            file.unlink(missing_ok=True)
            total -= size
            with self._lock:
                self.entries = [e for e in self.entries if e.path != file]
            log.info("prompt cache: %s dropped (least recently used)", file.name)


# ---- one prompt in a file of its own: `cache-prompt`, `generate --prompt-cache` -----------------


def prompt_of(config, inputs: dict):
    """(token ids, media marks) of processor outputs for one prompt."""
    ids = np.asarray(inputs["input_ids"]).reshape(-1)
    items = media_items(
        inputs.get("pixel_values"),
        inputs.get("image_grid_thw"),
        inputs.get("pixel_values_videos"),
        inputs.get("video_grid_thw"),
    )
    return ids, media_marks(config, ids, items)


def save_prompt_file(path, key: CacheKey, config, inputs: dict, cache) -> Path:
    """Write the prompt of `inputs`, run into `cache` (plain KV caches), to `path`."""
    if not all(type(c) is KVCache for c in cache):
        raise Glm4vError("a prompt cache file holds a plain KV cache: leave out --kv-bits.")
    ids, marks = prompt_of(config, inputs)
    n = len(ids)
    keys = [c.keys[..., :n, :] for c in cache]
    values = [c.values[..., :n, :] for c in cache]
    mx.eval(keys, values)
    entry = PrefixEntry(ids, marks, keys, values, sum(a.nbytes for a in keys + values))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_entry(path.parent, entry, key, path)


def prompt_file_reuse(path, key: CacheKey, config):
    """A `reuse(inputs, cache)` for generate: the part of a prompt that the prompt cache file at
    `path` holds put into the cache. The file is read and checked now: a file made by another
    model or other settings, or no prompt cache at all, is refused in one sentence."""
    try:
        entry = read_entry(Path(path), key, check_name=False)
    except OSError as e:
        raise Glm4vError(f"--prompt-cache {path} could not be read: {e.strerror}.") from None
    except ValueError as e:
        raise Glm4vError(f"--prompt-cache {path} cannot be used: {e}.") from None

    def reuse(inputs: dict, cache) -> int:
        if not all(type(c) is KVCache for c in cache):
            raise Glm4vError("--prompt-cache needs a plain KV cache: leave out --max-kv-size.")
        n = shared_length(entry, *prompt_of(config, inputs))
        if n:
            PrefixCache.restore(entry, n, cache)
        return n

    return reuse


def parse_size(text: str) -> int:
    """Bytes in a size such as "4GB", "512MB", "1.5G" or "1000000" (binary units: 1 GB = 2^30)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (s[:-1], s[-1]) if s and s[-1] in units else (s, "")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise Glm4vError(
            f"--prompt-cache-size {text!r} is not a size such as 4GB or 512MB."
        ) from None
    if value <= 0:
        raise Glm4vError(f"--prompt-cache-size {text!r} must be positive.")
    return int(value)
