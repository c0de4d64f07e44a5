"""Grounding: boxes and points found in replies, mapped to pixels, drawn where they say."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import BOX_SCRIPT
from PIL import Image

from mlx_glm4v.errors import Glm4vError
from mlx_glm4v.generation.grounding import (
    COLORS,
    as_json,
    boxes_of,
    draw_marks,
    draw_reply,
    find_marks,
    save_drawn,
)


def marks(text):
    found = find_marks(text)
    return [(m.kind, m.coords, m.label, m.image) for m in found.marks], found.refused


def test_one_box_in_markers():
    assert marks("The cat is at <|begin_of_box|>[[100,200,300,400]]<|end_of_box|>.") == (
        [("box", (100, 200, 300, 400), None, None)],
        [],
    )


def test_labels_written_before_the_coordinates():
    text = (
        "<answer>Nose: <|begin_of_box|>[250,600]<|end_of_box|>\n- **Left eye**: [[1,2,3,4]]\n"
        "2. ears: <|begin_of_box|>[[5,6,7,8],[9,9,10,10]]<|end_of_box|>\n"
        "This sentence is much too long to be a label: [[1,1]]. Then [[2,2]]</answer>"
    )
    assert [(m[1], m[2]) for m in marks(text)[0]] == [
        ((250, 600), "Nose"),
        ((1, 2, 3, 4), "Left eye"),
        ((5, 6, 7, 8), "ears"),
        ((9, 9, 10, 10), "ears"),
        ((1, 1), None),
        ((2, 2), None),
    ]


def test_single_brackets_several_boxes_and_thinking_skipped():
    text = (
        "<think>first guess [[1,2,3,4]]</think><answer>Two: "
        "<|begin_of_box|>[[10,20,30,40],[50,60,70,80]]<|end_of_box|> and "
        "<|begin_of_box|>[5,6,7,8]<|end_of_box|></answer>"
    )
    assert marks(text) == (
        [
            ("box", (10, 20, 30, 40), "Two", None),
            ("box", (50, 60, 70, 80), "Two", None),
            ("box", (5, 6, 7, 8), None, None),
        ],
        [],
    )


def test_points_bare_and_in_markers():
    assert marks("Click <|begin_of_box|>[500,250]<|end_of_box|>, then [[12, 7.5]].") == (
        [("point", (500, 250), None, None), ("point", (12, 7.5), None, None)],
        [],
    )


def test_json_with_labels():
    text = (
        'Here:\n```json\n[{"label": "cat", "bbox_2d": [10, 20, 30, 40]},\n'
        ' {"label": "nose", "point_2d": [5, 6]},'
        ' {"label": "no coordinates"}]\n```\n'
        'and also <|begin_of_box|>{"label": "dog", "bbox_2d": [1,1,2,2]}'
        "<|end_of_box|>"
    )
    assert marks(text) == (
        [
            ("box", (10, 20, 30, 40), "cat", None),
            ("point", (5, 6), "nose", None),
            ("box", (1, 1, 2, 2), "dog", None),
        ],
        [],
    )


def test_reversed_corners_are_ordered():
    assert marks("[[300,400,100,200]]")[0] == [("box", (100, 200, 300, 400), None, None)]


def test_image_named_by_the_reply():
    text = (
        "In image 2 the cat [[1,2,3,4]] and its tail [[5,6,7,8]]; the first picture has a dog "
        "<|begin_of_box|>[[9,9,10,10]]<|end_of_box|>. First, though: [[1,1]]"
    )
    assert [m[3] for m in marks(text)[0]] == [2, 2, 1, 1]


@pytest.mark.parametrize(
    "text,message",
    [
        (
            "<|begin_of_box|>[[100,200,1300,400]]<|end_of_box|>",
            "has 1300, outside the 0-1000 range",
        ),
        ("[[-5, 3]]", "has -5, outside the 0-1000 range"),
        (
            "<|begin_of_box|>[[1,2,3]]<|end_of_box|>",
            "is neither a box [x1,y1,x2,y2] nor a point [x,y]",
        ),
        ("<|begin_of_box|>[[1,2,3,4]<|end_of_box|>", "is not a list of coordinates"),
        ("<|begin_of_box|>top left<|end_of_box|>", "is not a list of coordinates"),
        ('[{"label": "cat", "bbox_2d": [1, "a", 3, 4]}]', "is neither a box"),
    ],
)
def test_refused(text, message):
    found, refused = marks(text)
    assert found == [] and len(refused) == 1 and message in refused[0]


def test_text_without_coordinates():
    assert marks('A list [1, 2, 3, 4] and {"a": [1]} and [[not numbers]].') == ([], [])


def test_pixels_of_the_original_image():
    box, point = find_marks("[[100,200,300,400]] [[999,1000]]").marks
    # hand-computed: x * 640 / 1000 and y * 480 / 1000, rounded half up
    assert box.pixels(640, 480) == (64, 96, 192, 192)
    assert box.pixels(333, 101) == (33, 20, 100, 40)  # 33.3, 20.2, 99.9, 40.4
    assert point.pixels(333, 101) == (333, 101)  # 332.667, 101.0
    assert as_json([box, point], [(640, 480)]) == [
        {
            "type": "box",
            "label": None,
            "coords": [100, 200, 300, 400],
            "image": 1,
            "pixels": [64, 96, 192, 192],
        },
        {"type": "point", "label": None, "coords": [999, 1000], "image": 1, "pixels": [639, 480]},
    ]
    two = find_marks("In image 2: [[500,500]]; elsewhere").marks + [box]
    assert as_json(two, [(640, 480), (200, 100)]) == [
        {"type": "point", "label": None, "coords": [500, 500], "image": 2, "pixels": [100, 50]},
        {
            "type": "box",
            "label": None,
            "coords": [100, 200, 300, 400],
            "image": None,
            "pixels": None,
        },
    ]


def rgb(color: str):
    return tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))


def test_drawn_box_pixels_are_where_the_coordinates_say(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("RGB", (400, 300), (128, 128, 128)).save(path)
    found = find_marks(
        '[{"label": "a", "bbox_2d": [250, 500, 750, 900]}, {"label": "b", "point_2d": [100, 100]}]'
    )
    a = np.asarray(draw_marks(str(path), found.marks))
    red, green = rgb(COLORS[0]), rgb(COLORS[1])
    # box: x 100..300, y 150..270 (edges), outline 2 px wide inside the box
    for x, y in [(100, 200), (101, 200), (299, 200), (298, 200), (200, 269), (200, 268)]:
        assert tuple(a[y, x]) == red, (x, y)
    for x, y in [(99, 200), (102, 200), (297, 200), (300, 200), (200, 270), (200, 266), (200, 200)]:
        assert tuple(a[y, x]) == (128, 128, 128), (x, y)
    # the label sits on a filled tab above the box's top-left corner
    assert tuple(a[148, 100]) == red and tuple(a[148, 99]) == (128, 128, 128)
    # point at (40, 30): a filled centre
    assert (
        tuple(a[30, 40]) == green
        and tuple(a[30, 34]) == green
        and tuple(a[30, 37]) == (128, 128, 128)
    )
    assert (a[:140, 300:] == 128).all() and (a[275:] == 128).all()


def test_save_drawn_picks_the_image_or_numbers_files(tmp_path):
    images = []
    for i, size in enumerate([(200, 100), (100, 200)]):
        images.append(str(tmp_path / f"in{i}.png"))
        Image.new("RGB", size, "white").save(images[-1])
    named = find_marks("The second image: [[0,0,500,500]]").marks
    assert save_drawn(str(tmp_path / "out.png"), images, named) == [str(tmp_path / "out.png")]
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert out.shape == (200, 100, 3) and tuple(out[50, 0]) == rgb(COLORS[0])
    unnamed = find_marks("[[0,0,500,500]]").marks
    paths = save_drawn(str(tmp_path / "out.png"), images, unnamed)
    assert paths == [str(tmp_path / "out-1.png"), str(tmp_path / "out-2.png")]
    assert [Image.open(p).size for p in paths] == [(200, 100), (100, 200)]
    with pytest.raises(Glm4vError, match="needs an image"):
        save_drawn(str(tmp_path / "out.png"), [], unnamed)


def test_draw_reply_says_what_it_refused_and_wrote(tmp_path):
    """What chat's /boxes and --draw-boxes show: refusals first, then the files."""
    Image.new("RGB", (50, 40), "white").save(tmp_path / "in.png")
    text = "Here [[0,0,500,500]] and there <|begin_of_box|>[[0,0,2000,10]]<|end_of_box|>"
    assert draw_reply(str(tmp_path / "out.png"), text, [str(tmp_path / "in.png")]) == [
        "warning: not drawn: '[[0,0,2000,10]]' has 2000, "
        "outside the 0-1000 range of GLM-V coordinates.",
        f"saved {tmp_path / 'out.png'}",
    ]
    assert tuple(np.asarray(Image.open(tmp_path / "out.png"))[10, 0]) == rgb(COLORS[0])
    assert boxes_of(text, [str(tmp_path / "in.png")])[0]["pixels"] == [0, 0, 25, 20]


def test_drawing_follows_exif_orientation(tmp_path):
    """Coordinates refer to the picture as the model saw it: upright, EXIF rotation applied."""
    im = Image.new("RGB", (300, 100), "white")
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display: 100 x 300 upright
    im.save(tmp_path / "rot.jpg", exif=exif)
    drawn = draw_marks(str(tmp_path / "rot.jpg"), find_marks("[[0,0,1000,1000]]").marks)
    assert drawn.size == (100, 300)


def test_generate_draw_boxes_and_json(box_checkpoint, tmp_path):
    """The CLI on a checkpoint that answers with a point in box markers: --json gives it in
    pixels, --draw-boxes draws it there (read back from the file)."""
    path = tmp_path / "photo.png"
    Image.fromarray(np.full((90, 120, 3), 128, dtype=np.uint8)).save(path)
    out_png = tmp_path / "drawn.png"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_glm4v.cli",
            "generate",
            "--model",
            str(box_checkpoint),
            "--image",
            str(path),
            "--prompt",
            "Where is the nose?",
            "--json",
            "--draw-boxes",
            str(out_png),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["text"] == BOX_SCRIPT
    # 250 / 1000 of 120 px, 600 / 1000 of 90 px
    assert result["boxes"] == [
        {"type": "point", "label": "Nose", "coords": [250, 600], "image": 1, "pixels": [30, 54]}
    ]
    assert run.stderr.strip().endswith(f"saved {out_png}")
    drawn = np.asarray(Image.open(out_png))
    assert tuple(drawn[54, 30]) == rgb(COLORS[0]) and tuple(drawn[10, 100]) == (128, 128, 128)


def test_chat_boxes_command(box_checkpoint, tmp_path):
    """Chat's /boxes PATH draws the last reply's marks onto the conversation's image."""
    import pexpect

    path = tmp_path / "photo.png"
    Image.new("RGB", (200, 100), (128, 128, 128)).save(path)
    child = pexpect.spawn(
        sys.executable,
        ["-m", "mlx_glm4v.cli", "chat", "--model", str(box_checkpoint)],
        encoding="utf-8",
        timeout=120,
        env={**os.environ, "NO_COLOR": "1", "TERM": "xterm"},
    )
    child.expect(">> ")
    child.sendline(f"/boxes {tmp_path / 'early.png'}")
    child.expect("no reply yet")
    child.sendline(f"/image {path}")
    child.expect(">> ")
    child.sendline("Where is the nose?")
    child.expect(">> ")
    child.sendline(f"/boxes {tmp_path / 'nose.png'}")
    child.expect(f"saved {tmp_path / 'nose.png'}")
    child.expect(">> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    drawn = np.asarray(Image.open(tmp_path / "nose.png"))
    assert tuple(drawn[60, 50]) == rgb(COLORS[0]) and not (tmp_path / "early.png").exists()


def test_generate_draw_boxes_needs_an_image(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_glm4v.cli",
            "generate",
            "--model",
            str(tmp_path),
            "--prompt",
            "hi",
            "--draw-boxes",
            str(tmp_path / "x.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert (
        run.returncode == 1
        and run.stderr.strip() == "error: --draw-boxes needs an image (--image) to draw on."
    )
