"""A page with its layout drawn on it, in the manner of the GLM-OCR SDK's visualisation: each
region's box outlined in its label's colour, a tag with the label and score at its top left, its
place in the reading order in red at its top right."""

import colorsys

from PIL import Image, ImageDraw, ImageFont


def _colour(i: int) -> tuple:
    """The i-th label's colour: hues spread by the golden angle, so neighbours differ."""
    r, g, b = colorsys.hsv_to_rgb((i * 0.381966) % 1.0, 0.85, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


def _ink(colour: tuple) -> tuple:
    """Black or white, whichever reads on `colour`."""
    return (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)


def draw_layout(page: Image.Image, regions: list) -> Image.Image:
    """A copy of `page` with `regions` (dicts: label, score, bbox_2d in thousandths of the
    page, in reading order) drawn on it; regions without a box are left out."""
    out = page.convert("RGB")
    width, height = out.size
    draw = ImageDraw.Draw(out)
    size = max(int(0.018 * width) + 2, 12)
    font = ImageFont.load_default(size)
    line = max(int(max(width, height) * 0.002), 2)
    colours: dict = {}
    for number, region in enumerate(regions, 1):
        if not region.get("bbox_2d"):
            continue
        label = region.get("label", "text")
        colour = colours.setdefault(label, _colour(len(colours)))
        x0, y0, x1, y1 = (
            max(0, min(int(v * s / 1000), s - 1))
            for v, s in zip(region["bbox_2d"], (width, height, width, height))
        )
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        score = region.get("score")
        tag = label if score is None else f"{label} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), tag, font=font)
        tw, th = right - left, bottom - top + 4
        ty = y0 - th if y0 >= th else y0  # above the box, or inside it at the page's top
        draw.rectangle((x0, ty, x0 + tw + 4, ty + th + 1), fill=colour)
        draw.text((x0 + 2, ty + 2 - top), tag, fill=_ink(colour), font=font)
        nx = x1 + 2 if width - x1 >= size * 1.2 else int(x1 - size * 1.1)
        draw.text((nx, y0 - size // 2), str(number), fill=(255, 0, 0), font=font)
    return out
