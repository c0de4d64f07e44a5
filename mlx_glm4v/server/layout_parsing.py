"""POST /v1/layout_parsing: the GLM-OCR pipeline in the shape of the hosted ("MaaS") API that the
`glmocr` SDK sends and reads, so the SDK pointed at this server needs neither torch nor a second
server. A document (PDF, PNG or JPEG) comes as a data URI; Markdown and the regions come back
with boxes in page pixels (the SDK turns them into thousandths of the page), pictures as
`![](page=N,bbox=[...])` links the SDK crops from its own copy of the document. Asked for,
`return_crop_images` puts each picture's crop (as the pipeline cut it) in its region's content
and `need_layout_visualization` fills `layout_visualization` with each page, its regions drawn;
both as JPEG data URIs, where the hosted API gives URLs."""

import base64
import re
import time
import uuid
from dataclasses import dataclass

from ..documents.pipeline import OcrSettings, Reader, jpeg, load_pages, page_numbers
from ..documents.visualize import draw_layout
from ..errors import Glm4vError
from ..inputs.pdf import is_pdf
from .media import MediaPolicy, decode_image, read_source
from .neutral import ApiError, Served, bad, check_model

TYPES = ("application/pdf", "image/png", "image/jpeg", "image/jpg")
_PICTURE = re.compile(r"!\[Image \d+-\d+\]\((imgs/[^)]+)\)")


def error_body(e: ApiError) -> dict:
    """The hosted API's error shape: {"error": {"code", "message"}}."""
    return {"error": {"code": e.code or str(e.status), "message": e.message}}


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise bad(f"{key} must be true or false, not {value!r}.", key)
    return value


def _page_id(body: dict, key: str):
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise bad(f"{key} must be a page number from 1, not {value!r}.", key)
    return value


@dataclass
class Job:
    """A checked request."""

    data: bytes  # the document
    settings: OcrSettings
    request_id: str | None
    crops: bool = False  # return_crop_images
    visualize: bool = False  # need_layout_visualization


def parse(body, served: Served, policy: MediaPolicy, processor, max_tokens=None) -> Job:
    """The checked request; `max_tokens` the operator's cap on each region's reply
    (--max-output-tokens)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object.")
    check_model(body.get("model"), served)
    source = body.get("file")
    if not isinstance(source, str) or not source:
        raise bad("file is required: the document as a data URI (PDF, PNG or JPEG).", "file")
    if source.startswith("data:"):
        kind = source[5:].split(";", 1)[0].lower()
        if kind not in TYPES:
            raise bad(f"file: the data URI's type {kind!r} is not a PDF, PNG or JPEG.", "file")
    crops, visualize = _flag(body, "return_crop_images"), _flag(body, "need_layout_visualization")
    first, last = _page_id(body, "start_page_id"), _page_id(body, "end_page_id")
    if first and last and last < first:
        raise bad(f"end_page_id {last} is before start_page_id {first}.", "end_page_id")
    for key in ("request_id", "user_id"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise bad(f"{key} must be a string.", key)
    data, path = read_source(source, policy, "file")
    data = data if data is not None else path.read_bytes()
    if len(data) > policy.max_media_bytes:
        raise bad(
            f"file: {len(data)} bytes, over the limit of {policy.max_media_bytes} "
            "(--max-media-mb).",
            "file",
        )
    pages = f"{first or 1}-{last or ''}" if first or last else None
    settings = OcrSettings(pdf_dpi=policy.pdf_dpi, pages=pages, max_pages=policy.max_pdf_pages)
    settings.max_tokens = min(settings.max_tokens, max_tokens or settings.max_tokens)
    try:
        if is_pdf(data):
            page_numbers(data, settings, "file")  # refused now: encrypted, corrupt, too many pages
        else:
            decode_image(data, policy, processor, None, "file")
    except Glm4vError as e:
        raise bad(str(e), "file") from None
    return Job(data, settings, body.get("request_id"), crops, visualize)


def data_uri(image) -> str:
    """A picture as a JPEG data URI, encoded as `mlx-glm4v ocr` writes its imgs/ files."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg(image.convert("RGB"))).decode()


def read(job: Job, engine, processor, layout, cancel=None):
    """(the document read through the server's engine, its pages drawn with their regions as
    data URIs when asked for, else []); `cancel` receives the reader, to stop it from another
    thread."""
    with Reader(None, processor, layout, job.settings, engine=engine) as reader:
        if cancel is not None:
            cancel(reader)
        document = reader.read([job.data], ["file"])[0]
    drawn = []
    if job.visualize:  # the pages rendered again, as the pipeline rendered them
        pages = load_pages(job.data, job.settings, "file")
        for (_, image), regions in zip(pages, document.layouts):
            drawn.append(
                "" if isinstance(image, Exception) else data_uri(draw_layout(image, regions))
            )
    return document, drawn


def _pixels(value: int, size: int):
    """A thousandth of the page as a pixel the SDK turns back into the same thousandth
    (`round(p * 1000 / size)`): a whole pixel where one does, else a fraction."""
    whole = round(value * size / 1000)
    return whole if round(whole * 1000 / size) == value else value * size / 1000


def _box(bbox, size: tuple):
    if not bbox:
        return bbox
    width, height = size
    if not width or not height:
        return bbox
    return [_pixels(v, width if i % 2 == 0 else height) for i, v in enumerate(bbox)]


def response(document, model: str, job: Job, drawn=()) -> dict:
    """The hosted API's answer for a read document (`drawn`: its pages' visualisations)."""
    details, links = [], {}
    for number, (blocks, size) in enumerate(zip(document.pages, document.sizes)):
        page = []
        for block in blocks:
            box = _box(block.get("bbox_2d"), size)
            content = block.get("content")
            if block.get("image_path"):
                links[block["image_path"]] = f"![](page={number},bbox={box})"
                if job.crops:
                    content = data_uri(document.pictures[block["image_path"][len("imgs/") :]])
            page.append(
                {
                    "index": block["index"],
                    "label": block["label"],
                    "native_label": block.get("native_label", block["label"]),
                    "content": content,
                    "bbox_2d": box,
                }
            )
        details.append(page)
    markdown = _PICTURE.sub(lambda m: links.get(m.group(1), m.group(0)), document.markdown)
    reply_id = f"layout-{uuid.uuid4().hex}"
    prompt, completion = document.usage
    out = {
        "id": reply_id,
        "created": int(time.time()),
        "model": model,
        "md_results": markdown,
        "layout_details": details,
        "layout_visualization": list(drawn),
        "data_info": {
            "num_pages": len(document.sizes),
            "pages": [{"width": w, "height": h} for w, h in document.sizes],
        },
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
        "request_id": job.request_id or reply_id,
    }
    if document.errors:
        out["errors"] = document.errors
    return out


def unavailable() -> ApiError:
    return ApiError(
        404,
        "layout parsing is off on this server: start it with --layout-model DIR|ID (a "
        "PP-DocLayoutV3 checkpoint).",
        code="layout_parsing_off",
    )
