"""Chat messages and media in; the token ids and pixel patches of transformers' `Glm4vProcessor` (or
`Glm46VProcessor`, whichever the checkpoint names) out.

No torch, transformers or mlx: the chat template renders with jinja2, text goes through the
`tokenizers` library on the checkpoint's tokenizer.json, pixels through PIL and numpy.

    processor = Processor.from_pretrained("path/to/GLM-4.1V-9B-Thinking")
    messages = [{"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                             {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(messages)
    images, videos = processor.media_from_messages(messages)
    inputs = processor(text=prompt, images=images, videos=videos)
    inputs = processor.process_messages(messages)  # the same, in one call

Message text is data: a special-token string inside it (`<|image|>`, `<|assistant|>`, ...) reaches
the model as plain text, never as a control token; only the template's own structure and real
media make those (see `Tokenizer.mark`).
"""

import json
import re
from dataclasses import replace
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import Glm4vError
from .image import PixelSettings, image_patches, patchify, resize, smart_resize
from .pdf import PdfOptions, is_pdf_file, render_pages
from .video import load_video

IMAGE, VIDEO = "<|image|>", "<|video|>"
BEGIN_IMAGE, END_IMAGE = "<|begin_of_image|>", "<|end_of_image|>"
BEGIN_VIDEO, END_VIDEO = "<|begin_of_video|>", "<|end_of_video|>"
_PLACEHOLDER = re.compile(re.escape(IMAGE) + "|" + re.escape(VIDEO))

# Message text is data. Before the template renders it, every special-token string in a string
# taken from the messages, tools or template arguments is wrapped in two Unicode noncharacters
# (which those strings cannot carry unwrapped: they are wrapped too); the tokenizer encodes a
# wrapped span as plain text and drops the marks. Text without special-token strings renders and
# tokenizes exactly as transformers does.
DATA_OPEN, DATA_CLOSE = "\ufdd0", "\ufdd1"
_DATA_SPAN = re.compile("\ufdd0([\ufdd0\ufdd1]|[^\ufdd0\ufdd1]+)\ufdd1")
# The markers GLM-V writes inside its own turn: thinking, answer, boxes, tool calls. In an assistant
# message's content they stay control tokens (the reply as the model wrote it, which the cache
# already holds and GLM-4.5V's template splits at `</think>`); a reply's text shows them (reply.py
# reads them) and hides every other control token the model may emit.
REPLY_MARKERS = (
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<|begin_of_box|>",
    "<|end_of_box|>",
    "<tool_call>",
    "</tool_call>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
)


def unmark(text: str) -> str:
    """A rendered prompt as plain text: the data marks removed (for display and comparison)."""
    return "".join(piece for piece, _ in _pieces(text))


def _pieces(text: str):
    """(text, is_data) pieces of a rendered prompt; a mark without its pair (a template that cut a
    marked span) is dropped."""
    at = 0
    for m in _DATA_SPAN.finditer(text):
        yield text[at : m.start()].replace(DATA_OPEN, "").replace(DATA_CLOSE, ""), False
        yield m.group(1), True
        at = m.end()
    yield text[at:].replace(DATA_OPEN, "").replace(DATA_CLOSE, ""), False


# Where GLM-4.6V's processors differ (images, placeholders and token types do not). transformers
# picks the processor and the video processor each by its own class name, and so do we.
# processor class -> the text after a video frame's tokens, from the frame's time in seconds
FRAME_TIMES = {
    "Glm4vProcessor": lambda t: str(int(t)),
    "Glm46VProcessor": lambda t: f"{t:.1f} seconds",
}
# video processor class -> how it picks frames (video.sample_frames)
SAMPLING = {
    "Glm4vVideoProcessor": "fixed",
    "Glm46VVideoProcessor": "dynamic",
    "GlmgaVideoProcessor": "glmga",
}
# video processor class -> its pixel budget when the saved settings leave it out
VIDEO_MAX_PIXELS = {"GlmgaVideoProcessor": 28 * 28 * 2 * 55790}
# model type -> (processor, video processor) when no file names them (transformers' auto
# mappings: GLM-OCR's processor is GLM-4.6V's; glmga's is GLM-4.6V's with its own media ones)
FAMILY_CLASSES = {
    "glm46v": ("Glm46VProcessor", "Glm46VVideoProcessor"),
    "glm_ocr": ("Glm46VProcessor", "Glm46VVideoProcessor"),
    "glmga": ("Glm46VProcessor", "GlmgaVideoProcessor"),
}


def _read_json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Glm4vError(f"{path} is not valid JSON ({e}).") from None


def _token(config: dict, key: str):
    """A named special token from tokenizer_config.json, stored as a string or an AddedToken
    dict."""
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """The checkpoint's tokenizer.json, encoding exactly as transformers' fast tokenizer does.

    With a tokenizer.json, transformers drops add_bos_token/add_eos_token from the config and keeps
    the file's post-processor, so the file alone decides which special tokens `encode` adds.
    """

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as Backend

        file = path / "tokenizer.json"
        if not file.is_file():
            raise Glm4vError(f"{file} is missing; mlx-glm4v reads the fast tokenizer file.")
        self.backend = Backend.from_file(str(file))
        # transformers' call pads and truncates only when asked, whatever tokenizer.json says
        self.backend.no_padding()
        self.backend.no_truncation()
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            config.update(_read_json(path / name) or {})
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        self.special_tokens = {k: t for k in names if (t := _token(config, k))}
        pad = self.special_tokens.get("pad_token") or self.special_tokens.get("eos_token")
        self.pad_token_id = self.convert_tokens_to_ids(pad) or 0
        # every added token, special or not: any of them in message text is data
        self.added = {t.content: i for i, t in self.backend.get_added_tokens_decoder().items()}
        self.added_ids = frozenset(self.added.values())
        self._added_array = np.array(sorted(self.added_ids), np.int64)
        names = sorted(self.added, key=len, reverse=True) + [DATA_OPEN, DATA_CLOSE]
        self._data = re.compile("|".join(map(re.escape, names)))
        self._longest = max(map(len, self.added), default=0)
        self._text_backend, self._prefixes = None, {}

    def encode(self, text: str) -> list[int]:
        """Ids with the special tokens the post-processor adds, as `tokenizer(text)` does by
        default.

        Text marked as data (`mark`) is read as text: the control tokens are those of the
        unmarked text alone, and a stretch between two of them that holds marked text is encoded
        with no added token recognised."""
        if DATA_OPEN not in text and DATA_CLOSE not in text:
            return self.backend.encode(text).ids
        # run: (text, its ids, or None for marked text) since the last control token
        ids, run = [], []

        def flush():
            if any(part is None for _, part in run):
                ids.extend(
                    self.text_backend.encode(
                        "".join(t for t, _ in run), add_special_tokens=False
                    ).ids
                )
            else:
                ids.extend(i for _, part in run for i in part)
            run.clear()

        for piece, data in _pieces(text):
            if data:
                run.append((piece, None))
                continue
            # split at added tokens first
            found = self.backend.encode(piece, add_special_tokens=False)
            found_ids, at, first = found.ids, 0, 0
            for k in np.flatnonzero(
                np.isin(np.array(found_ids, np.int64), self._added_array)
            ).tolist():
                start, end = found.token_to_chars(k)
                run.append((piece[at:start], found_ids[first:k]))
                flush()
                ids.append(found_ids[k])
                at, first = end, k + 1
            run.append((piece[at:], found_ids[first:]))
        flush()
        before, after = self._added_around
        return before + ids + after

    @property
    def _added_around(self) -> tuple:
        """The ids the post-processor puts before and after a text's own (none for GLM's
        tokenizer)."""
        if self.backend.num_special_tokens_to_add(False) == 0:
            return [], []
        inner, outer = (
            self.backend.encode("a", add_special_tokens=False).ids,
            self.backend.encode("a").ids,
        )
        at = next(i for i in range(len(outer)) if outer[i : i + len(inner)] == inner)
        return outer[:at], outer[at + len(inner) :]

    @property
    def text_backend(self):
        """The tokenizer with every added token taken as text (all made special, special ones
        encoded)."""
        if self._text_backend is None:
            from tokenizers import Tokenizer as Backend

            file = json.loads(self.backend.to_str())
            for token in file.get("added_tokens") or []:
                token["special"] = True
            backend = Backend.from_str(json.dumps(file))
            backend.encode_special_tokens = True
            self._text_backend = backend
        return self._text_backend

    def mark(self, value, keep=()):
        """`value` (a string, or lists, tuples and dicts of them, keys included) with every
        added-token string but those in `keep` marked as data, and so is a string's end that
        could begin one, so that two strings rendered side by side cannot join into one; anything
        else is returned as is."""
        if isinstance(value, dict):
            return {self.mark(k, keep): self.mark(v, keep) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.mark(v, keep) for v in value)
        if not isinstance(value, str) or not value:
            return value
        found = list(self._data.finditer(value))
        free = len(value) - (found[-1].end() if found else 0)  # a tail begins after the last token
        starts = self._starts(tuple(keep))
        tail = next((n for n in range(min(free, self._longest), 0, -1) if value[-n:] in starts), 0)
        out, at = [], 0
        for m in found:
            token = m.group()
            out += [
                value[at : m.start()],
                token if token in keep else DATA_OPEN + token + DATA_CLOSE,
            ]
            at = m.end()
        out.append(value[at : len(value) - tail])
        if tail:
            out.append(DATA_OPEN + value[-tail:] + DATA_CLOSE)
        return "".join(out)

    def _starts(self, keep: tuple) -> frozenset:
        """Proper prefixes of the added tokens not in `keep`."""
        if keep not in self._prefixes:
            self._prefixes[keep] = frozenset(
                t[:n] for t in self.added if t not in keep for n in range(1, len(t))
            )
        return self._prefixes[keep]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, token: str | None) -> int | None:
        return self.backend.token_to_id(token) if token is not None else None


@lru_cache
def _compile(template: str):
    """Jinja as transformers sets it up for chat templates: sandboxed, trimmed, its tojson."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        text = json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )
        # the data marks stay marks when the template asks for ASCII
        return (
            text.replace("\\ufdd0", DATA_OPEN).replace("\\ufdd1", DATA_CLOSE)
            if ensure_ascii
            else text
        )

    def raise_exception(message):
        from jinja2.exceptions import TemplateError

        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _load_template(path: Path) -> str:
    """The chat template, looked up where transformers looks, legacy places first as it does."""
    legacy = (_read_json(path / "processor_config.json") or {}).get("chat_template")
    legacy = legacy or (_read_json(path / "chat_template.json") or {}).get("chat_template")
    if legacy:
        return legacy
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = (_read_json(path / "tokenizer_config.json") or {}).get("chat_template")
    if isinstance(template, list):  # named templates
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
        raise Glm4vError(
            f"{path} has no chat template (looked in chat_template.jinja, chat_template.json "
            "and tokenizer_config.json)."
        )
    return template


def _normalize(messages) -> list[dict]:
    """What transformers does before rendering: drop None values, OpenAI `image_url` items become
    `image` items, and reasoning is offered under every name templates read."""
    out = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        if isinstance(message.get("content"), list):
            message["content"] = [_from_openai(item) for item in message["content"]]
        names = ("reasoning_content", "thinking", "reasoning")
        reasoning = next((message[k] for k in names if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


PDF_KEYS = {"dpi": "dpi", "pages": "pages", "max_pdf_pages": "max_pages"}


def split_media_kwargs(media_kwargs: dict | None) -> tuple:
    """(the PDF options, the processor's own keyword arguments) of a `media_kwargs`."""
    media = dict(media_kwargs or {})
    given = {PDF_KEYS[k]: media.pop(k) for k in list(media) if k in PDF_KEYS}
    return PdfOptions(**{k: v for k, v in given.items() if v is not None}), media


def expand_pdfs(messages, options: PdfOptions) -> list:
    """Messages with each image item that is a PDF file replaced by its rendered pages."""
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(_pdf_item(item) for item in content):
            items = []
            for item in content:
                source = _pdf_item(item)
                pages = render_pages(source, options, str(source)) if source else [item]
                items += [{"type": "image", "image": p} for p in pages] if source else pages
            message = {**message, "content": items}
        out.append(message)
    return out


def _pdf_item(item):
    """The path of an image item whose file is a PDF, else None."""
    item = _from_openai(item)
    if _media_kind(item) != "image":
        return None
    source = next((item[k] for k in ("image", "url", "path") if item.get(k) is not None), None)
    return source if is_pdf_file(source) else None


def _from_openai(item):
    """{"type": "image_url", "image_url": {"url": u}} -> {"type": "image", "url": u}."""
    if not (isinstance(item, dict) and item.get("type") == "image_url" and "image_url" in item):
        return item
    url = item["image_url"]
    return {"type": "image", "url": url.get("url", "") if isinstance(url, dict) else url}


def _media_kind(item) -> str | None:
    """'image', 'video' or None, deciding as the published template does (a video key wins)."""
    if not isinstance(item, dict):
        return None
    if item.get("type") in ("image", "video"):
        return item["type"]
    return "video" if "video" in item else "image" if "image" in item else None


def _flat(items) -> list:
    """None, one item, a flat list or per-prompt lists -> one flat list."""
    if items is None:
        return []
    if not isinstance(items, (list, tuple)):
        return [items]
    return [x for item in items for x in (item if isinstance(item, (list, tuple)) else [item])]


def _label(source, index: int, kind: str) -> str:
    return str(source) if isinstance(source, (str, Path)) else f"{kind} {index + 1}"


def _class_names(
    path: Path, combined: dict, image_file: dict | None, video_file: dict | None, video: dict
):
    """(processor class, video processor class) as transformers' AutoProcessor and
    AutoVideoProcessor find them: in the processor files, else after config.json's model type."""
    model_type = (_read_json(path / "config.json") or {}).get("model_type")
    family = FAMILY_CLASSES.get(model_type, ("Glm4vProcessor", "Glm4vVideoProcessor"))
    # the video file only without the image one
    legacy = image_file if image_file is not None else video_file
    places = (combined, legacy, _read_json(path / "tokenizer_config.json"))
    processor = next((c["processor_class"] for c in places if c and c.get("processor_class")), None)
    from_image = (video.get("image_processor_type") or "").replace(
        "ImageProcessor", "VideoProcessor"
    )
    video_processor = video.get("video_processor_type") or (
        from_image if from_image in SAMPLING else None
    )
    return processor or family[0], video_processor or family[1]


class Processor:
    """Glm4vProcessor (and Glm46VProcessor) without torch: chat template, tokenizer, image and
    video pixels.

    `processor_class` "Glm46VProcessor" writes frame times as GLM-4.6V's does; the video
    settings' `sampling` picks the frames as the checkpoint's video processor does.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str,
        image_settings: PixelSettings,
        video_settings: PixelSettings,
        processor_class: str = "Glm4vProcessor",
    ):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_settings = image_settings
        self.video_settings = video_settings
        self.processor_class = processor_class
        self.frame_time = FRAME_TIMES.get(processor_class, FRAME_TIMES["Glm4vProcessor"])
        ids = tokenizer.convert_tokens_to_ids
        self.image_token_id, self.video_token_id = ids(IMAGE), ids(VIDEO)
        self.video_start_id, self.video_end_id = ids(BEGIN_VIDEO), ids(END_VIDEO)

    @classmethod
    def from_pretrained(cls, path) -> "Processor":
        """Read a local checkpoint directory: processor_config.json (transformers 5) or the
        published preprocessor_config.json + video_preprocessor_config.json, the tokenizer and
        the chat template. The class names there (or config.json's model type) say whether it is
        GLM-4.6V's processor."""
        path = Path(path)
        if not path.is_dir():
            raise Glm4vError(f"{path}: no such checkpoint directory.")
        combined = _read_json(path / "processor_config.json") or {}
        image_file = _read_json(path / "preprocessor_config.json")
        video_file = _read_json(path / "video_preprocessor_config.json")
        image = combined.get("image_processor") or image_file or {}
        video = combined.get("video_processor") or video_file or image_file or {}
        processor_class, video_class = _class_names(path, combined, image_file, video_file, video)
        video_settings = PixelSettings.from_dict(
            video, default_max_pixels=VIDEO_MAX_PIXELS.get(video_class, 28 * 28 * 2 * 30000)
        )
        return cls(
            Tokenizer(path),
            _load_template(path),
            PixelSettings.from_dict(image, default_max_pixels=28 * 28 * 15000),
            replace(video_settings, sampling=SAMPLING.get(video_class, "fixed")),
            processor_class,
        )

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.tokenizer.convert_tokens_to_ids(token)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt string, rendered from the checkpoint's own template; kwargs reach the
        template."""
        from jinja2.exceptions import TemplateError

        mark = self.tokenizer.mark
        try:
            return _compile(self.chat_template).render(
                messages=[self._mark_message(m) for m in _normalize(messages)],
                tools=mark(kwargs.pop("tools", None)),
                documents=mark(kwargs.pop("documents", None)),
                add_generation_prompt=add_generation_prompt,
                **{**self.tokenizer.special_tokens, **mark(kwargs)},
            )
        except TemplateError as e:
            raise Glm4vError(f"the chat template rejected the messages: {e}") from None

    def _mark_message(self, message: dict) -> dict:
        """A message with its text marked as data (`Tokenizer.mark`); an assistant's content keeps
        GLM-V's own reply markers."""
        mark = self.tokenizer.mark
        out = {k: mark(v) for k, v in message.items() if k != "content"}
        if "content" in message:
            keep = REPLY_MARKERS if message.get("role") == "assistant" else ()
            content = message["content"]
            out["content"] = (
                [item if _media_kind(item) else mark(item, keep) for item in content]
                if isinstance(content, list)
                else mark(content, keep)
            )
        return out

    def media_from_messages(self, messages) -> tuple[list, list]:
        """(images, videos) in the order the template places them. An item carries its source
        under `image`/`video`, `url` or `path`: a local path, or for images a PIL image or array,
        for videos a `Video`. URLs are refused when read, since nothing is downloaded."""
        media = {"image": [], "video": []}
        for message in _normalize(messages):
            content = message.get("content")
            for item in content if isinstance(content, list) else []:
                if kind := _media_kind(item):
                    source = next(
                        (item[k] for k in (kind, "url", "path") if item.get(k) is not None), None
                    )
                    if source is not None:
                        media[kind].append(source)
        return media["image"], media["video"]

    def process_messages(
        self, messages, template_kwargs: dict | None = None, media_kwargs: dict | None = None
    ) -> dict:
        """Processor outputs for chat messages ending in a generation prompt: the template
        rendered (`template_kwargs` reach it), their images and videos read (`media_kwargs`:
        fps, max_frames, max_pixels, min_pixels; for PDFs dpi, pages, max_pdf_pages), as
        transformers' `apply_chat_template(..., tokenize=True, return_dict=True)`. An image
        that is a PDF file stands for its pages, each one image."""
        pdf, media_kwargs = split_media_kwargs(media_kwargs)
        messages = expand_pdfs(messages, pdf)
        text = self.apply_chat_template(
            messages, add_generation_prompt=True, **(template_kwargs or {})
        )
        images, videos = self.media_from_messages(messages)
        return self(text, images=images, videos=videos, **media_kwargs)

    def __call__(
        self,
        text,
        images=None,
        videos=None,
        padding: bool = True,
        *,
        fps: float | None = None,
        max_frames: int | None = None,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
    ) -> dict:
        """Token ids and pixels for one prompt or a batch, as `Glm4vProcessor(text, images,
        videos)`.

        `images`/`videos` are flat lists in prompt order across the batch. The caps, off by
        default so that the output equals the reference: `fps` frames sampled per second of video
        (GLM-4.1V's checkpoints say 2; GLM-4.6V's processor takes 6, 2 or 1 by the clip's
        length), `max_frames` per video, `max_pixels` for the resized area (h*w) of each image
        and video frame (never above the checkpoint's), `min_pixels` the least area (never above
        `max_pixels`).
        """
        texts = [list(_pieces(t)) for t in ([text] if isinstance(text, str) else text)]
        images, videos = _flat(images), _flat(videos)
        for token, given, kind in ((IMAGE, images, "image"), (VIDEO, videos, "video")):
            places = sum(piece.count(token) for t in texts for piece, data in t if not data)
            if places != len(given):
                raise Glm4vError(
                    f"the prompt has {places} {kind} place(s) ({token}) "
                    f"but {len(given)} {kind}(s) were given."
                )

        out, expansions = {}, {IMAGE: [], VIDEO: []}
        if images:
            s, merge = self.image_settings, self.image_settings.merge_size**2
            if min_pixels is not None:  # per frame, as max_pixels: the checkpoint's counts t*h*w
                s = replace(s, min_pixels=min_pixels * s.temporal_patch_size)
            done = [
                image_patches(x, s, max_pixels, _label(x, i, "image")) for i, x in enumerate(images)
            ]
            out["pixel_values"] = np.concatenate([rows for rows, _ in done])
            out["image_grid_thw"] = np.array([grid for _, grid in done], np.int32)
            expansions[IMAGE] = [IMAGE * (t * h * w // merge) for t, h, w in out["image_grid_thw"]]
        if videos:
            caps = fps, max_frames, max_pixels, min_pixels
            done = [self._video(x, _label(x, i, "video"), *caps) for i, x in enumerate(videos)]
            out["pixel_values_videos"] = np.concatenate([rows for rows, _, _ in done])
            out["video_grid_thw"] = np.array([grid for _, grid, _ in done], np.int32)
            expansions[VIDEO] = [prompt for _, _, prompt in done]

        pending = {token: iter(expansion) for token, expansion in expansions.items()}

        # the places in the template's text, never in data
        def expand(piece: str, data: bool) -> str:
            if data:
                return DATA_OPEN + piece + DATA_CLOSE
            return _PLACEHOLDER.sub(lambda m: next(pending[m.group()]), piece)

        ids = [self.tokenizer.encode("".join(expand(*p) for p in t)) for t in texts]
        return {**self._batch(ids, padding), **out}

    def _video(self, video, name: str, fps, max_frames, max_pixels, min_pixels):
        """Rows, grid and the prompt text for one video: per frame pair, an image group and its
        second."""
        s = self.video_settings
        frames, timestamps = load_video(video, s, fps, max_frames)
        if min_pixels is not None:
            s = replace(s, min_pixels=min_pixels * len(frames))
        budget = s.max_pixels if max_pixels is None else min(s.max_pixels, max_pixels * len(frames))
        h, w = smart_resize(len(frames), *frames.shape[1:3], s, budget, name)
        rows, (t, gh, gw) = patchify(resize(frames, h, w), s)  # sampling left an even frame count
        per_frame = IMAGE * (gh * gw // s.merge_size**2)
        stamps = timestamps[::2][:t]  # one per frame pair, the reference's "mrope" stride
        text = "".join(f"{BEGIN_IMAGE}{per_frame}{END_IMAGE}{self.frame_time(ts)}" for ts in stamps)
        return rows, (t, gh, gw), text

    def _batch(self, ids: list[list[int]], padding: bool) -> dict:
        """Left-padded input_ids, attention_mask and mm_token_type_ids (0 text, 1 image, 2 video
        frame)."""
        longest = max(map(len, ids))
        if not padding and any(len(x) != longest for x in ids):
            raise Glm4vError(
                "the prompts tokenize to different lengths; pass padding=True to batch them."
            )
        input_ids = np.full((len(ids), longest), self.tokenizer.pad_token_id, np.int32)
        mask = np.zeros_like(input_ids)
        for row, x in enumerate(ids):
            input_ids[row, longest - len(x) :] = x
            mask[row, longest - len(x) :] = 1
        # frames use the image token too; inside <|begin_of_video|>..<|end_of_video|> they count as
        # video
        starts, ends = (
            np.cumsum(input_ids == i, axis=1) for i in (self.video_start_id, self.video_end_id)
        )
        image = input_ids == self.image_token_id
        types = np.where(image, np.where(starts > ends, 2, 1), 0).astype(np.int32)
        return {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": types}
