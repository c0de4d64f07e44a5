"""The document pipeline against the GLM-OCR SDK (`glmocr`, self-hosted mode: its own
transformers PP-DocLayoutV3, our server's chat completions as its OCR backend) on a tiny
GLM-OCR checkpoint and a tiny random PP-DocLayoutV3 with the SDK's 25 labels."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from servers import ROOT, Server
from test_layout_model import tiny_config
from tiny import build_checkpoint
from transformers import PPDocLayoutV3ForObjectDetection, PPDocLayoutV3ImageProcessor

from mlx_glm4v import load, load_layout
from mlx_glm4v.documents.pipeline import OcrSettings, Reader

glmocr = pytest.importorskip("glmocr")

LABELS = (
    "abstract algorithm aside_text chart content display_formula doc_title figure_title footer "
    "footer_image footnote formula_number header header_image image inline_formula number "
    "paragraph_title reference reference_content seal table text vertical_text vision_footnote"
).split()
MAX_TOKENS = 6


def page(seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    im = Image.new("RGB", (400, 520), "white")
    d = ImageDraw.Draw(im)
    for i in range(6):
        d.text((30, 30 + 20 * i), f"Line {i} of page {seed}", fill="black")
    d.rectangle((30, 200, 370, 300), outline="black")
    d.text((60, 330), "E = mc^2   (1)", fill="black")
    d.ellipse((120, 380, 280, 500), fill=tuple(int(v) for v in rng.randint(0, 255, 3)))
    return im


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ocrpipe")
    build_checkpoint(root / "ocr", family="glm_ocr")
    config = tiny_config()
    config.id2label = dict(enumerate(LABELS))
    config.label2id = {n: i for i, n in enumerate(LABELS)}
    torch.manual_seed(0)
    model = PPDocLayoutV3ForObjectDetection(config).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, float(np.prod(p.shape[1:])) ** -0.5)
            else:
                p.add_(torch.randn_like(p) * 0.1)
        model.model.enc_score_head.bias.add_(1.5)  # several regions a page above 0.3
    model.save_pretrained(root / "layout")
    PPDocLayoutV3ImageProcessor(size={"height": 128, "width": 128}).save_pretrained(root / "layout")
    pages = []
    for i in range(3):
        pages.append(root / f"page{i}.png")
        page(i).save(pages[-1])
    return root, pages


@pytest.fixture(scope="module")
def ours(checkpoints):
    root, pages = checkpoints
    model, processor = load(str(root / "ocr"))
    settings = OcrSettings(max_tokens=MAX_TOKENS)
    with Reader(model, processor, load_layout(str(root / "layout")), settings) as reader:
        return reader.read(pages), reader.counts


def sdk_results(root: Path, pages: list, port: int) -> list:
    base = yaml.safe_load((Path(glmocr.__file__).parent / "config.yaml").read_text())
    pipeline = base["pipeline"]
    pipeline["maas"]["enabled"] = False
    pipeline["ocr_api"].update(api_host="127.0.0.1", api_port=port, model="ocr")
    pipeline["page_loader"]["max_tokens"] = MAX_TOKENS
    pipeline["layout"].update(model_dir=str(root / "layout"), device="cpu")
    config = root / "glmocr.yaml"
    config.write_text(yaml.safe_dump(base))
    from glmocr import GlmOcr

    with GlmOcr(config_path=str(config), mode="selfhosted") as parser:
        return [parser.parse(str(p)) for p in pages]


def test_markdown_and_json_equal_the_sdk_against_our_server(checkpoints, ours, tmp_path):
    root, pages = checkpoints
    documents, counts = ours
    assert counts[2] >= len(pages)  # regions were found and read
    server = Server(root / "ocr", [], tmp_path / "serve.log")
    try:
        theirs = sdk_results(root, pages, server.port)
    finally:
        server.close()
    for document, result in zip(documents, theirs):
        assert document.errors == []
        assert document.markdown == result.markdown_result
        assert document.pages == result.json_result
    assert any(block["content"] for d in documents for p in d.pages for block in p)


def test_cli_writes_the_same_files_and_reports_a_bad_document(checkpoints, ours, tmp_path):
    root, pages = checkpoints
    bad = tmp_path / "broken.pdf"
    bad.write_bytes(b"%PDF-1.7\n% cut short")
    run = subprocess.run(
        [sys.executable, "-m", "mlx_glm4v", "ocr", str(pages[0]), str(bad), str(pages[1])]
        + ["--model", str(root / "ocr"), "--layout-model", str(root / "layout")]
        + ["--max-tokens", str(MAX_TOKENS), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)},
        timeout=300,
    )
    assert run.returncode == 1, run.stderr
    assert "broken" in run.stderr and "Traceback" not in run.stderr
    documents, _ = ours
    for path, document in zip(pages[:2], documents):
        assert (tmp_path / "out" / f"{path.stem}.md").read_text() == document.markdown
        written = json.loads((tmp_path / "out" / f"{path.stem}.json").read_text())
        assert written == document.pages
    assert not (tmp_path / "out" / "broken.md").exists()
