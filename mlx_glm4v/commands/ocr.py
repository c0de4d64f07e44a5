"""`ocr`: documents to Markdown and JSON with GLM-OCR's layout pipeline."""

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import Glm4vError
from .shared import existing_files


def ocr(
    files: List[str] = typer.Argument(..., help="Images and PDFs to read."),
    out: Optional[Path] = typer.Option(
        None, "-o", "--output", help="Write NAME.md / NAME.json here (default: Markdown to stdout)."
    ),
    format: str = typer.Option("both", "--format", help="markdown, json or both (with -o)."),
    draft: bool = typer.Option(
        True,
        "--draft/--no-draft",
        help="Draft with the checkpoint's MTP layer when it has one (same text, fewer passes).",
    ),
    layout: bool = typer.Option(
        True, "--layout/--no-layout", help="Find regions first, or read each page whole."
    ),
    pages: Optional[str] = typer.Option(None, "--pages", help="PDF pages, e.g. 1-3,5."),
    model: str = typer.Option("zai-org/GLM-OCR", "--model", help="GLM-OCR: hub id or directory."),
    layout_model: str = typer.Option(
        "PaddlePaddle/PP-DocLayoutV3_safetensors", "--layout-model", help="The layout detector."
    ),
    pdf_dpi: float = typer.Option(200.0, "--pdf-dpi", help="PDF rendering resolution."),
    threshold: float = typer.Option(0.3, "--threshold", help="Layout score threshold."),
    max_tokens: int = typer.Option(8192, "--max-tokens", help="Longest answer per region."),
    temperature: float = typer.Option(0.0, "--temperature"),
    top_p: float = typer.Option(0.00001, "--top-p"),
    top_k: int = typer.Option(1, "--top-k"),
    repetition_penalty: float = typer.Option(1.1, "--repetition-penalty"),
    polygon: bool = typer.Option(False, "--polygon", help="Cut regions by their outline."),
    raw_crops: bool = typer.Option(
        False, "--raw-crops", help="Send crops as pixels, not JPEG-encoded as the SDK does."
    ),
    verbose: bool = typer.Option(False, "--verbose", help="Tracebacks for errors."),
):
    """Documents to Markdown and JSON: GLM-OCR's layout pipeline in one process."""
    from ..documents.pipeline import OcrSettings, Reader, save
    from ..documents.progress import ProgressBar

    if format not in ("markdown", "json", "both"):
        raise Glm4vError(f"--format {format!r} must be markdown, json or both.")
    settings = OcrSettings(
        draft=draft,
        layout=layout,
        threshold=threshold,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        polygon=polygon,
        image_format=None if raw_crops else "JPEG",
        pdf_dpi=pdf_dpi,
        pages=pages,
    )
    paths = existing_files(files, "document")
    from ..checkpoints.loader import load
    from ..documents.layout import load_layout

    loaded, processor = load(model)
    detector = load_layout(layout_model) if layout else None
    formats = ("markdown", "json") if format == "both" else (format,)
    failed = False
    with (
        ProgressBar() as bar,
        Reader(loaded, processor, detector, settings, progress=bar) as reader,
    ):
        for document in reader.stream(paths):
            for error in document.errors:
                bar.write(f"error: {error}")
                failed = True
            if not document.pages:  # nothing of it could be read: reported, nothing written
                continue
            if out is not None:
                save(document, out, formats)
            elif format == "json":
                typer.echo(json.dumps(document.pages, ensure_ascii=False))
            else:
                typer.echo(document.markdown)
    if failed:
        raise typer.Exit(1)
