"""The detector's raw outputs -> a page's regions: transformers'
`PPDocLayoutV3ImageProcessor.post_process_object_detection` (the reading order from the
pairwise order logits, the top scores over queries and labels, boxes in page pixels, masks
binarised and traced into polygons with OpenCV), then per-label thresholds."""

from dataclasses import dataclass

import numpy as np

from ..errors import Glm4vError

try:
    import cv2
except ImportError:  # an install without it still detects; only the polygons need it
    cv2 = None


@dataclass
class Region:
    label: str
    label_id: int
    score: float
    box: tuple  # (x0, y0, x1, y1) in page pixels
    polygon: list  # [(x, y), ...] in page pixels
    order: int  # the detector's reading-order rank (smaller is read first)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp overflows to inf for very negative x: 0, as torch
        return (1.0 / (1.0 + np.exp(-x.astype(np.float32)))).astype(np.float32)


def order_ranks(order_logits: np.ndarray) -> np.ndarray:
    """(Q, Q) logits -> each query's rank: its votes for being read later, ranked."""
    scores = _sigmoid(order_logits)
    votes = np.triu(scores, 1).sum(axis=0) + np.tril(1.0 - scores.T, -1).sum(axis=0)
    ranks = np.empty(len(votes), np.int64)
    ranks[np.argsort(votes, kind="stable")] = np.arange(len(votes))
    return ranks


def _custom_vertices(polygon: np.ndarray, sharp_angle: float = 45) -> list:
    """A concave corner of (almost) 45 degrees is pushed outward along its bisector."""
    out, n = [], len(polygon)
    for i in range(n):
        prev, cur, nxt = polygon[(i - 1) % n], polygon[i], polygon[(i + 1) % n]
        v1, v2 = prev - cur, nxt - cur
        if v1[1] * v2[0] - v1[0] * v2[1] < 0:
            cos = np.clip((v1 @ v2) / (np.linalg.norm(v1) * np.linalg.norm(v2)), -1.0, 1.0)
            if abs(np.degrees(np.arccos(cos)) - sharp_angle) < 1:
                direction = v1 / np.linalg.norm(v1) + v2 / np.linalg.norm(v2)
                direction = direction / np.linalg.norm(direction)
                step = (np.linalg.norm(v1) + np.linalg.norm(v2)) / 2
                out.append(tuple(cur + direction * step))
                continue
        out.append(tuple(cur))
    return out


def _mask_polygon(mask: np.ndarray, epsilon_ratio: float = 0.004):
    if cv2 is None:
        raise Glm4vError(
            "region polygons need OpenCV: pip install opencv-python-headless (a dependency of "
            "mlx-glm4v)."
        )
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    contour = max(contours, key=cv2.contourArea)
    approx = cv2.approxPolyDP(contour, epsilon_ratio * cv2.arcLength(contour, True), True)
    return _custom_vertices(np.atleast_2d(approx.squeeze()))


def _polygon(box: np.ndarray, mask: np.ndarray, scale: tuple):
    """The region's outline from its mask (at a quarter of the input size), or its box."""
    x0, y0, x1, y1 = box.astype(np.int32)
    w, h = x1 - x0, y1 - y0
    rect = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float32)
    if w <= 0 or h <= 0:
        return rect
    sx, sy = scale[0] / 4, scale[1] / 4
    mh, mw = mask.shape
    xs = np.clip([int(round(float(x0 * sx))), int(round(float(x1 * sx)))], 0, mw)
    ys = np.clip([int(round(float(y0 * sy))), int(round(float(y1 * sy)))], 0, mh)
    crop = mask[ys[0] : ys[1], xs[0] : xs[1]]
    if crop.size == 0 or crop.sum() == 0:
        return rect
    resized = cv2.resize(crop.astype(np.uint8), (int(w), int(h)), interpolation=cv2.INTER_NEAREST)
    polygon = _mask_polygon(resized)
    if polygon is not None and len(polygon) < 4:
        return rect
    if polygon is not None and len(polygon) > 0:
        polygon = polygon + np.array([x0, y0])
    return polygon


def detections(
    logits, boxes, order_logits, masks, page_size: tuple, input_size: tuple, threshold: float = 0.5
) -> dict:
    """One page's raw outputs (numpy, batch dimension dropped) -> transformers' result dict:
    `scores`, `labels`, `boxes` (x0, y0, x1, y1 in page pixels), `polygon_points`, `order_seq`,
    in reading order."""
    height, width = page_size
    ranks = order_ranks(order_logits)
    centre, size = boxes[:, :2], boxes[:, 2:]
    xyxy = np.concatenate([centre - 0.5 * size, centre + 0.5 * size], axis=-1)
    xyxy = (xyxy * np.array([width, height, width, height], np.float32)).astype(np.float32)
    queries, labels = logits.shape
    scores = _sigmoid(logits).reshape(-1)
    top = np.argsort(-scores, kind="stable")[:queries]
    scores, labels, query = scores[top], top % labels, top // labels
    keep = scores >= threshold
    order = ranks[query][keep]
    by_order = np.argsort(order, kind="stable")
    kept = query[keep][by_order]
    binary = (_sigmoid(masks[kept]) > threshold).astype(np.int32)
    scale = (input_size[1] / width, input_size[0] / height)
    return {
        "scores": scores[keep][by_order],
        "labels": labels[keep][by_order],
        "boxes": xyxy[kept],
        "polygon_points": [_polygon(b, m, scale) for b, m in zip(xyxy[kept], binary)],
        "order_seq": order[by_order],
    }


def regions(result: dict, id2label: dict, thresholds: dict | None = None) -> list:
    """A result dict -> `Region`s, each kept if its score reaches its label's threshold in
    `thresholds` (labels not named there are kept)."""
    out = []
    for score, label, box, polygon, order in zip(
        result["scores"],
        result["labels"],
        result["boxes"],
        result["polygon_points"],
        result["order_seq"],
    ):
        name = id2label.get(int(label), str(int(label)))
        if thresholds and score < thresholds.get(name, 0.0):
            continue
        if polygon is None:  # no contour in the mask: the box's corners
            polygon = [(box[0], box[1]), (box[2], box[1]), (box[2], box[3]), (box[0], box[3])]
        points = [(float(x), float(y)) for x, y in np.asarray(polygon, dtype=np.float64)]
        out.append(
            Region(name, int(label), float(score), tuple(float(v) for v in box), points, int(order))
        )
    return out
