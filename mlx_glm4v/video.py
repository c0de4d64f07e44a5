"""Videos: decoding with PyAV and the reference's frame sampling (`Glm4vVideoProcessor.sample_frames`).

A video is a file path (anything FFmpeg reads: mp4, mov, mkv, webm, gif, ...) or a `Video` holding
frames the caller decoded, with their frame rate. Only the sampled frames are converted to RGB, so
long clips cost little memory.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import Glm4vError
from .image import PixelSettings, existing_file, load_image


@dataclass
class Video:
    """All frames of a clip, (N, H, W, 3) uint8 RGB or a list of PIL images / arrays, shown at `fps`.

    `duration` (seconds) is what a container would report; left out, the reference derives it from
    the frame count and fps.
    """

    frames: object
    fps: float
    duration: float | None = None


def sample_frames(total: int, video_fps: float, duration: float | None, s: PixelSettings,
                  fps: float | None = None, max_frames: int | None = None) -> list[int]:
    """Frame indices as the reference picks them: `fps` per second (2), 600 spread over clips past 300 s.

    Duplicates are dropped and the last index repeated to make the count even (frames go in pairs).
    `max_frames`, not in the reference, thins the picked indices evenly when given.
    """
    fps = s.fps if fps is None else fps
    last = total - 1
    duration = duration or round(last / video_fps) + 1
    if duration <= s.max_duration:
        n = max(int(math.floor(duration * fps)), 1)
        indices = [min(last, int(math.ceil(i * video_fps / fps))) for i in range(n)]
    else:
        n = int(s.max_duration * fps)
        if n >= total:
            indices = list(range(total))
        else:
            indices = [min(last, int(math.ceil(t * video_fps))) for t in np.linspace(0, duration, n)]
    indices = list(dict.fromkeys(indices))
    if max_frames is not None and len(indices) > max_frames:
        keep = np.linspace(0, len(indices) - 1, max_frames - max_frames % 2).round().astype(int)
        indices = [indices[i] for i in keep]
    if len(indices) % 2:
        indices.append(indices[-1])
    return indices


def load_video(video, s: PixelSettings, fps: float | None = None, max_frames: int | None = None):
    """(frames (T, H, W, 3) uint8 with T even, timestamps in seconds of each sampled frame)."""
    if max_frames is not None and max_frames < 2:
        raise Glm4vError(f"max_frames={max_frames} is too small: frames reach the model in pairs, so 2 at least.")
    if isinstance(video, Video):
        frames = _frames_array(video.frames)
        if not video.fps or video.fps <= 0:
            raise Glm4vError(f"Video.fps must be a positive frame rate, not {video.fps!r}.")
        indices = sample_frames(len(frames), video.fps, video.duration, s, fps, max_frames)
        return frames[indices], [i / video.fps for i in indices]
    if isinstance(video, (str, Path)):
        return _read(existing_file(video, "video"), s, fps, max_frames)
    raise Glm4vError(f"a video must be a file path or a mlx_glm4v.video.Video, not {type(video).__name__}.")


def _frames_array(frames) -> np.ndarray:
    if isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3:
        arr = frames
    elif isinstance(frames, (list, tuple)):
        arr = np.stack([load_image(f) for f in frames]) if frames else np.zeros((0, 1, 1, 3), np.uint8)
    else:
        raise Glm4vError("Video.frames must be a (N, H, W, 3) uint8 array or a list of images.")
    if len(arr) == 0:
        raise Glm4vError("Video.frames holds no frame.")
    return arr


def _read(path: Path, s: PixelSettings, fps, max_frames):
    """Decode only the sampled frames. Metadata as transformers' PyAV reader takes it from the header
    (frame count, average rate, duration = count / rate); containers without a count (mkv, webm) are
    counted packet by packet, which is what torchcodec's exact scan does."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise Glm4vError(f"{path} has no video stream.")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
        if rate <= 0 or total <= 0:
            raise Glm4vError(f"{path}: the video has no decodable frame.")
        indices = sample_frames(total, rate, total / rate, s, fps, max_frames)
        frames, decoded = _decode(path, set(indices))
        if decoded == 0:
            raise Glm4vError(f"{path}: the video has no decodable frame.")
        if len(frames) < len(set(indices)):  # the stream ended before its header said: sample what is there
            indices = sample_frames(decoded, rate, decoded / rate, s, fps, max_frames)
            frames, _ = _decode(path, set(indices))
    except av.error.FFmpegError as e:
        raise Glm4vError(f"{path} is not a readable video ({e.strerror}).") from None
    return np.stack([frames[i] for i in indices]), [i / rate for i in indices]


def _decode(path: Path, wanted: set):
    """{index: RGB frame} for the wanted indices, and how many frames were decoded."""
    import av

    frames, decoded, stop = {}, 0, max(wanted)
    with av.open(str(path)) as container:
        container.streams.video[0].thread_type = "AUTO"  # decode on all cores; same frames
        try:
            for i, frame in enumerate(container.decode(video=0)):
                decoded = i + 1
                if i in wanted:
                    frames[i] = frame.to_ndarray(format="rgb24")
                if i >= stop:
                    break
        except av.error.InvalidDataError:
            pass  # a damaged tail: keep what decoded
    return frames, decoded
