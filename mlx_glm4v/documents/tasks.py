"""A page's detections -> the regions the pipeline reads, as the GLM-OCR SDK (0.1.5) picks them:
NMS (0.6 within a label, 0.98 across), a picture covering most of the page dropped, boxes
inside a larger one dropped (per-label "large"/"small" rules; pictures, seals and charts always
kept), reading order, boxes clamped to the page, each label mapped to a task; boxes and
outlines in thousandths of the page."""

from dataclasses import dataclass

import numpy as np

PROMPTS = {
    "text": "Text Recognition:",
    "table": "Table Recognition:",
    "formula": "Formula Recognition:",
}
TEXT_LABELS = (
    "abstract algorithm content doc_title figure_title paragraph_title reference_content text "
    "vertical_text vision_footnote seal formula_number"
).split()
LABEL_TASKS = {
    **{label: "text" for label in TEXT_LABELS},
    "table": "table",
    "display_formula": "formula",
    "inline_formula": "formula",
    "chart": "skip",  # kept as a picture, not read
    "image": "skip",
}  # any other label (headers, footers, page numbers, ...) is dropped
SMALL_LABELS = ("reference",)  # merge mode "small"; every other label "large"
KEPT_WHOLE = ("image", "seal", "chart")  # never dropped as contained in another box


@dataclass
class PageRegion:
    index: int
    label: str
    task: str  # "text", "table", "formula" or "skip"
    score: float
    bbox: list  # [x0, y0, x1, y1] in thousandths of the page
    polygon: list  # [[x, y], ...] in thousandths of the page


def _iou(a, b) -> float:
    """The SDK's IoU of two boxes, in inclusive pixel counts (+1)."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = w * h
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inter / float(area_a + area_b - inter)


def nms(rows: np.ndarray, same: float = 0.6, other: float = 0.98) -> list:
    """Rows [label, score, x0, y0, x1, y1] kept, best score first (the SDK's unstable argsort)."""
    left = list(np.argsort(rows[:, 1])[::-1])
    kept = []
    while left:
        best, left = left[0], left[1:]
        kept.append(best)
        left = [
            i
            for i in left
            if _iou(rows[best, 2:6], rows[i, 2:6])
            < (same if rows[best, 0] == rows[i, 0] else other)
        ]
    return kept


def _inside(a, b) -> bool:
    """Whether at least 80% of box a lies in box b."""
    area = (a[4] - a[2]) * (a[5] - a[3])
    w = max(0, min(a[4], b[4]) - max(a[2], b[2]))
    h = max(0, min(a[5], b[5]) - max(a[3], b[3]))
    return (w * h / area if area > 0 else 0) >= 0.8


def _contained(rows: np.ndarray, whole: set, label: int, small: bool) -> tuple:
    """(contains another, is contained) per row, for one label's merge rule."""
    n = len(rows)
    contains, within = np.zeros(n, int), np.zeros(n, int)
    for i in range(n):
        if rows[i][0] in whole:
            continue
        for j in range(n):
            if i == j or (rows[i][0] if small else rows[j][0]) != label:
                continue
            if _inside(rows[i], rows[j]):
                within[i], contains[j] = 1, 1
    return contains, within


def _drop_page_pictures(rows: np.ndarray, labels: list, size: tuple) -> np.ndarray:
    """A picture covering most of the page (82% landscape, 93% portrait) is not a region."""
    if len(rows) <= 1 or "image" not in labels:
        return rows
    width, height = size
    limit = (0.82 if width > height else 0.93) * width * height
    image = labels.index("image")
    kept = [
        r
        for r in rows
        if r[0] != image
        or (min(width, r[4]) - max(0, r[2])) * (min(height, r[5]) - max(0, r[3])) <= limit
    ]
    return np.array(kept) if kept else rows


def page_regions(
    result: dict, id2label: dict, size: tuple, threshold: float, thresholds: dict | None = None
):
    """transformers' post-processed detections for one page of `size` (width, height) ->
    `PageRegion`s in reading order. `thresholds` (label name or id -> score) override
    `threshold` per label (the detections came at the lowest of them all)."""
    labels = [id2label[k] for k in sorted(id2label)]
    scores, ids, boxes = result["scores"], result["labels"], result["boxes"]
    order, polygons = result["order_seq"], result["polygon_points"]
    if thresholds:
        named = {
            labels.index(k) if isinstance(k, str) else int(k): v for k, v in thresholds.items()
        }
        keep = [i for i in range(len(scores)) if scores[i] >= named.get(int(ids[i]), threshold)]
        scores, ids, boxes = scores[keep], ids[keep], boxes[keep]
        order, polygons = order[keep], [polygons[i] for i in keep]
    if len(scores) == 0:
        return []
    rows = np.array(
        [[int(ids[i]), float(scores[i]), *boxes[i], int(order[i])] for i in range(len(scores))]
    )
    rows = rows[nms(rows[:, :6])]
    rows = _drop_page_pictures(rows, labels, size)
    whole = {labels.index(n) for n in KEPT_WHOLE if n in labels}
    keep = np.ones(len(rows), bool)
    for label in range(len(labels)):
        small = labels[label] in SMALL_LABELS
        contains, within = _contained(rows[:, :6], whole, label, small)
        keep &= ((contains == 0) | (within == 1)) if small else (within == 0)
    rows = rows[keep]
    rows = rows[np.argsort(rows[:, 6])] if len(rows) else rows
    rows = _unclip(rows)
    width, height = size
    out = []
    for row in rows:
        label = id2label.get(int(row[0]), f"class_{int(row[0])}")
        x0, x1 = (max(0, min(float(v), width)) for v in (row[2], row[4]))
        y0, y1 = (max(0, min(float(v), height)) for v in (row[3], row[5]))
        if x0 >= x1 or y0 >= y1:
            continue
        task = LABEL_TASKS.get(label)
        if task is None:
            continue
        polygon = _outline(boxes, polygons, row[2:6], (x0, y0, x1, y1), size)
        bbox = [int(int(x0) / width * 1000), int(int(y0) / height * 1000)]
        bbox += [int(int(x1) / width * 1000), int(int(y1) / height * 1000)]
        points = [[int(float(x) / width * 1000), int(float(y) / height * 1000)] for x, y in polygon]
        out.append(PageRegion(len(out), label, task, float(row[1]), bbox, points))
    return out


def _unclip(rows: np.ndarray, ratio: tuple = (1.0, 1.0)) -> np.ndarray:
    """The SDK's box growth about the centre; at its ratio of 1 it keeps the rounding it makes."""
    if not len(rows):
        return rows
    w, h = rows[:, 4] - rows[:, 2], rows[:, 5] - rows[:, 3]
    cx, cy = rows[:, 2] + w / 2, rows[:, 3] + h / 2
    nw, nh = w * ratio[0], h * ratio[1]
    box = (cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2)
    return np.column_stack((rows[:, 0], rows[:, 1], *box, rows[:, 6:]))


def _outline(boxes, polygons, box, clamped, size) -> np.ndarray:
    """The detection's outline (matched by its box, as the SDK does), clamped to the page."""
    for i in range(len(boxes)):
        if np.allclose(boxes[i], box, atol=1.0):
            if polygons[i] is not None:
                poly = np.asarray(polygons[i]).astype(np.float32)
                poly[:, 0] = np.clip(poly[:, 0], 0, size[0])
                poly[:, 1] = np.clip(poly[:, 1], 0, size[1])
                return poly
            break
    x0, y0, x1, y1 = clamped
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float32)
