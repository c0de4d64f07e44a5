"""Make the README's pictures of grounding: the chat page with boxes, and `--draw-boxes` output.

    python docs/screenshots.py --model CHECKPOINT --photo chelsea.png

Random or small checkpoints emit no real boxes, so both pictures are drawn from REPLY, a reply
text written by hand in GLM-V's format, given to the page's own rendering code and to
`grounding.save_drawn`. The page is served by a real `mlx-glm4v serve` on a loopback port and
shown in headless Chromium. The photo used in the README is scikit-image's `chelsea.png`
(CC0, Stefan van der Walt).
"""

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from PIL import Image
from selenium import webdriver

from mlx_glm4v.generation.grounding import find_marks, save_drawn

PROMPT = "Where are the cat's eyes and nose?"
REPLY = (
    "<think>Two eyes and a nose to find.</think><answer>Left eye: "
    "<|begin_of_box|>[[300,283,466,500]]<|end_of_box|>\n"
    "Right eye: <|begin_of_box|>[[643,367,765,550]]<|end_of_box|>\nNose: "
    "<|begin_of_box|>[581,800]<|end_of_box|></answer>"
)
HERE = Path(__file__).parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--photo", required=True)
    args = parser.parse_args()

    save_drawn(str(HERE / "draw-boxes.png"), [args.photo], find_marks(REPLY).marks)
    Image.open(HERE / "draw-boxes.png").convert("RGB").save(HERE / "draw-boxes.jpg", quality=85)
    (HERE / "draw-boxes.png").unlink()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_glm4v.cli",
            "serve",
            "--model",
            args.model,
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(base, timeout=2)
                break
            except OSError:
                time.sleep(0.3)
        options = webdriver.ChromeOptions()
        # Debian's, with its driver: nothing is downloaded
        options.binary_location = shutil.which("chromium")
        for a in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=960,720",
            "--hide-scrollbars",
        ):
            options.add_argument(a)
        driver = webdriver.Chrome(
            service=webdriver.ChromeService(shutil.which("chromedriver")), options=options
        )
        try:
            driver.get(base)
            time.sleep(1)
            driver.find_element("id", "file").send_keys(str(Path(args.photo).resolve()))
            time.sleep(0.5)
            driver.execute_script("glm4v.addExchange(arguments[0], arguments[1])", PROMPT, REPLY)
            time.sleep(0.5)
            driver.save_screenshot(str(HERE / "page.png"))
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait()
    Image.open(HERE / "page.png").convert("RGB").save(HERE / "web-boxes.jpg", quality=85)
    (HERE / "page.png").unlink()


if __name__ == "__main__":
    main()
