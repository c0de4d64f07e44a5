"""POST /v1/layout_parsing and the pipeline's merging rules, against the GLM-OCR SDK (`glmocr`):
a tiny GLM-OCR checkpoint and a PP-DocLayoutV3 scripted to find eight regions of seven labels
on each page (a header, a title, text, a table, a formula and its number, a picture, text), one
real `mlx-glm4v serve --layout-model` process. The SDK self-hosted (its own transformers
detector, our server as its OCR backend) and our pipeline give the same Markdown and JSON; the
SDK in its hosted ("MaaS") mode pointed at our route gives what `mlx-glm4v ocr` writes; a page
that cannot be rendered mid-document is reported and the others still come out."""

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pypdfium2 as pdfium
import pytest
import yaml
from layouts import scripted_layout
from pdfs import encrypted_pdf
from PIL import Image, ImageDraw
from servers import ROOT, Server
from tiny import build_checkpoint

from mlx_glm4v import load, load_layout
from mlx_glm4v.documents.pipeline import OcrSettings, Reader
from mlx_glm4v.inputs.pdf import PdfOptions, render_pages

glmocr = pytest.importorskip("glmocr")

MAX_TOKENS = 6
KEY = "layout-key-5d2"
REGIONS = [  # reading order; fractions of the page
    ("header", (0.3, 0.005, 0.7, 0.03)),  # dropped
    ("paragraph_title", (0.08, 0.04, 0.6, 0.08)),
    ("text", (0.08, 0.10, 0.9, 0.30)),
    ("table", (0.08, 0.35, 0.9, 0.57)),
    ("display_formula", (0.15, 0.60, 0.7, 0.66)),
    ("formula_number", (0.75, 0.60, 0.9, 0.66)),  # merged into the formula as its \tag
    ("image", (0.25, 0.68, 0.75, 0.92)),  # kept as a picture
    ("text", (0.08, 0.94, 0.9, 0.98)),
]


def page() -> Image.Image:
    """A page with texture everywhere (the scripted detector tells places apart by it)."""
    rng = np.random.RandomState(7)
    im = Image.fromarray(rng.randint(170, 256, (1400, 1100, 3)).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for i in range(6):
        d.text((100, 150 + 30 * i), f"Line {i} of the page", fill="black")
    d.rectangle((100, 500, 980, 780), outline="black")
    d.text((200, 880), "E = mc^2", fill="black")
    d.ellipse((300, 960, 800, 1280), fill=(40, 90, 160))
    return im


def pdf(*pages) -> bytes:
    """A PDF of `pages` at 200 dpi, each a palette image (stored losslessly: the SDK's PyMuPDF
    and our pypdfium2 render the same pixels)."""
    drawn = [p.quantize(256) for p in pages]
    buf = io.BytesIO()
    drawn[0].save(buf, "PDF", save_all=True, append_images=drawn[1:], resolution=200)
    return buf.getvalue()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(root, the 3-page PDF, the PDF with an unrenderable page 2, the server)."""
    root = tmp_path_factory.mktemp("layoutparse")
    build_checkpoint(root / "ocr", family="glm_ocr")
    good = root / "doc.pdf"
    good.write_bytes(pdf(page(), page(), page()))
    holed = pdfium.PdfDocument(good.read_bytes())
    holed.new_page(7200, 7200, index=1)  # 100 inches a side: over the page-pixel cap at 200 dpi
    holed.del_page(3)
    bad = root / "holed.pdf"
    with bad.open("wb") as f:
        holed.save(f)
    rendered = render_pages(good.read_bytes(), PdfOptions(200, "1"))[0]
    scripted_layout(root / "layout", REGIONS, rendered)
    args = ["--layout-model", str(root / "layout"), "--max-pdf-pages", "3"]
    args += ["--max-output-tokens", str(MAX_TOKENS)]  # the route's regions: as the CLI's
    args += ["--max-body-mb", "16"]
    server = Server(root / "ocr", args + ["--api-key", KEY], root / "serve.log", key=KEY)
    yield root, good, bad, server
    server.close()


def sdk(root: Path, server: Server, mode: str):
    base = yaml.safe_load((Path(glmocr.__file__).parent / "config.yaml").read_text())
    pipeline = base["pipeline"]
    pipeline["maas"].update(
        enabled=mode == "maas",
        api_url=f"{server.url}/v1/layout_parsing",
        api_key=KEY,
        model=server.model,
        retry_max_attempts=0,
    )
    pipeline["ocr_api"].update(api_host="127.0.0.1", api_port=server.port, model="ocr")
    pipeline["ocr_api"]["api_key"] = KEY
    pipeline["page_loader"]["max_tokens"] = MAX_TOKENS
    pipeline["layout"].update(model_dir=str(root / "layout"), device="cpu")
    config = root / f"glmocr-{mode}.yaml"
    config.write_text(yaml.safe_dump(base))
    from glmocr import GlmOcr

    return GlmOcr(config_path=str(config), mode=mode)


def ocr_cli(root: Path, source: Path, out: Path):
    return subprocess.run(
        [sys.executable, "-m", "mlx_glm4v", "ocr", str(source), "-o", str(out)]
        + ["--model", str(root / "ocr"), "--layout-model", str(root / "layout")]
        + ["--max-tokens", str(MAX_TOKENS)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)},
        timeout=300,
    )


def post(server: Server, body: dict, key: str | None = KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}/v1/layout_parsing", json=body, headers=headers, timeout=120)


def data_uri(data: bytes, kind="application/pdf") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def test_the_sdk_self_hosted_equals_our_pipeline_on_several_regions(stack):
    root, good, _, server = stack
    model, processor = load(str(root / "ocr"))
    settings = OcrSettings(max_tokens=MAX_TOKENS)
    with Reader(model, processor, load_layout(str(root / "layout")), settings) as reader:
        ours = reader.read([good])[0]
    with sdk(root, server, "selfhosted") as parser:
        theirs = parser.parse(str(good))
    assert ours.errors == []
    assert ours.markdown == theirs.markdown_result
    assert ours.pages == theirs.json_result
    for blocks in ours.pages:  # every rule had something to do on every page
        labels = [b["native_label"] for b in blocks]
        assert "header" not in labels and "formula_number" not in labels
        assert {"paragraph_title", "text", "table", "display_formula", "image"} <= set(labels)
        assert "\\tag{" in next(b["content"] for b in blocks if b["label"] == "formula")
    assert ours.markdown.count("![Image ") == 3 and ours.markdown.startswith("## ")


def test_the_sdk_hosted_mode_against_our_route_equals_the_cli(stack, tmp_path):
    root, good, _, server = stack
    run = ocr_cli(root, good, tmp_path / "out")
    assert run.returncode == 0, run.stderr
    markdown = (tmp_path / "out" / "doc.md").read_text()
    blocks = json.loads((tmp_path / "out" / "doc.json").read_text())
    with sdk(root, server, "maas") as parser:
        theirs = parser.parse(str(good))
    assert getattr(theirs, "_error", None) is None
    assert theirs.markdown_result == markdown
    keys = ("index", "label", "content", "bbox_2d", "image_path")  # what the hosted shape carries
    assert theirs.json_result == [[{k: b[k] for k in keys if k in b} for b in p] for p in blocks]
    assert sorted(theirs.image_files) == sorted(p.name for p in (tmp_path / "out/imgs").iterdir())
    reply = theirs._maas_response
    assert [p["width"] for p in reply["data_info"]["pages"]] == [1100] * 3
    assert reply["usage"]["completion_tokens"] > 0


def picture(uri: str) -> Image.Image:
    head, _, data = uri.partition(",")
    assert head == "data:image/jpeg;base64"
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def test_crops_and_drawn_pages_come_back_when_asked_for(stack):
    root, good, _, server = stack
    with sdk(root, server, "maas") as parser:  # the SDK asks for the drawn pages by default
        theirs = parser.parse(str(good), return_crop_images=True)
    reply = theirs._maas_response
    pictures = [b for p in reply["layout_details"] for b in p if b["label"] == "image"]
    assert len(pictures) == 3 == len(theirs.image_files)
    for i, block in enumerate(pictures):  # our crop, and the SDK's own from its own rendering
        ours, cut = picture(block["content"]), theirs.image_files[f"cropped_page{i}_idx{i}.jpg"]
        assert ours.size == cut.size
        ours, cut = np.asarray(ours, float), np.asarray(cut.convert("RGB"), float)
        # the same pixels but for the JPEG's loss; a pixel aside, the page's noise differs
        assert np.abs(ours - cut).mean() < 8 < np.abs(ours[:, 1:] - cut[:, :-1]).mean()
    rendered = render_pages(good.read_bytes(), PdfOptions(200, "1"))[0]
    buffer = io.BytesIO()
    rendered.save(buffer, format="JPEG", quality=95)  # the page as it would come undrawn
    undrawn, rendered = np.asarray(Image.open(buffer), float), np.asarray(rendered, float)
    assert len(theirs._layout_visualization) == 3
    for page, uri in zip(reply["layout_details"], theirs._layout_visualization):
        drawn = np.asarray(picture(uri), float)
        assert drawn.shape == rendered.shape
        seen = 0
        for block in page:  # each region outlined; the JPEG blocks inside it as they were
            x0, y0, x1, y1 = (int(v) for v in block["bbox_2d"])
            middle = slice((3 * y0 + y1) // 4, (y0 + 3 * y1) // 4)
            edge = np.abs(drawn[middle, x0 - 1 : x0 + 3] - rendered[middle, x0 - 1 : x0 + 3])
            assert edge.mean() > 30
            rows = slice(-(-(y0 + 4) // 16) * 16, (y1 - 4) // 16 * 16)
            columns = slice(-(-(x0 + 4) // 16) * 16, (x1 - 4) // 16 * 16)
            if rows.stop > rows.start and columns.stop > columns.start:
                # (the decoder smooths colour across blocks: a level or two at their edges)
                assert np.abs(drawn[rows, columns] - undrawn[rows, columns]).mean() < 0.5
                seen += 1
        assert seen >= 3
    plain = post(server, {"model": server.model, "file": data_uri(good.read_bytes())}).json()
    assert plain["layout_visualization"] == []
    assert [b["content"] for p in plain["layout_details"] for b in p if b["label"] == "image"] == [
        None
    ] * 3


def test_a_page_that_does_not_render_is_reported_and_the_others_come_out(stack, tmp_path):
    root, good, bad, server = stack
    body = {"model": server.model, "file": data_uri(bad.read_bytes()), "request_id": "r-1"}
    holed = post(server, {**body, "need_layout_visualization": True}).json()
    whole = post(server, {**body, "file": data_uri(good.read_bytes())}).json()
    assert holed["request_id"] == "r-1"
    drawn = holed["layout_visualization"]  # a page that did not render has no picture
    assert len(drawn) == 3 and drawn[1] == "" and picture(drawn[0]).size == (1100, 1400)
    assert holed["layout_details"][1] == [] and len(holed["errors"]) == 1
    assert "page 2" in holed["errors"][0] and "pixels" in holed["errors"][0]
    assert holed["layout_details"][0] == whole["layout_details"][0]
    assert holed["layout_details"][2] == whole["layout_details"][2]
    run = ocr_cli(root, bad, tmp_path / "out")
    assert run.returncode == 1 and "page 2" in run.stderr and "Traceback" not in run.stderr
    written = json.loads((tmp_path / "out" / "holed.json").read_text())
    assert written[1] == [] and len(written) == 3 and written[0] and written[2]


def test_refusals_come_in_the_hosted_shape_and_the_server_keeps_serving(stack, tmp_path):
    root, good, _, server = stack
    model = server.model
    refusals = [
        ({"model": model, "file": "data:application/pdf;base64,@@@"}, KEY, 400, "base64"),
        ({"model": model, "file": data_uri(encrypted_pdf())}, KEY, 400, "password"),
        ({"model": model, "file": data_uri(b"GIF89a", "image/gif")}, KEY, 400, "not a PDF"),
        ({"model": model, "file": data_uri(b"%PDF-1.7\n% cut")}, KEY, 400, "file"),
        ({"model": model}, KEY, 400, "file is required"),
        ({"model": model, "file": data_uri(good.read_bytes()), "start_page_id": 0}, KEY, 400, "1"),
        ({"model": model, "file": data_uri(good.read_bytes())}, None, 401, "API key"),
    ]
    oversized = {"model": model, "file": "data:application/pdf;base64," + "A" * (17 << 20)}
    refusals.append((oversized, KEY, 413, "--max-body-mb"))
    four = pdf(*[page()] * 4)
    refusals.append(({"model": model, "file": data_uri(four)}, KEY, 400, "limit of 3"))
    for body, key, status, words in refusals:
        reply = post(server, body, key)
        assert reply.status_code == status, (body.keys(), reply.text)
        error = reply.json()["error"]
        assert words in error["message"] and "Traceback" not in error["message"]
        assert "/" + "tmp" not in error["message"]
    one = post(server, {"model": model, "file": data_uri(four), "end_page_id": 1})
    assert one.status_code == 200 and len(one.json()["layout_details"]) == 1
    plain = Server(root / "ocr", [], tmp_path / "plain.log")
    try:
        reply = post(plain, {"model": plain.model, "file": data_uri(good.read_bytes())}, None)
    finally:
        plain.close()
    assert reply.status_code == 404 and "--layout-model" in reply.json()["error"]["message"]


def test_a_document_past_the_request_timeout_is_cut_and_its_rows_end(stack, tmp_path):
    root, good, _, _ = stack
    args = ["--layout-model", str(root / "layout"), "--request-timeout", "2"]
    server = Server(root / "ocr", args, tmp_path / "timeout.log")  # replies up to 8192 tokens
    try:
        reply = post(server, {"model": server.model, "file": data_uri(good.read_bytes())}, None)
        assert reply.status_code == 504 and "--request-timeout" in reply.json()["error"]["message"]
        hello = [{"role": "user", "content": "hello"}]
        chat = server.post({"model": server.model, "max_tokens": 2, "messages": hello})
        assert chat.status_code == 200  # the cut document's rows ended: the engine is free
        metrics = server.metrics()
    finally:
        server.close()
    assert metrics["requests_cancelled_total"] >= 1
