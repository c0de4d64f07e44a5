"""The pipeline's Markdown and JSON formatting against the GLM-OCR SDK's own formatter (`glmocr`
0.1.5 `ResultFormatter`, configured from its published config.yaml), on pages whose regions
read differently: words broken by a hyphen across text blocks, bullet and numbered items, list
items between bullets, titles, formulas with their numbers and pictures, and many random pages
made of such regions. The end-to-end tests read every region with one tiny checkpoint, whose
replies are all alike; here each region's reply is chosen."""

import json
import random
from pathlib import Path

import pytest
import yaml

from mlx_glm4v.documents import markdown

glmocr = pytest.importorskip("glmocr")


@pytest.fixture(scope="module")
def formatter():
    from glmocr.config import ResultFormatterConfig
    from glmocr.postprocess.result_formatter import ResultFormatter

    base = yaml.safe_load((Path(glmocr.__file__).parent / "config.yaml").read_text())
    return ResultFormatter(ResultFormatterConfig(**base["pipeline"]["result_formatter"]))


TASKS = {"table": "table", "display_formula": "formula", "inline_formula": "formula"}


def region(index: int, label: str, content, left: int = 100, top: int = 0) -> dict:
    """A region as the pipeline hands it on: its reply, a box in thousandths of the page."""
    box = [left, top, left + 400, top + 30]
    polygon = [[box[0], box[1]], [box[2], box[1]], [box[2], box[3]], [box[0], box[3]]]
    task = "skip" if label in ("image", "chart") else TASKS.get(label, "text")
    return {
        "index": index,
        "label": label,
        "score": 0.9,
        "bbox_2d": box,
        "polygon": polygon,
        "task_type": task,
        "content": None if task == "skip" else content,
    }


def page(*specs) -> list:
    return [region(i, *spec[:1], *spec[1:]) for i, spec in enumerate(specs)]


def ours(pages: list) -> tuple:
    blocks, parts, pictures = [], [], []
    for number, regions in enumerate(pages):
        blocks.append(markdown.page_blocks(json.loads(json.dumps(regions))))
        parts.append(markdown.page_markdown(blocks[-1], number, pictures))
    return blocks, "\n\n".join(parts)


def theirs(formatter, pages: list) -> tuple:
    crops = {
        (number, *r["bbox_2d"]): object()  # a picture the SDK cut: any object stands for it
        for number, regions in enumerate(pages)
        for r in regions
        if r["task_type"] == "skip"
    }
    text, md, _ = formatter.process(json.loads(json.dumps(pages)), crops)
    return json.loads(text), md


def same(formatter, pages: list):
    mine, reference = ours(pages), theirs(formatter, pages)
    assert mine[1] == reference[1]
    assert mine[0] == reference[0]
    return mine


def test_words_broken_across_text_blocks_are_joined_as_the_sdk_joins_them(formatter):
    pages = [
        page(
            ("text", "The experi-"),
            ("text", "Of note, in upper case."),  # passed over: the search goes on
            ("text", "ment was run twice."),
            ("text", "a docu-  "),
            ("table", "<table><tr><td>1</td></tr></table>"),
            ("text", "ment across a table."),
            ("text", "page 3-"),
            ("text", "4 of the report"),  # a digit: passed over too
            ("display_formula", "x^2"),
            ("text", "one more line"),  # "3one" is no word: left apart
            ("text", "the end-"),
            ("paragraph_title", "a title in lower case"),  # a title starts with "#"
        ),
        page(
            ("text", "only-"),
        ),  # nothing after it
    ]
    blocks, md = same(formatter, pages)
    contents = [b["content"] for b in blocks[0]]
    assert contents[:2] == ["The experiment was run twice.", "Of note, in upper case."]
    assert "a document across a table." in contents and "ment across a table." not in contents
    assert {"page 3-", "4 of the report", "one more line", "the end-"} <= set(contents)
    assert md.endswith("only-")


def test_bullets_and_numbered_items_are_formatted_as_the_sdk_formats_them(formatter):
    pages = [
        page(
            ("text", "• first item"),
            ("text", "second item, no bullet read"),  # between two bullets, aligned: one
            ("text", "· third item"),
            ("text", "* fourth item"),
            ("text", "fifth, out of line", 140),  # 40 thousandths to the right: left alone
            ("text", "- sixth item"),
            ("paragraph_title", "- a title read as a bullet"),
            ("text", "- seventh item"),
        ),
        page(
            ("text", "1.one"),
            ("text", "2) two"),
            ("text", "(3)three"),
            ("text", "a)alpha"),
            ("text", "（b）beta"),
            ("text", "12）twelve"),
            ("text", "line one\nline two\n\nline four"),
            ("doc_title", "## A document title"),
            ("text", "```code"),
            ("text", "x $ a+b $y and $$z$$ . . . and ......"),
        ),
        page(
            ("text", "- item one", 100),
            ("text", "item two", 108),  # within 10 thousandths of both
            ("text", "- item three", 99),
            ("text", "item four", 120),
            ("text", "• item five", 110),
        ),
    ]
    blocks, md = same(formatter, pages)
    assert [b["content"] for b in blocks[0][:4]] == [
        "- first item",
        "- second item, no bullet read",
        "- third item",
        "- fourth item",
    ]
    assert blocks[0][4]["content"] == "fifth, out of line"
    assert [b["content"] for b in blocks[1][:3]] == ["1. one", "2) two", "(3) three"]
    assert blocks[2][1]["content"] == "- item two" and blocks[2][3]["content"] == "item four"
    assert "line one\n\nline two\n\nline four" in md


FRAGMENTS = [
    "The experi-",
    "ment ends here.",
    "state-",
    "of-the-art",
    "Upper case",
    "• a bullet",
    "· a dot",
    "* a star",
    "- a dash",
    "plain text",
    "1.first",
    "2) second",
    "(3)third",
    "b）bee",
    "lower start",
    "a hyphen -",
    "two\nlines",
    "",
    "   ",
    "$ x $ and y$z$",
    "(1)",
    "（2.1）",
    "E = mc^2",
    "$$a+b$$",
    "\\[c\\]",
    "<table><tr><td>t</td></tr></table>",
    "```code",
    "# heading",
]
BULLETS = FRAGMENTS[5:9]
LABELS = [
    "paragraph_title",
    "doc_title",
    "figure_title",
    "table",
    "display_formula",
    "formula_number",
    "image",
    "chart",
    "abstract",
    "vision_footnote",
]


def test_random_pages_of_chosen_replies_are_formatted_as_the_sdk_formats_them(formatter):
    rng = random.Random(26)
    merged = bulleted = 0
    for _ in range(300):
        pages = []
        for _ in range(rng.randint(1, 3)):
            specs = []
            for _ in range(rng.randint(0, 9)):
                label = "text" if rng.random() < 0.6 else rng.choice(LABELS)
                reply = rng.choice(BULLETS if rng.random() < 0.4 else FRAGMENTS)
                left = rng.choice([100, 104, 109, 112, 300])
                specs.append((label, reply, left, 40 * len(specs)))
            pages.append(page(*specs))
        blocks, _ = same(formatter, pages)
        text = [b["content"] for p in blocks for b in p if b["label"] == "text"]
        merged += any("experiment" in t or "state-of" in t for t in text)
        bulleted += any(t.startswith(("- plain", "- lower", "- 1.", "- Upper")) for t in text)
    assert merged and bulleted  # the random pages had words to join and items to bullet
