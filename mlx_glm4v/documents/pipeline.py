"""Documents -> Markdown and JSON in one process: pages rendered, regions found by the layout
detector, each region one engine request (all pages' regions in flight together, pages laid
out while earlier ones are still being read), answers formatted as the GLM-OCR SDK does."""

import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pypdfium2 as pdfium
from PIL import Image

from ..checkpoints.layout import LAYOUT_MODEL
from ..checkpoints.loader import load
from ..errors import Glm4vError
from ..generation.messages import user_message
from ..generation.reply import parse_reply
from ..generation.settings import GenerationSettings
from ..inputs.pdf import PdfOptions, is_pdf, is_pdf_file, parse_pages, render_pages
from ..serving.engine import Engine, QueueFull, Request
from . import markdown
from .crops import crop, prepare
from .layout import load_layout
from .tasks import PROMPTS, page_regions


@dataclass
class OcrSettings:
    """The pipeline's settings, the SDK's defaults (`config.yaml`)."""

    layout: bool = True
    threshold: float = 0.3
    thresholds: dict = field(default_factory=dict)  # label name (or id) -> threshold
    max_tokens: int = 8192
    temperature: float = 0.0
    top_p: float = 0.00001
    top_k: int = 1
    repetition_penalty: float = 1.1
    polygon: bool = False  # cut regions by their outline (the SDK's use_polygon), not their box
    image_format: str | None = "JPEG"  # None: the resized crop as is, not encoded and decoded
    pdf_dpi: float = 200.0
    pages: str | None = None
    max_pages: int = 10_000
    whole_page_prompt: str = PROMPTS["text"]
    draft: bool = True  # MTP drafts in the rows when the checkpoint has the layer

    def generation(self, model=None) -> GenerationSettings:
        """The rows' settings; with `model` holding an MTP layer (and `draft`), they draft with
        it (the reply is the same, in fewer passes)."""
        return GenerationSettings(
            max_tokens=self.max_tokens,
            temp=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            draft="mtp" if self.draft and model is not None and "mtp" in model else None,
        )


@dataclass
class Page:
    number: int  # 1-based, within its document
    image: Image.Image | None = None
    regions: list = field(default_factory=list)  # dicts as the SDK's JSON has them
    handles: list = field(default_factory=list)  # (region dict, engine handle)
    error: str | None = None
    size: tuple = (0, 0)  # (width, height) in pixels; (0, 0) for a page that did not render
    usage: list = field(default_factory=lambda: [0, 0])  # prompt and completion tokens


@dataclass
class Document:
    name: str
    pages: list  # [[block, ...] per page]: the JSON
    markdown: str
    pictures: dict  # file name -> PIL image, for the Markdown's imgs/ links
    errors: list  # one sentence per page or region that failed
    sizes: list = field(default_factory=list)  # (width, height) of each page, in pixels
    usage: list = field(default_factory=lambda: [0, 0])  # prompt and completion tokens, all rows
    layouts: list = field(default_factory=list)  # [[region, ...] per page]: what layout found

    def json(self) -> list:
        return self.pages


def load_pages(source, settings: OcrSettings, name: str):
    """(page number, a PIL image or the Glm4vError that page raised) for each page of a PDF or
    image file (or bytes), rendered one at a time."""
    if isinstance(source, Image.Image):
        yield 1, source.convert("RGB")
        return
    data = bytes(source) if isinstance(source, (bytes, bytearray)) else None
    if is_pdf(data) if data is not None else is_pdf_file(source):
        pdf = data if data is not None else str(source)
        for number in page_numbers(pdf, settings, name):
            one = PdfOptions(settings.pdf_dpi, str(number))
            try:
                yield number, render_pages(pdf, one, name)[0]
            except Glm4vError as e:
                yield number, e
        return
    try:
        with Image.open(BytesIO(data) if data is not None else source) as im:
            yield 1, im.convert("RGB")
    except (OSError, ValueError):
        yield 1, Glm4vError(f"{name} is not a readable image or PDF.")


def page_numbers(pdf, settings: OcrSettings, name: str) -> list:
    """The 1-based numbers of the pages chosen; a PDF that does not open is refused as
    `render_pages` words it."""
    try:
        doc = pdfium.PdfDocument(pdf)
    except pdfium.PdfiumError:
        render_pages(pdf, PdfOptions(settings.pdf_dpi, "1"), name)
        raise Glm4vError(f"{name} could not be opened as a PDF.") from None
    try:
        count = len(doc)
    finally:
        doc.close()
    chosen = parse_pages(settings.pages, count) if settings.pages else range(count)
    if len(chosen) > settings.max_pages:
        raise Glm4vError(
            f"{name}: {len(chosen)} pages chosen, over the limit of {settings.max_pages}."
        )
    return [n + 1 for n in chosen]


class Reader:
    """Reads documents with one GLM-OCR model and (unless `settings.layout` is off) a layout
    detector; `engine` an `Engine` to share (the server's), else one of its own.
    `progress(pages_done, regions_done, regions_seen)` is called as work finishes."""

    def __init__(self, model, processor, layout=None, settings=None, engine=None, progress=None):
        self.settings = settings or OcrSettings()
        if self.settings.layout and layout is None:
            raise Glm4vError("reading with layout needs a layout model (or layout off).")
        self.processor, self.layout = processor, layout
        self.own_engine = engine is None
        self.engine = engine or Engine(model, processor, max_queue=1 << 20)
        self.progress = progress or (lambda *counts: None)
        self.counts = [0, 0, 0]  # pages done, regions done, regions seen
        self.lookahead = 4  # pages laid out and in flight ahead of the one being collected
        self.cancelled = threading.Event()
        self.live: set = set()  # engine handles submitted and not yet collected

    def cancel(self):
        """Stop reading from any thread: no more pages start, the regions in flight end now (a
        client gone, a deadline passed)."""
        self.cancelled.set()
        for handle in list(self.live):
            handle.cancel()

    def close(self):
        if self.own_engine:
            self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read(self, sources, names=None) -> list:
        """A `Document` per source (a path, bytes or a PIL image), in order."""
        return list(self.stream(sources, names))

    def stream(self, sources, names=None):
        """`Document`s as they finish; every page's regions go to the engine as soon as its
        layout is known, a few pages ahead of the one being collected."""
        sources = list(sources)
        names = list(names) if names is not None else [_name(s, i) for i, s in enumerate(sources)]
        pages: queue.Queue = queue.Queue()
        room = threading.Semaphore(self.lookahead)
        stop = threading.Event()
        worker = threading.Thread(
            target=self._lay_out, args=(sources, names, pages, room, stop), daemon=True
        )
        worker.start()
        try:
            current, collected, errors = None, [], []
            while True:
                item = pages.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None or item[0] != current:
                    if current is not None:
                        yield self._document(names[current], collected, errors)
                    if item is None:
                        return
                    current, collected, errors = item[0], [], []
                _, page, error = item
                if error is not None:  # the whole document failed before its pages
                    errors.append(error)
                    continue
                self._collect(page)
                room.release()
                collected.append(page)
                if page.error:
                    errors.append(f"{names[current]}: page {page.number}: {page.error}")
                self.counts[0] += 1
                self.progress(*self.counts)
        finally:
            stop.set()
            for _ in range(self.lookahead):
                room.release()

    def _lay_out(self, sources, names, pages, room, stop):
        try:
            for i, (source, name) in enumerate(zip(sources, names)):
                if self.cancelled.is_set():
                    break
                try:
                    for number, image in load_pages(source, self.settings, name):
                        room.acquire()
                        if stop.is_set():
                            return
                        if self.cancelled.is_set():
                            break
                        pages.put((i, self._start(number, image), None))
                except Glm4vError as e:
                    pages.put((i, None, str(e)))
            pages.put(None)
        except BaseException as e:  # a bug: the collecting thread raises it
            pages.put(e)

    def _start(self, number: int, image) -> Page:
        """A page laid out and its regions submitted (or the reason it could not be)."""
        page = Page(number)
        if isinstance(image, Glm4vError):
            page.error = str(image)
            return page
        page.image, page.size = image, image.size
        try:
            if self.settings.layout:
                page.regions = self._regions(image)
            else:
                page.regions = [{"index": 0, "label": "text", "task_type": "text", "bbox_2d": None}]
        except Glm4vError as e:
            page.error = str(e)
            return page
        for region in page.regions:
            if region["task_type"] == "skip":
                region["content"] = None
                continue
            try:
                picture = image
                if region["bbox_2d"] is not None:
                    polygon = region.get("polygon") if self.settings.polygon else None
                    picture = crop(image, region["bbox_2d"], polygon)
                picture = prepare(picture, self.settings.image_format)
                page.handles.append((region, self._submit(picture, PROMPTS[region["task_type"]])))
            except (Glm4vError, ValueError, ZeroDivisionError, OSError) as e:
                region["content"] = None
                region["error"] = str(e)
            self.counts[2] += 1
        return page

    def _regions(self, image) -> list:
        s = self.settings
        lowest = min([s.threshold, *s.thresholds.values()])
        result = self.layout.detect(image, lowest, run=self._on_engine)
        found = page_regions(result, self.layout.id2label, image.size, s.threshold, s.thresholds)
        return [
            {
                "index": r.index,
                "label": r.label,
                "score": r.score,
                "bbox_2d": r.bbox,
                "polygon": r.polygon,
                "task_type": r.task,
            }
            for r in found
        ]

    def _on_engine(self, fn, *args):
        """fn's result, run on the engine's thread: MLX is used from that one thread only."""
        return self.engine.call(fn, *args).result()

    def _submit(self, picture, prompt: str):
        """The region as the server would run the SDK's chat completion."""
        messages = [user_message(prompt, [picture])]
        inputs = self.processor.process_messages(messages, {}, {})
        # (several ranks run no drafts: engine.row_drafts)
        drafter = self.engine.model if self.engine.link is None else None
        request = Request(inputs, self.settings.generation(drafter))
        while True:
            try:
                handle = self.engine.submit(request)
                self.live.add(handle)
                return handle
            except QueueFull:  # a shared engine's queue: wait for room
                time.sleep(0.05)

    def _collect(self, page: Page):
        for region, handle in page.handles:
            if self.cancelled.is_set():
                handle.cancel()
            events = list(handle)
            self.live.discard(handle)
            last = events[-1]
            if last.usage is not None:
                page.usage[0] += last.usage.prompt_tokens
                page.usage[1] += last.usage.completion_tokens
            if last.finish_reason == "error":
                region["content"] = None
                region["error"] = last.error
            else:
                content = parse_reply("".join(e.text for e in events)).content
                region["content"] = content.strip() if content else ""
            self.counts[1] += 1
            self.progress(*self.counts)
        page.handles = []

    def _document(self, name: str, pages: list, errors: list) -> Document:
        blocks, parts, pictures = [], [], {}
        listed: list = []
        for index, page in enumerate(pages):
            for region in page.regions:
                if region.get("error"):
                    errors.append(f"{name}: page {page.number}: a region failed: {region['error']}")
                region.pop("error", None)
            if not self.settings.layout and not page.error:
                content = page.regions[0]["content"]
                page_blocks = markdown.whole_page(content)
                parts.append(page_blocks[0]["content"])
            else:
                page_blocks = markdown.page_blocks(page.regions)
                start = len(listed)
                parts.append(markdown.page_markdown(page_blocks, index, listed))
                for file, _, bbox in listed[start:]:
                    pictures[file] = crop(page.image, bbox)
            blocks.append(page_blocks)
            page.image = None
        joiner = "\n\n" if self.settings.layout else "\n\n---\n\n"
        sizes = [page.size for page in pages]
        usage = [sum(page.usage[i] for page in pages) for i in (0, 1)]
        found = ("index", "label", "score", "bbox_2d")
        layouts = [[{k: r.get(k) for k in found} for r in page.regions] for page in pages]
        return Document(name, blocks, joiner.join(parts), pictures, errors, sizes, usage, layouts)


def _name(source, i: int) -> str:
    if isinstance(source, (str, Path)):
        return Path(str(source)).stem or f"document{i + 1}"
    return f"document{i + 1}"


OCR_MODEL = "zai-org/GLM-OCR"


def ocr(
    sources,
    model: str = OCR_MODEL,
    layout_model: str = LAYOUT_MODEL,
    settings: OcrSettings | None = None,
    progress=None,
    **options,
) -> list:
    """Read documents (paths, bytes or PIL images) into `Document`s (Markdown, JSON) with
    GLM-OCR and the layout detector; `options` are `OcrSettings` fields."""
    settings = settings or OcrSettings(**options)
    loaded, processor = load(model)
    layout = load_layout(layout_model) if settings.layout else None
    sources = [sources] if isinstance(sources, (str, Path, bytes, Image.Image)) else sources
    with Reader(loaded, processor, layout, settings, progress=progress) as reader:
        return reader.read(sources)


def _write(path: Path, data: bytes):
    """Written whole or not at all."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def save(document: Document, out: Path, formats=("markdown", "json")) -> list:
    """NAME.md / NAME.json (and imgs/ for pictures) under `out`, each file written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if "markdown" in formats:
        written.append(out / f"{document.name}.md")
        _write(written[-1], document.markdown.encode())
    if "json" in formats:
        written.append(out / f"{document.name}.json")
        _write(written[-1], json.dumps(document.pages, ensure_ascii=False, indent=2).encode())
    if document.pictures and "markdown" in formats:
        (out / "imgs").mkdir(exist_ok=True)
        for name, picture in document.pictures.items():
            _write(out / "imgs" / name, jpeg(picture))
    return written


def jpeg(picture) -> bytes:
    """A picture as the imgs/ files hold it (and the server's `return_crop_images` sends it)."""
    buffer = BytesIO()
    picture.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()
