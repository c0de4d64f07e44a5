"""What several test files share: seeded pictures, clips and videos, free ports, the attention cut,
the JSON Schema format checker, Hugging Face dataset directories. Checkpoints are tiny.py's;
server processes are servers.py's."""

import base64
import calendar
import io
import json
import re
import socket

import av
import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

# ---- pictures and clips --------------------------------------------------------------------------


def picture(h, w, seed=0):
    """An RGB picture of uniform noise, the same for the same seed."""
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))


def clip(frames, h, w, seed=0):
    """Video frames (frames, h, w, 3) of uniform noise, the same for the same seed."""
    rng = np.random.RandomState(seed)
    return (rng.rand(frames, h, w, 3) * 255).astype(np.uint8)


def smooth(h, w, channels=3, seed=0):
    """A photo-like uint8 image: smooth gradients plus a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    planes = [
        (np.sin(x / (7 + 3 * k) + k) * np.cos(y / (11 + k) + 2 * k) * 0.5 + 0.5) * 230
        for k in range(channels)
    ]
    return np.clip(np.stack(planes, -1) + rng.normal(0, 12, (h, w, channels)), 0, 255).astype(
        np.uint8
    )


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


# ---- video files ---------------------------------------------------------------------------------


def write_scrolling_video(path, frames=6, fps=2):
    """An 84x56 MPEG-4 clip of one picture scrolling sideways; 3 seconds by default (6 frames at 2
    fps, all sampled by GLM-4.1V's processor)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 84, 56, "yuv420p"
        for i in range(frames):
            frame = np.roll(np.asarray(picture(56, 84, 40)), 5 * i, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_gradient_video(path, codec, fps, n, pix_fmt="yuv420p", noise=False, **options):
    """n 64x48 frames, a moving gradient (or noise: every frame the same size in the file), with
    PyAV, in any codec and pixel format (`options`: the container's)."""
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
        for i in range(n):
            rng = np.random.default_rng(i)
            frame = (
                rng.integers(0, 256, (48, 64, 3), np.uint8)
                if noise
                else np.roll(smooth(48, 64, seed=i), 3 * i, 1)
            )
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_noise_video(path, seconds, fps, size):
    """A square MPEG-4 clip of `size` pixels a side, fresh noise every frame (one seed in all)."""
    rng = np.random.RandomState(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(seconds * fps):
            frame = (rng.rand(size, size, 3) * 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ---- ports and patches ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cut_attention(monkeypatch, work: int):
    """Attention calls of at most `work` query-key pairs x heads, on any device."""
    monkeypatch.setattr(
        "mlx_glm4v.models.head_groups.ATTENTION_PIECE_WORK", dict.fromkeys(("cpu", "gpu"), work)
    )


# ---- structured output ---------------------------------------------------------------------------

_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")


def rfc3339_date(value) -> bool:
    """RFC 3339 full-date, year 0000 included (Python's date, which jsonschema uses, starts at
    year 1); February 29th only in leap years (llguidance's own `date` lets it through in any
    year, so constrain.py gives the schema a pattern that knows the calendar)."""
    m = _DATE.match(value) if isinstance(value, str) else None
    if m is None:
        return not isinstance(value, str)
    year, month, day = (int(g) for g in m.groups())
    return 1 <= month <= 12 and 1 <= day <= calendar.monthrange(year or 2000, month)[1]


# jsonschema's format checker, with that date check
FORMATS = jsonschema.FormatChecker()
FORMATS.checks("date")(rfc3339_date)


# ---- Hugging Face dataset directories (mlx-vlm's form) -------------------------------------------


def as_row(record, root, own_path=0):
    """A JSONL record in mlx-vlm's dataset form: every content a list of parts, each image a
    `{"type": "image"}` mark (with TRL's `index`) and its bytes (or, for image `own_path`, its
    path) in the images column as `datasets`' Image structs; tools as a JSON string."""
    messages, images = [], []
    for m in record["messages"]:
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else []
        for part in content if isinstance(content, list) else []:
            if part["type"] == "text":  # TRL's form: an image's index, null for text
                parts.append({"type": "text", "text": part["text"], "index": None})
                continue
            source = part["image_url"]["url"]
            if len(images) == own_path:
                images.append({"bytes": None, "path": source})
            else:
                data = (
                    source if source.startswith("data:") else data_url((root / source).read_bytes())
                )
                images.append({"bytes": base64.b64decode(data.partition(",")[2]), "path": None})
            parts.append({"type": "image", "text": None, "index": len(images) - 1})
        messages.append({**m, "content": parts or None})
    row = {"messages": messages, "images": images}
    if "tools" in record:
        row["tools"] = json.dumps(record["tools"])
    return row


def write_parquet(file, rows):
    file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), file)


def write_saved(folder, rows):
    """One split as `save_to_disk` writes it: an arrow stream and the state.json naming it."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_stream(str(folder / "data-00000-of-00001.arrow"), table.schema) as writer:
        writer.write_table(table)
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": None}
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "dataset_info.json").write_text("{}")
