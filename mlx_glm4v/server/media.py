"""The media a request names -> pixels the processor takes, with every check the server makes.

Sources: `data:` URLs (base64) always; files under `--media-root` only when it is given (real
paths, so neither `..` nor a symlink leads out); `http(s)` URLs only with `--allow-url-fetch`,
then size-capped, time-limited and never to a private, loopback or link-local address (checked
for every hop of a redirect, and the checked address is the one connected to). Images are
decoded here, their size read from the header before any pixel is; videos go to a temporary
file and are measured before they are decoded. A document (a PDF) becomes its selected pages,
each an image part, rendered within `--pdf-dpi` and `--max-pdf-pages` (inputs/pdf.py). The
request's media budget (`mm_processor_kwargs`, and `dpi`/`pages` on a document part) is checked
against the operator's caps here. Refusals are `ApiError`s naming the part or field.
"""

import base64
import binascii
import http.client
import ipaddress
import socket
import ssl
import tempfile
import time
import warnings
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urljoin, urlsplit

import numpy as np

from ..errors import Glm4vError
from ..inputs.pdf import PdfOptions, is_pdf, render_pages
from .neutral import ApiError, bad

LOW_DETAIL_PIXELS = 512 * 512  # `detail: low`: about OpenAI's 512 x 512 low-resolution image
MAX_REDIRECTS = 5


@dataclass
class MediaPolicy:
    media_root: Optional[Path] = None
    allow_url_fetch: bool = False
    max_media_bytes: int = 64 << 20  # one fetched or read file
    fetch_timeout: float = 10.0
    max_images: int = 16
    max_videos: int = 2
    max_image_pixels: int = 50_000_000  # decoded size of one image, read from its header
    max_video_seconds: float = 600.0
    max_video_frames: int = 640  # frames the checkpoint's sampling picks from one video
    pdf_dpi: float = 200.0  # the DPI pages are rendered at, and the most a request may ask for
    max_pdf_pages: int = 32  # pages of all a request's documents together


class Resolved:
    """Messages with media replaced by pixels (images) and temporary files (videos); `close`
    removes them."""

    def __init__(self):
        self.dir: Optional[tempfile.TemporaryDirectory] = None

    def temp_file(self, data: bytes, suffix: str) -> Path:
        if self.dir is None:
            self.dir = tempfile.TemporaryDirectory(prefix="mlx-glm4v-")
        path = Path(self.dir.name) / f"{len(list(Path(self.dir.name).iterdir()))}{suffix}"
        path.write_bytes(data)
        return path

    def close(self):
        if self.dir is not None:
            self.dir.cleanup()
            self.dir = None


def resolve_media(messages: list, policy: MediaPolicy, processor, budget: dict = None) -> tuple:
    """(messages for the template and processor, a `Resolved` to close once the processor is
    done). `budget`: the request's checked media budget (`media_budget`)."""
    budget = budget or {}
    parts = [p for m in messages if isinstance(m["content"], list) for p in m["content"]]
    caps = (
        ("image", policy.max_images, "--max-images"),
        ("video", policy.max_videos, "--max-videos"),
    )
    for kind, limit, flag in caps:
        count = sum(p["type"] == kind for p in parts)
        if count > limit:
            raise bad(
                f"the request has {count} {kind}s; this server takes at most {limit} ({flag}).",
                "messages",
            )
    resolved = Resolved()
    left = {"pages": policy.max_pdf_pages, "images": policy.max_images}  # each page is an image
    try:
        out = []
        for m in messages:
            if isinstance(m["content"], list):
                content = []
                for p in m["content"]:
                    content += _resolve_part(p, policy, processor, resolved, budget, left)
                m = {**m, "content": content}
            out.append(m)
        return out, resolved
    except BaseException:
        resolved.close()
        raise


def processor_budget(budget: dict, policy: MediaPolicy, processor) -> dict:
    """The processor's keyword arguments for a request's media budget, refused beyond the
    operator's caps (named): `max_frames` over --max-video-frames, `dpi` over --pdf-dpi,
    `min_pixels` over `max_pixels` (the request's, else the checkpoint's). `max_pixels` above
    the checkpoint's own is clamped to it (by the processor), as `fps` is capped by the frames
    it gives (--max-video-frames, checked per video)."""
    where = "mm_processor_kwargs"
    if budget.get("max_frames", 0) > policy.max_video_frames:
        raise bad(
            f"{where}.max_frames {budget['max_frames']} is over this server's limit of "
            f"{policy.max_video_frames} (--max-video-frames).",
            f"{where}.max_frames",
        )
    if budget.get("dpi", 0) > policy.pdf_dpi:
        raise bad(
            f"{where}.dpi {budget['dpi']:g} is over this server's limit of {policy.pdf_dpi:g} "
            "(--pdf-dpi).",
            f"{where}.dpi",
        )
    s = processor.image_settings
    ceiling, whose = s.max_pixels // s.temporal_patch_size, "model's"  # one frame's pixels
    if budget.get("max_pixels", ceiling) < ceiling:
        ceiling, whose = budget["max_pixels"], "request's"
    if budget.get("min_pixels", 0) > ceiling:
        raise bad(
            f"{where}.min_pixels {budget['min_pixels']} is over max_pixels {ceiling} (the "
            f"{whose}).",
            f"{where}.min_pixels",
        )
    keys = ("max_pixels", "min_pixels", "fps", "max_frames")
    return {k: budget[k] for k in keys if k in budget}


def _resolve_part(
    part: dict, policy: MediaPolicy, processor, resolved: Resolved, budget: dict, left: dict
) -> list:
    """A part -> the parts the processor reads: an image decoded, a video in a file measured, a
    document (or a PDF sent where an image goes) as its pages. `left`: the pages (--max-pdf-pages)
    and images (--max-images, a PDF's pages included) the request may still bring."""
    if part["type"] not in ("image", "video", "document"):
        return [part]
    where = part["param"]
    data, path = read_source(part["source"], policy, where)
    if part["type"] == "video":
        if path is None:
            path = resolved.temp_file(data, ".video")
        check_video(path, policy, processor, where, budget)
        return [{"type": "video", "video": str(path)}]
    if data is None:
        data = _read_file(path, policy, where)
    if is_pdf(data):
        return _pages(data, part, policy, budget, left)
    if part["type"] == "document":
        raise bad(f"{where}: the document is not a PDF (it does not start with %PDF-).", where)
    if left["images"] < 1:  # the request's PDF pages took them
        raise bad(
            f"{where}: one image more than this server's --max-images ({policy.max_images} a "
            "request, each PDF page counting as one).",
            where,
        )
    left["images"] -= 1
    image = decode_image(data, policy, processor, part.get("detail"), where)
    return [{"type": "image", "image": image}]


def _pages(data: bytes, part: dict, policy: MediaPolicy, budget: dict, left: dict) -> list:
    """A PDF's selected pages as image parts; the pages of all the request's PDFs count against
    --max-pdf-pages together, and each against --max-images with the request's other images."""
    where = part["param"]
    dpi = part.get("dpi") or budget.get("dpi") or policy.pdf_dpi
    if dpi > policy.pdf_dpi:
        raise bad(
            f"{where}.dpi {dpi:g} is over this server's limit of {policy.pdf_dpi:g} (--pdf-dpi).",
            where,
        )
    hint = f"(this server's --max-pdf-pages, {policy.max_pdf_pages} a request)"
    if left["pages"] < policy.max_pdf_pages:
        hint = (
            f"(the pages left of this server's --max-pdf-pages, {policy.max_pdf_pages} a request)"
        )
    if left["images"] < left["pages"]:  # the image cap binds first
        hint = (
            f"(the images left of this server's --max-images, {policy.max_images} a request, "
            "each page counting as one)"
        )
    most = min(left["pages"], left["images"])
    try:
        options = PdfOptions(dpi, part.get("pages"), max(most, 1), policy.max_image_pixels)
        pages = render_pages(data, options, where)
    except Glm4vError as e:
        raise bad(str(e).replace("(--max-pdf-pages)", hint), where) from None
    if len(pages) > most:  # none were left
        raise bad(f"{where}: the request's PDFs have more pages than {hint[1:-1]}.", where)
    left["pages"] -= len(pages)
    left["images"] -= len(pages)
    return [{"type": "image", "image": page} for page in pages]


# ---- sources -------------------------------------------------------------------------------------


def read_source(url: str, policy: MediaPolicy, where: str) -> tuple:
    """(bytes, None) for data: and http(s) URLs, (None, path) for a file under the media root."""
    if url.startswith("data:"):
        header, comma, payload = url[5:].partition(",")
        if not comma or not header.endswith(";base64"):
            raise bad(f"{where}: a data URL must be base64 (data:<type>;base64,<data>).", where)
        try:
            return base64.b64decode(payload, validate=True), None
        except (binascii.Error, ValueError):
            raise bad(f"{where}: the data URL is not valid base64.", where) from None
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        if not policy.allow_url_fetch:
            raise bad(
                f"{where}: http(s) URLs are not fetched; send the media as a data: URL, or start "
                "the server with --allow-url-fetch.",
                where,
            )
        return fetch(url, policy, where), None
    if scheme not in ("", "file") and len(scheme) > 1:  # a one-letter scheme is a Windows drive
        raise bad(
            f"{where}: URL scheme {scheme!r} is not supported (data:, file paths, http(s)).", where
        )
    if policy.media_root is None:
        raise bad(
            f"{where}: local files are not read; send the media as a data: URL, or start the "
            "server with --media-root DIR.",
            where,
        )
    return None, inside_root(
        unquote(url[7:]) if url.startswith("file://") else url, policy.media_root, where
    )


def inside_root(name: str, root: Path, where: str) -> Path:
    """The real path of `name` (relative to the root, or absolute) if it lies inside the root."""
    root = root.resolve()
    # an absolute `name` replaces the root; symlinks and .. are resolved
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise ApiError(
            403,
            f"{where}: the path is outside the server's --media-root.",
            where,
            "path_not_allowed",
        )
    if not path.is_file():
        raise ApiError(
            404, f"{where}: no such file under the server's --media-root.", where, "file_not_found"
        )
    return path


def _read_file(path: Path, policy: MediaPolicy, where: str) -> bytes:
    if path.stat().st_size > policy.max_media_bytes:
        raise ApiError(
            413, f"{where}: the file is larger than {policy.max_media_bytes} bytes.", where
        )
    return path.read_bytes()


def _public_address(host: str, port: int, where: str) -> str:
    """An address of `host` to connect to, refusing hosts that resolve to any non-public address."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise bad(f"{where}: the host {host!r} could not be resolved.", where) from None
    addresses = []
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        ip = getattr(ip, "ipv4_mapped", None) or ip
        if not ip.is_global or ip.is_multicast:
            raise ApiError(
                403,
                f"{where}: {host!r} is a private, loopback or link-local address, which the server "
                "does not fetch from.",
                where,
                "address_not_allowed",
            )
        addresses.append(info[4][0])
    return addresses[0]


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the address that was checked, whatever DNS says now."""

    def __init__(self, host, port, address, timeout):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self):
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host, port, address, timeout):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self):
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch(url: str, policy: MediaPolicy, where: str) -> bytes:
    """GET `url` within the size cap and the timeout, following redirects, each hop checked."""
    deadline = time.monotonic() + policy.fetch_timeout
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise bad(f"{where}: cannot fetch from a {parts.scheme or 'scheme-less'} URL.", where)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = _public_address(parts.hostname, port, where)
        cls = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
        conn = cls(parts.hostname, port, address, max(0.1, deadline - time.monotonic()))
        try:
            conn.request(
                "GET",
                (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                headers={"User-Agent": "mlx-glm4v", "Accept": "image/*, video/*"},
            )
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urljoin(url, response.getheader("Location"))
                continue
            if response.status != 200:
                raise bad(f"{where}: the URL answered HTTP {response.status}.", where)
            length = response.getheader("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_media_bytes:
                raise ApiError(
                    413,
                    f"{where}: the URL's content is over {policy.max_media_bytes} bytes.",
                    where,
                )
            chunks, size = [], 0
            while chunk := response.read(1 << 16):
                size += len(chunk)
                if size > policy.max_media_bytes:
                    raise ApiError(
                        413,
                        f"{where}: the URL's content is over {policy.max_media_bytes} bytes.",
                        where,
                    )
                if time.monotonic() > deadline:
                    raise ApiError(
                        400,
                        f"{where}: fetching the URL took over {policy.fetch_timeout:g} s.",
                        where,
                    )
                chunks.append(chunk)
            return b"".join(chunks)
        except (OSError, http.client.HTTPException) as e:
            raise bad(
                f"{where}: the URL could not be fetched ({type(e).__name__}).", where
            ) from None
        finally:
            conn.close()
    raise bad(f"{where}: the URL redirects more than {MAX_REDIRECTS} times.", where)


# ---- decoding and measuring ----------------------------------------------------------------------


def decode_image(data: bytes, policy: MediaPolicy, processor, detail: Optional[str], where: str):
    """An RGB PIL image, decoded as the CLI decodes a file (EXIF orientation, alpha dropped).

    The size is read from the header first, so a decompression bomb is refused unread. `detail:
    low` resizes here to the low budget exactly as the processor would, which then leaves it be.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    too_large = f"over the limit of {policy.max_image_pixels} (--max-image-pixels)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            im = Image.open(BytesIO(data))
    except Image.DecompressionBombError:
        raise bad(
            f"{where}: the image's header claims more pixels than PIL opens, {too_large}.",
            where,
            "image_too_large",
        ) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise bad(
            f"{where}: the data is not an image in a format the server reads (PNG, JPEG, "
            "WebP, GIF, ...).",
            where,
        ) from None
    w, h = im.size
    if w * h > policy.max_image_pixels:
        raise bad(
            f"{where}: the image is {w}x{h} = {w * h} pixels, {too_large}.",
            where,
            "image_too_large",
        )
    try:
        rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise bad(
            f"{where}: the image could not be decoded (damaged or truncated).", where
        ) from None
    original = rgb.shape[1::-1]  # (width, height) as the user sees the picture
    if detail == "low":
        from ..inputs.image import resize, smart_resize

        s = processor.image_settings
        budget = min(s.max_pixels, LOW_DETAIL_PIXELS * s.temporal_patch_size)
        try:
            hh, ww = smart_resize(s.temporal_patch_size, *rgb.shape[:2], s, budget, where)
        except Exception as e:
            raise bad(str(e), where) from None
        rgb = resize(rgb[None], hh, ww)[0]
    out = Image.fromarray(rgb)
    out.info["original_size"] = original  # what grounding boxes map to, whatever `detail` did
    return out


def check_video(path: Path, policy: MediaPolicy, processor, where: str, budget: dict = None):
    """Refuse a video that is not one, lasts too long or would be sampled into too many frames."""
    import av

    from ..inputs.video import sample_frames

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise bad(f"{where}: the data has no video stream.", where)
            stream = container.streams.video[0]
            exact = stream.average_rate or stream.guessed_rate or 0
            total = stream.frames
            if not total and float(container.duration or 0) / 1e6 <= policy.max_video_seconds:
                total = sum(1 for p in container.demux(stream) if p.size)
    except av.error.FFmpegError:
        raise bad(
            f"{where}: the data is not a video in a format the server reads.", where
        ) from None
    if not exact or not total:
        raise bad(f"{where}: the video has no decodable frame.", where)
    seconds = float(total / exact)
    if seconds > policy.max_video_seconds:
        raise bad(
            f"{where}: the video lasts {seconds:.1f} s, over the limit of "
            f"{policy.max_video_seconds:g} s (--max-video-seconds).",
            where,
            "video_too_long",
        )
    budget = budget or {}
    try:
        frames = len(
            sample_frames(
                total,
                float(exact),
                seconds,
                processor.video_settings,
                budget.get("fps"),
                budget.get("max_frames"),
            )
        )
    except Exception as e:
        raise bad(f"{where}: {e}", where) from None
    if frames > policy.max_video_frames:
        raise bad(
            f"{where}: the video would be sampled into {frames} frames, over the limit of "
            f"{policy.max_video_frames} (--max-video-frames).",
            where,
            "video_too_long",
        )
