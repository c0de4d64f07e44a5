"""Boxes and points in a reply: found, mapped to pixels of the original image, drawn.

GLM-V models answer "where is it?" in thousandths of the image's width and height (0-1000,
origin top-left): `<|begin_of_box|>[[x1,y1,x2,y2]]<|end_of_box|>`, several boxes in one list,
points as `[[x,y]]`, single brackets, or JSON such as `[{"label": "cat", "bbox_2d": [...]}]`.
The scale is relative to the image the user gave, so mapping to pixels needs only its size,
never the processor's resize. Values outside 0-1000 are refused rather than drawn. The web page
(mlx_glm4v/server/web/app.js) parses text the same way when a server gives no `boxes` field.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..errors import Glm4vError
from .reply import THINKING

SCALE = 1000
BOX_RE = re.compile(r"<\|begin_of_box\|>(.*?)<\|end_of_box\|>", re.S)
# bare double brackets outside the markers: [[x1,y1,x2,y2]], [[x,y]], [[...],[...]]
NUMS = r"\[[-+0-9.eE,\s]*\]"
BARE_RE = re.compile(rf"\[\s*{NUMS}(?:\s*,\s*{NUMS})*\s*\]")
ORDINALS = {
    "first": 1,
    "second": 2,
    "third": 3,
    "fourth": 4,
    "fifth": 5,
    "sixth": 6,
    "seventh": 7,
    "eighth": 8,
    "ninth": 9,
    "tenth": 10,
    "1st": 1,
    "2nd": 2,
    "3rd": 3,
}
IMAGE_REF_RE = re.compile(
    r"\b(?:(?:image|picture|photo|img)\s*#?\s*(\d+)|(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth"
    r"|1st|2nd|3rd|\d+th)\s+(?:image|picture|photo))\b",
    re.I,
)
# "Nose: [250,600]", "- **cat**: [[...]]": a short name and a colon just before the coordinates
HEADING_RE = re.compile(r"([^\n.;:!?<>\[\]{}]{1,40}):\s*$")
HEADING_TRIM_RE = re.compile(r"^[\s*_\-•#]+|[\s*_\-•#]+$")
BOX_KEYS = ("bbox_2d", "box_2d", "bbox", "box")
POINT_KEYS = ("point_2d", "point")
LABEL_KEYS = ("label", "name", "text")
COLORS = (
    "#e6194b",
    "#3cb44b",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#42d4f4",
    "#f032e6",
    "#9a6324",
    "#800000",
    "#469990",
    "#000075",
    "#bfef45",
)


@dataclass
class Mark:
    """One box (x1, y1, x2, y2) or point (x, y) in thousandths of the image's width and height."""

    kind: str  # "box" or "point"
    coords: Tuple[float, ...]
    label: Optional[str] = None
    # 1-based image the reply names ("image 2", "the second image"), if any
    image: Optional[int] = None

    def pixels(self, width: int, height: int) -> Tuple[int, ...]:
        """Pixel edges in an image of this size: x * width / 1000, rounded half up."""
        return tuple(
            int(v * (width if i % 2 == 0 else height) / SCALE + 0.5)
            for i, v in enumerate(self.coords)
        )


@dataclass
class Grounding:
    marks: List[Mark]
    # one sentence per piece of text that looked like coordinates but was not valid
    refused: List[str]


def find_marks(text: str) -> Grounding:
    """The boxes and points in a reply's answer (thinking is skipped), in order of appearance."""
    text = THINKING.sub(lambda m: " " * len(m.group(0)), text)
    found: List[Tuple[int, int, list]] = []  # (start, end, [Mark | refusal string])
    taken = []
    for m in BOX_RE.finditer(text):
        found.append((m.start(), m.end(), _payload(m.group(1).strip())))
        taken.append((m.start(), m.end()))
    plain = _blank(text, taken)
    for start, end, value in _json_values(plain):
        found.append((start, end, _from_json(value, plain[start:end])))
        taken.append((start, end))
    plain = _blank(text, taken)
    for m in BARE_RE.finditer(plain):
        found.append((m.start(), m.end(), _payload(m.group(0))))
    found.sort(key=lambda f: f[0])
    marks, refused, image, at = [], [], None, 0
    for start, end, items in found:
        image = _image_ref(text[at:start]) or image
        heading = _heading(text[at:start])
        at = end
        for item in items:
            if isinstance(item, str):
                refused.append(item)
            else:
                item.image = image
                item.label = item.label if item.label is not None else heading
                marks.append(item)
    return Grounding(marks, refused)


def _blank(text: str, spans) -> str:
    for start, end in spans:
        text = text[:start] + " " * (end - start) + text[end:]
    return text


def _heading(text: str) -> Optional[str]:
    """The label a reply writes just before coordinates, if it is a short name and a colon."""
    m = HEADING_RE.search(text)
    label = HEADING_TRIM_RE.sub("", m.group(1)) if m else ""
    return label if label and len(label.split()) <= 5 and not IMAGE_REF_RE.search(label) else None


def _image_ref(text: str) -> Optional[int]:
    refs = IMAGE_REF_RE.findall(text)
    if not refs:
        return None
    number, word = refs[-1]
    word = word.lower()
    return int(number) if number else ORDINALS.get(word) or int(word[:-2])


def _json_values(text: str):
    """JSON arrays or objects that hold a box or point key, with their spans."""
    decoder, at = json.JSONDecoder(), 0
    while True:
        starts = [i for i in (text.find("[", at), text.find("{", at)) if i >= 0]
        if not starts:
            return
        start = min(starts)
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            at = start + 1
            continue
        if _has_keys(value):
            yield start, end, value
            at = end
        else:
            at = start + 1


def _has_keys(value) -> bool:
    if isinstance(value, dict):
        return any(k in value for k in BOX_KEYS + POINT_KEYS)
    return isinstance(value, list) and any(_has_keys(v) for v in value)


def _payload(raw: str) -> list:
    """What a box marker or bare bracket holds: JSON numbers, lists of them, or labelled objects."""
    try:
        value = json.loads(raw)
    except ValueError:
        return [f"'{_short(raw)}' is not a list of coordinates."]
    return _from_json(value, raw)


def _from_json(value, raw: str) -> list:
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(_is_number(v) for v in value):
        value = [value]
    if not isinstance(value, list) or not value:
        return [f"'{_short(raw)}' is not a list of coordinates."]
    out = []
    for item in value:
        label = None
        if isinstance(item, dict):
            label = next(
                (str(item[k]) for k in LABEL_KEYS if isinstance(item.get(k), (str, int, float))),
                None,
            )
            key = next((k for k in BOX_KEYS + POINT_KEYS if k in item), None)
            if key is None:
                continue  # an object without coordinates is just data
            item = item[key]
        out.append(_mark(item, label, raw))
    return out


def _mark(coords, label, raw: str):
    if (
        not isinstance(coords, list)
        or len(coords) not in (2, 4)
        or not all(_is_number(v) for v in coords)
    ):
        return (
            f"'{_short(json.dumps(coords, separators=(',', ':')))}' in '{_short(raw)}' is neither "
            "a box [x1,y1,x2,y2] nor a point [x,y]."
        )
    bad = [v for v in coords if not 0 <= v <= SCALE]
    if bad:
        return f"'{_short(raw)}' has {bad[0]}, outside the 0-{SCALE} range of GLM-V coordinates."
    if len(coords) == 4:
        x1, y1, x2, y2 = coords
        coords = [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]
    return Mark("box" if len(coords) == 4 else "point", tuple(coords), label)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _short(s: str, n: int = 60) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"


def marks_for_image(marks: Sequence[Mark], index: int, count: int) -> List[Mark]:
    """The marks that belong on image `index` (1-based) of `count`: those naming it, and those
    naming no image (or one that does not exist)."""
    return [m for m in marks if m.image is None or m.image == index or not 1 <= m.image <= count]


def as_json(marks: Sequence[Mark], sizes: Sequence[Tuple[int, int]]) -> List[dict]:
    """The documented `boxes` form: thousandths, the image named (1-based, or None), and pixel
    edges in that image when it is known (the only image, or the one the reply names)."""
    out = []
    for m in marks:
        image = m.image if m.image is not None and 1 <= m.image <= len(sizes) else None
        if image is None and len(sizes) == 1:
            image = 1
        out.append(
            {
                "type": m.kind,
                "label": m.label,
                "coords": list(m.coords),
                "image": image,
                "pixels": list(m.pixels(*sizes[image - 1])) if image else None,
            }
        )
    return out


def boxes_of(text: str, images: Sequence) -> List[dict]:
    """A reply's marks in the documented form, for images given as files (or anything
    `load_image` reads)."""
    from ..inputs.image import load_image

    return as_json(find_marks(text).marks, [load_image(i).shape[1::-1] for i in images])


def draw_marks(image, marks: Sequence[Mark]):
    """A PIL image of `image` (anything `load_image` reads) with each mark drawn in its own colour
    and labelled (its label, or its number in the reply)."""
    from PIL import Image, ImageDraw, ImageFont

    from ..inputs.image import load_image

    picture = Image.fromarray(load_image(image))
    width, height = picture.size
    draw = ImageDraw.Draw(picture)
    line = max(2, round(min(width, height) / 200))
    try:
        font = ImageFont.load_default(size=max(12, round(min(width, height) / 30)))
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    for n, m in enumerate(marks):
        color = COLORS[n % len(COLORS)]
        p = m.pixels(width, height)
        if m.kind == "box":
            x1, y1, x2, y2 = p
            draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=color, width=line)
            anchor = (x1, y1)
        else:
            x, y = p
            r = 3 * line
            draw.ellipse((x - r, y - r, x + r, y + r), outline=color, width=line)
            draw.ellipse((x - line, y - line, x + line, y + line), fill=color)
            anchor = (x + r, y + r)
        label = m.label or str(n + 1)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        w, h = right - left + 2 * line, bottom - top + 2 * line
        x = min(max(anchor[0], 0), max(width - w, 0))
        y = anchor[1] - h if m.kind == "box" and anchor[1] - h >= 0 else anchor[1]
        y = min(y, max(height - h, 0))
        draw.rectangle((x, y, x + w - 1, y + h - 1), fill=color)
        draw.text((x + line - left, y + line - top), label, fill="white", font=font)
    return picture


def save_drawn(path: str, images: Sequence, marks: Sequence[Mark]) -> List[str]:
    """Draw the marks onto the images and save: one file when the reply concerns one image (the
    only one, or the only one it names), else `OUT-1.png`, `OUT-2.png`, ... for each image.
    Returns the paths written."""
    if not images:
        raise Glm4vError("--draw-boxes needs an image (--image) to draw on.")
    count = len(images)
    named = {m.image for m in marks if m.image is not None and 1 <= m.image <= count}
    if count == 1:
        targets = [(1, path)]
    elif len(named) == 1 and all(m.image in named for m in marks):
        targets = [(named.pop(), path)]
    else:
        out = Path(path)
        targets = [
            (i, str(out.with_name(f"{out.stem}-{i}{out.suffix}"))) for i in range(1, count + 1)
        ]
    written = []
    for index, target in targets:
        picture = draw_marks(images[index - 1], marks_for_image(marks, index, count))
        try:
            picture.save(target)
        except (OSError, ValueError) as e:
            raise Glm4vError(f"{target}: cannot save the drawn image ({e}).") from None
        written.append(target)
    return written


def draw_reply(path: str, text: str, images: Sequence) -> List[str]:
    """`--draw-boxes` and chat's `/boxes`: a reply's marks drawn onto its images and saved.
    Returns the lines to show: one warning per refused piece, then each file written."""
    found = find_marks(text)
    lines = [f"warning: not drawn: {problem}" for problem in found.refused]
    if not found.marks:
        lines.append("warning: the reply has no boxes or points; the image is saved as it is.")
    return lines + [f"saved {written}" for written in save_drawn(path, images, found.marks)]
