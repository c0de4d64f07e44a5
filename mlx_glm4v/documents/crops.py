"""A region of a page -> the picture sent to the model, as the GLM-OCR SDK makes it: the box
cut out (outside the outline painted white, when outlines are used), resized to multiples of
28 within the SDK's pixel budget (bicubic), then encoded (JPEG by default) and decoded again."""

import math
from io import BytesIO

from PIL import Image, ImageDraw

MIN_PIXELS = 112 * 112
MAX_PIXELS = 71_372_800  # config.yaml's (its dataclass says 14 * 14 * 4 * 1280)
FACTOR = 28
FRAMES = 2  # the SDK's temporal patch: it counts each picture twice against the budget


def crop(page: Image.Image, bbox: list, polygon: list | None = None) -> Image.Image:
    """The box (thousandths of the page) cut out; with an outline, what lies outside is white."""
    width, height = page.size
    x0, y0, x1, y1 = (int(v * s / 1000) for v, s in zip(bbox, (width, height, width, height)))
    cut = page.crop((x0, y0, x1, y1))
    if not polygon or len(polygon) < 3:
        return cut
    points = [(int(x * width / 1000) - x0, int(y * height / 1000) - y0) for x, y in polygon]
    mask = Image.new("L", cut.size, 0)
    ImageDraw.Draw(mask).polygon(points, fill=255)
    white = Image.new(cut.mode, cut.size, (255,) * len(cut.getbands()))
    return Image.composite(cut, white, mask)


def target_size(height: int, width: int, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS) -> tuple:
    """(height, width): multiples of 28 near the picture's, its area (counted twice) in budget."""
    h, w = round(height / FACTOR) * FACTOR, round(width / FACTOR) * FACTOR
    area = FRAMES * height * width
    if FRAMES * h * w > max_pixels:
        beta = math.sqrt(area / max_pixels)
        h, w = (
            math.floor(height / beta / FACTOR) * FACTOR,
            math.floor(width / beta / FACTOR) * FACTOR,
        )
    elif FRAMES * h * w < min_pixels:
        beta = math.sqrt(min_pixels / area)
        h, w = math.ceil(height * beta / FACTOR) * FACTOR, math.ceil(width * beta / FACTOR) * FACTOR
    return h, w


def prepare(image: Image.Image, image_format: str | None = "JPEG") -> Image.Image:
    """The picture the model reads: resized as the SDK resizes, then (unless `image_format` is
    None) encoded and decoded as a server decodes what the SDK sends."""
    image = image.convert("RGB")
    h, w = target_size(image.height, image.width)
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    if image_format is None:
        return image
    buffer = BytesIO()
    image.save(buffer, format=image_format)
    return Image.open(BytesIO(buffer.getvalue())).convert("RGB")
