"""PDF pages as images: each selected page rendered with pypdfium2 at a DPI, then an image like
any other (the processor's resize, pixel caps and token counts apply to it).

Everything that can be refused is refused before a pixel is drawn: not a PDF (the `%PDF-`
magic, not the file name), password-protected, damaged or truncated, more pages selected than
the limit, a page whose size in points times dpi/72 is over the pixel limit.
"""

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import Glm4vError

MAGIC = b"%PDF-"
DEFAULT_DPI = 200.0  # what GLM-OCR's pipeline renders at
DEFAULT_MAX_PAGES = 32
DEFAULT_MAX_PAGE_PIXELS = 50_000_000
# PDFium's load errors (fpdfview.h): FPDF_ERR_PASSWORD, FPDF_ERR_SECURITY
_LOCKED = (4, 5)


@dataclass
class PdfOptions:
    """How a PDF becomes pages: `pages` a selection like "1-3,5" (1-based; "4-" runs to the
    end; None: all), at most `max_pages` of them, each at most `max_page_pixels` at `dpi`."""

    dpi: float = DEFAULT_DPI
    pages: str | None = None
    max_pages: int = DEFAULT_MAX_PAGES
    max_page_pixels: int = DEFAULT_MAX_PAGE_PIXELS

    def __post_init__(self):
        if not (isinstance(self.dpi, (int, float)) and 0 < self.dpi <= 2400):
            raise Glm4vError(f"pdf dpi {self.dpi!r} must be a number in (0, 2400].")
        if not (isinstance(self.max_pages, int) and self.max_pages >= 1):
            raise Glm4vError(f"max pdf pages {self.max_pages!r} must be a positive integer.")
        if self.pages is not None:
            parse_pages(self.pages, None)  # the syntax now; the page numbers against each PDF


def is_pdf(data: bytes) -> bool:
    return bytes(data[: len(MAGIC)]) == MAGIC


def is_pdf_file(source) -> bool:
    """Whether `source` names a local file that starts like a PDF (whatever its name)."""
    if not isinstance(source, (str, Path)) or str(source).startswith(("http://", "https://")):
        return False
    path = Path(str(source).removeprefix("file://")).expanduser()
    try:
        with path.open("rb") as f:
            return is_pdf(f.read(len(MAGIC)))
    except OSError:
        return False


_RANGE = re.compile(r"^\s*(\d+)\s*(?:(-)\s*(\d*)\s*)?$")


def parse_pages(spec: str, count: int | None) -> list[int]:
    """Page numbers (0-based, in the order given, each once) of a selection like "1-3,5"."""
    if not isinstance(spec, str) or not spec.strip():
        raise Glm4vError(f"pages {spec!r} must be a selection like 1-3,5.")
    out = []
    for piece in spec.split(","):
        found = _RANGE.match(piece)
        if not found:
            raise Glm4vError(f"pages {spec!r}: {piece.strip()!r} is not a page or a range (1-3).")
        first = int(found.group(1))
        last = first if not found.group(2) else int(found.group(3) or count or first)
        if first < 1 or last < first:
            raise Glm4vError(f"pages {spec!r}: {piece.strip()!r} is not an ascending range from 1.")
        if count is not None and last > count:
            raise Glm4vError(f"pages {spec!r}: the PDF has {count} page(s).")
        out += [p - 1 for p in range(first, last + 1) if p - 1 not in out]
    return out


def _open(source, name: str):
    import pypdfium2 as pdfium

    try:
        return pdfium.PdfDocument(source)
    except pdfium.PdfiumError as e:
        if getattr(e, "err_code", None) in _LOCKED:
            raise Glm4vError(
                f"{name} is password-protected (encrypted); send it unlocked."
            ) from None
        raise Glm4vError(f"{name} is not a readable PDF (damaged or truncated).") from None


def render_pages(source, options: PdfOptions, name: str = "the PDF") -> list:
    """RGB PIL images of the selected pages; `source` is the PDF's bytes or a path."""
    return _pages(source, options, name, render=True)


def check_pdf(source, options: PdfOptions, name: str = "the PDF"):
    """Everything `render_pages` refuses, refused now, without drawing a page (the CLI checks
    its files before loading a model)."""
    _pages(source, options, name, render=False)


def _pages(source, options: PdfOptions, name: str, render: bool) -> list:
    import pypdfium2 as pdfium

    if isinstance(source, (str, Path)):
        source = Path(str(source).removeprefix("file://")).expanduser()
        try:
            with source.open("rb") as f:
                head = f.read(len(MAGIC))
        except OSError:
            raise Glm4vError(f"{name}: no such PDF file.") from None
    else:
        source = bytes(source)
        head = source
    if not is_pdf(head):
        raise Glm4vError(f"{name} is not a PDF (it does not start with %PDF-).")
    doc = _open(source, name)
    try:
        count = len(doc)
        if count == 0:
            raise Glm4vError(f"{name} has no pages (damaged or truncated?).")
        try:
            chosen = parse_pages(options.pages, count) if options.pages else list(range(count))
        except Glm4vError as e:
            raise Glm4vError(f"{name}: {e}") from None
        if len(chosen) > options.max_pages:
            raise Glm4vError(
                f"{name}: {len(chosen)} pages selected, over the limit of {options.max_pages} "
                "(--max-pdf-pages); choose fewer with pages (e.g. 1-3)."
            )
        scale = options.dpi / 72
        pages = []
        for index in chosen:
            page = doc[index]
            try:
                # pypdfium2's own arithmetic: ceil(points * scale), the scale a float
                w, h = (math.ceil(x * scale) for x in page.get_size())
                if w * h > options.max_page_pixels:
                    raise Glm4vError(
                        f"{name}: page {index + 1} would be {w}x{h} = {w * h} pixels at "
                        f"{options.dpi:g} dpi, over the limit of {options.max_page_pixels}; "
                        "lower the dpi."
                    )
                if render:
                    image = page.render(scale=scale).to_pil().convert("RGB")
                    image.info["original_size"] = image.size
                    image.info["page"] = index + 1
                    pages.append(image)
            except pdfium.PdfiumError:
                raise Glm4vError(f"{name}: page {index + 1} could not be rendered.") from None
            finally:
                page.close()
        return pages
    finally:
        doc.close()
