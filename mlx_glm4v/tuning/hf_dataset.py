"""Hugging Face dataset directories as fine-tuning data, in mlx-vlm's form: a `messages` column of
conversations and an `images` column of the images they show. Read with pyarrow, without the
`datasets` package, in the two layouts `datasets` writes:

- `save_to_disk`: the arrow files `state.json` names (a `Dataset`: training data), or one such
  directory per split, named by `dataset_dict.json` (a `DatasetDict`);
- parquet (or arrow) files, as the hub stores a dataset (`data/train-00000-of-00001.parquet`): a
  file's split is the first split word in its path, as `datasets` reads it (train, training;
  validation, valid, val, dev; test, eval); when no file names one, every file is training data.

A row's messages mark where its images go with `{"type": "image"}` parts; the row's images
(`datasets`' `Image` structs `{bytes, path}`, or path strings) fill those marks in order, and
images beyond the marks go first in the last user turn, as mlx-vlm places them for GLM-V. The row
then becomes the record a JSONL line is (data.py), so it gives the same ids, labels and pixels.
"""

import io
import json
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import Glm4vError
from .data import Conversation, RecordError, parse_record

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:  # the `finetune` extra; only this form of data needs it
    pa = pq = None

SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
    "eval": "test",
    "evaluation": "test",
}
IMAGE_TYPES = ("image", "image_url", "input_image")
SOURCE_KEYS = ("image", "image_url", "url", "path")


def is_dataset_dir(path) -> bool:
    """Whether directory `path` looks like a dataset `datasets` wrote (or the hub stores)."""
    path = Path(path)
    markers = ("dataset_dict.json", "state.json")
    return any((path / name).is_file() for name in markers) or bool(_table_files(path))


def _table_files(root: Path) -> list:
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix in (".parquet", ".arrow")
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.is_file()
    )


def _json(file: Path) -> dict:
    try:
        found = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Glm4vError(f"{file} is not a readable JSON file ({e}).") from None
    if not isinstance(found, dict):
        raise Glm4vError(f"{file} must hold a JSON object.")
    return found


def _saved_files(folder: Path) -> list:
    """The arrow files of one `save_to_disk` split, from its state.json."""
    state = folder / "state.json"
    if not state.is_file():
        raise Glm4vError(f"{folder} has no state.json; it is not a split `save_to_disk` wrote.")
    entries = _json(state).get("_data_files")
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("filename"), str) for e in entries
    ):
        raise Glm4vError(f"{state} has no `_data_files` list of file names.")
    return [folder / e["filename"] for e in entries]


def dataset_splits(root) -> dict:
    """{split: its files} of a dataset directory; splits named train, validation, test (or as
    a `DatasetDict` names them, when they are none of those)."""
    root = Path(root)
    if (root / "dataset_dict.json").is_file():
        names = _json(root / "dataset_dict.json").get("splits")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise Glm4vError(f"{root / 'dataset_dict.json'} has no `splits` list of names.")
        return {SPLIT_WORDS.get(n.lower(), n): _saved_files(root / n) for n in names}
    if (root / "state.json").is_file():
        return {"train": _saved_files(root)}
    splits: dict = {}
    for file in _table_files(root):
        words = re.findall(r"[a-z]+", str(file.relative_to(root)).lower())
        split = next((SPLIT_WORDS[w] for w in words if w in SPLIT_WORDS), None)
        splits.setdefault(split, []).append(file)
    if set(splits) == {None}:
        return {"train": splits[None]}
    splits.pop(None, None)
    return splits


def read_dataset(root) -> tuple:
    """(training conversations, validation conversations or None) of a dataset directory."""
    root = Path(root)
    splits = dataset_splits(root)
    if "train" not in splits:
        found = ", ".join(sorted(splits)) or "none"
        raise Glm4vError(f"the dataset directory {root} has no train split (its splits: {found}).")
    valid = splits.get("validation")
    return read_split(splits["train"], root), read_split(valid, root) if valid else None


def _read_table(file: Path):
    if pa is None:
        raise Glm4vError(
            f"reading the dataset file {file} needs pyarrow: pip install 'mlx-glm4v[finetune]'."
        )
    if not file.is_file():
        raise Glm4vError(f"{file}: no such dataset file.")
    try:
        if file.suffix == ".parquet":
            return pq.read_table(file)
        try:  # `datasets` writes arrow streams; an arrow file reads too
            return pa.ipc.open_stream(pa.memory_map(str(file))).read_all()
        except pa.ArrowInvalid:
            return pa.ipc.open_file(pa.memory_map(str(file))).read_all()
    except (pa.ArrowException, OSError) as e:
        kind = file.suffix.lstrip(".") or "arrow"
        raise Glm4vError(f"{file} is not a readable {kind} file ({e}).") from None


def read_split(files, root) -> list:
    """Every row of a split's files as a `Conversation`; the first bad one refused in a sentence
    naming the file, row (counted from 0 in its file) and column. Relative image paths start at
    the dataset directory `root`."""
    out = []
    for file in files:
        table = _read_table(Path(file))
        if "messages" not in table.column_names:
            raise Glm4vError(
                f"{file} has no `messages` column (its columns: {', '.join(table.column_names)}); "
                "a dataset needs mlx-vlm's form, `messages` and `images`."
            )
        columns = [c for c in ("messages", "images", "image", "tools") if c in table.column_names]
        n = 0
        for batch in table.select(columns).to_batches():
            for row in batch.to_pylist():
                out.append(parse_row(row, f"{file} row {n}", Path(root)))
                n += 1
    if not out:
        raise Glm4vError(f"{', '.join(map(str, files))} holds no conversation.")
    return out


def _without_nulls(value):
    """A column value without the null fields arrow gives structs of one list a common type."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _decoded(value, column: str):
    """A column's value; a JSON string (as some datasets store conversations) decoded."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise RecordError(f"the {column} column holds a string that is not JSON.") from None
    return value


def _image(value, at: str, root: Path):
    """An image of the images column as bytes or a path (relative to the dataset directory)."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes"):
            data = bytes(value["bytes"])
            try:  # the header only: a broken image is named here, by its place in the column
                Image.open(io.BytesIO(data)).close()
            except (UnidentifiedImageError, OSError) as e:
                raise RecordError(f"{at} is not a readable image ({e}).") from None
            return data
        value = value.get("path")
    if isinstance(value, str) and value:
        if not (root / value).is_file():
            raise RecordError(f"{at} has no bytes and its path {value} is not a file.")
        return value
    raise RecordError(f"{at} holds neither image bytes nor a path.")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _is_mark(part) -> bool:
    """An image part that names no image itself: a place for the next image of the column."""
    return (
        isinstance(part, dict)
        and part.get("type") in IMAGE_TYPES
        and not any(k in part for k in SOURCE_KEYS)
    )


def row_record(row: dict, root: Path) -> tuple:
    """(the JSONL record of a row, for each image part of its user turns in order: the index in
    the images column it came from, or None where the part names its own image)."""
    messages = _without_nulls(_decoded(row.get("messages"), "messages"))
    if not isinstance(messages, list):
        raise RecordError("the messages column must hold a list of messages.")
    images = row.get("images", row.get("image"))
    images = [] if images is None else images if isinstance(images, list) else [images]
    sources = [_image(_without_nulls(x), f"images[{i}]", root) for i, x in enumerate(images)]
    users = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    marks = sum(
        _is_mark(p)
        for i in users
        if isinstance(messages[i].get("content"), list)
        for p in messages[i]["content"]
    )
    if marks > len(sources):
        raise RecordError(
            f"the messages column marks {_count(marks, 'image')} but the images column holds "
            f"{len(sources)}."
        )
    if len(sources) > marks:
        if not users:
            raise RecordError(
                f"the images column holds {_count(len(sources), 'image')} but the messages "
                "column has no user turn to show them in."
            )
        last = messages[users[-1]]
        content = last.get("content")
        text = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        if isinstance(text, list):
            last["content"] = [{"type": "image"} for _ in range(len(sources) - marks)] + text
    taken, origins = 0, []
    for i in users:
        content = messages[i].get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            if not (isinstance(part, dict) and part.get("type") in IMAGE_TYPES + ("video",)):
                continue
            if _is_mark(part):
                content[j] = {"type": "image", "image": sources[taken]}
                origins.append(taken)
                taken += 1
                continue
            own = part.get("image")
            if isinstance(own, dict) and ("bytes" in own or "path" in own):
                at = f"messages[{i}].content[{j}].image"
                content[j] = {"type": "image", "image": _image(own, at, root)}
            origins.append(None)
    record = {"messages": messages}
    if row.get("tools") is not None:
        record["tools"] = _without_nulls(_decoded(row["tools"], "tools"))
    return record, origins


def parse_row(row: dict, where: str, root: Path) -> Conversation:
    """A dataset row -> a `Conversation`, or a `RecordError` naming `where` and the column."""
    try:
        record, origins = row_record(row, root)
    except RecordError as e:
        raise RecordError(f"{where}: {e}") from None
    conversation = parse_record(record, where, root)
    parts = [
        p
        for m in conversation.messages
        if m["role"] == "user" and isinstance(m["content"], list)
        for p in m["content"]
        if p["type"] in ("image", "video")
    ]
    for part, origin in zip(parts, origins):
        if origin is not None:  # named by its place in the images column
            part["at"] = f"images[{origin}]"
    return conversation
