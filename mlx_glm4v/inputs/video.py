"""Videos: decoding with PyAV and the reference's frame sampling
(`Glm4vVideoProcessor.sample_frames`, `Glm46VVideoProcessor.sample_frames` for GLM-4.6V
checkpoints, `GlmgaVideoProcessor.sample_frames` for glmga's).

A video is a file path (anything FFmpeg reads: mp4, mov, mkv, webm, gif, ...) or a `Video`
holding frames the caller decoded, with their frame rate. Only the sampled frames are converted
to RGB, so long clips cost little memory.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import Glm4vError
from .image import PixelSettings, existing_file, load_image


@dataclass
class Video:
    """All frames of a clip, (N, H, W, 3) uint8 RGB or a list of PIL images / arrays, shown at
    `fps`.

    `duration` (seconds) is what a container would report; left out, the reference derives it
    from the frame count and fps.
    """

    frames: object
    fps: float
    duration: float | None = None


def sample_frames(
    total: int,
    video_fps: float,
    duration: float | None,
    s: PixelSettings,
    fps: float | None = None,
    max_frames: int | None = None,
) -> list[int]:
    """Frame indices as the checkpoint's video processor picks them (`s.sampling`).

    Duplicates are dropped and the last index repeated to make the count even (frames go in pairs).
    `fps` replaces the processor's rate; `max_frames`, not in the reference, thins the picked
    indices evenly. Both are off by default.
    """
    duration = duration or round((total - 1) / video_fps) + 1
    pick = {"dynamic": _dynamic_fps, "glmga": _glmga_fps}.get(s.sampling, _fixed_fps)
    indices = list(dict.fromkeys(pick(total, video_fps, duration, s, fps)))
    if not indices:
        raise Glm4vError(
            f"the video lasts {duration:.3g} s: too short for the checkpoint's frame sampling "
            "to pick a frame."
        )
    if max_frames is not None and len(indices) > max_frames:
        keep = np.linspace(0, len(indices) - 1, max_frames - max_frames % 2).round().astype(int)
        indices = [indices[i] for i in keep]
    if len(indices) % 2:
        indices.append(indices[-1])
    return indices


def _fixed_fps(
    total: int, video_fps: float, duration: float, s: PixelSettings, fps: float | None
) -> list[int]:
    """`Glm4vVideoProcessor`: `s.fps` frames per second (2), 600 spread over clips past
    `s.max_duration` (300 s)."""
    fps = s.fps if fps is None else fps
    last = total - 1
    if duration <= s.max_duration:
        n = max(int(math.floor(duration * fps)), 1)
        return [min(last, int(math.ceil(i * video_fps / fps))) for i in range(n)]
    n = int(s.max_duration * fps)
    if n >= total:
        return list(range(total))
    return [min(last, int(math.ceil(t * video_fps))) for t in np.linspace(0, duration, n)]


# Glm46VVideoProcessor: frame pairs per second for clips up to 30 s, up to 300 s, longer; at most
# 640 frames, as many as the first 2400 s would get.
DYNAMIC_FPS = ((30, 3), (300, 1), (math.inf, 0.5))
DYNAMIC_MAX_FRAMES = 640
DYNAMIC_MAX_DURATION = 2400


def _dynamic_fps(
    total: int, video_fps: float, duration: float, s: PixelSettings, fps: float | None
) -> list[int]:
    """`Glm46VVideoProcessor`: 6 frames a second up to 30 s, 2 up to 300 s, then 1, at most 640.

    Frames are picked walking the clip at that rate up to its last whole second; the count is
    met by spreading evenly, over the picked span when they fall short, over the clip when over.
    """
    effective = min(duration, DYNAMIC_MAX_DURATION)
    pairs = next(rate for limit, rate in DYNAMIC_FPS if effective <= limit)
    count, step = (
        int(effective * pairs * s.temporal_patch_size),
        1 / (s.temporal_patch_size * pairs),
    )
    if fps is not None:
        count, step = int(effective * fps), 1 / fps
    count = min(count, DYNAMIC_MAX_FRAMES)
    if total < count:
        return np.linspace(0, total - 1, count, dtype=int).tolist()
    indices, second, frame_time = [], 0, 1 / video_fps
    for i in range(total):
        if i * frame_time >= second:
            second += step
            indices.append(i)
            if second >= int(duration):
                break
    return _spread(indices, count, total)


def _glmga_fps(
    total: int, video_fps: float, duration: float, s: PixelSettings, fps: float | None
) -> list[int]:
    """`GlmgaVideoProcessor`: `s.fps` frames a second (the reference's `fps` argument replaces
    it), at most `s.max_frames`.

    Clips with fewer frames than that repeat frames; otherwise frames are picked walking the clip
    at that rate until a step short of its end, then spread evenly to the count as GLM-4.6V's.
    """
    rate = s.fps if fps is None else fps
    count = min(int(duration * rate), s.max_frames)
    if total < count:
        return [math.floor(i * total / count) for i in range(count)]
    indices, second, step, frame_time = [], 0, 1 / rate, 1 / video_fps
    for i in range(total):
        if i * frame_time >= second:
            second += step
            indices.append(i)
            if second >= duration - step:
                break
    return _spread(indices, count, total)


def _spread(indices: list[int], count: int, total: int) -> list[int]:
    """The picked indices brought to `count`: spread over the picked span when short, over the
    clip when over."""
    if len(indices) < count:
        start, end = (indices[0], indices[-1]) if indices else (0, total - 1)
        return np.linspace(start, end, count, dtype=int).tolist()
    if len(indices) > count:
        return np.linspace(0, total - 1, count, dtype=int).tolist()
    return indices


def load_video(video, s: PixelSettings, fps: float | None = None, max_frames: int | None = None):
    """(frames (T, H, W, 3) uint8 with T even, timestamps in seconds of each sampled frame)."""
    if max_frames is not None and max_frames < 2:
        raise Glm4vError(
            f"max_frames={max_frames} is too small: frames reach the model in pairs, so 2 at least."
        )
    if isinstance(video, Video):
        frames = _frames_array(video.frames)
        if not video.fps or video.fps <= 0:
            raise Glm4vError(f"Video.fps must be a positive frame rate, not {video.fps!r}.")
        indices = sample_frames(len(frames), video.fps, video.duration, s, fps, max_frames)
        return frames[indices], [i / video.fps for i in indices]
    if isinstance(video, (str, Path)):
        return _read(existing_file(video, "video"), s, fps, max_frames)
    raise Glm4vError(
        "a video must be a file path or a mlx_glm4v.inputs.video.Video, not "
        f"{type(video).__name__}."
    )


def _frames_array(frames) -> np.ndarray:
    if (
        isinstance(frames, np.ndarray)
        and frames.dtype == np.uint8
        and frames.ndim == 4
        and frames.shape[-1] == 3
    ):
        arr = frames
    elif isinstance(frames, (list, tuple)):
        arr = (
            np.stack([load_image(f) for f in frames])
            if frames
            else np.zeros((0, 1, 1, 3), np.uint8)
        )
    else:
        raise Glm4vError("Video.frames must be a (N, H, W, 3) uint8 array or a list of images.")
    if len(arr) == 0:
        raise Glm4vError("Video.frames holds no frame.")
    return arr


def _read(path: Path, s: PixelSettings, fps, max_frames):
    """Decode only the sampled frames. Metadata as transformers' PyAV reader takes it from the
    header (frame count, average rate, duration = count / rate); containers without a count (mkv,
    webm) are counted packet by packet, which is what torchcodec's exact scan does."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise Glm4vError(f"{path} has no video stream.")
            stream = container.streams.video[0]
            # a Fraction: durations as the reader divides
            exact = stream.average_rate or stream.guessed_rate or 0
            rate = float(exact)
            total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
        if rate <= 0 or total <= 0:
            raise Glm4vError(f"{path}: the video has no decodable frame.")
        indices = sample_frames(total, rate, float(total / exact), s, fps, max_frames)
        frames, decoded = _decode(path, set(indices))
        if decoded == 0:
            raise Glm4vError(f"{path}: the video has no decodable frame.")
        # the stream ended before its header said: sample what is there
        if len(frames) < len(set(indices)):
            indices = sample_frames(decoded, rate, float(decoded / exact), s, fps, max_frames)
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
