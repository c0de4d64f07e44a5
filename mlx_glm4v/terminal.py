"""The chat as a terminal user expects it: line editing, paths as terminals paste them,
commands that never reach the model, a reply that tells thinking from answer, and a status
line while a long prompt is read.

Imports nothing heavy at module level: the commands use `existing_paths` before a model is loaded.
"""

import os
import re
import shlex
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from .errors import Glm4vError
from .generation.reply import ReplySplitter

COMMANDS = {
    "/image": "/image PATH  attach an image (or several; a PDF's pages) to your next message",
    "/video": "/video PATH  attach a video (or several) to your next message",
    "/boxes": "/boxes PATH  save the image with the last reply's boxes and points drawn",
    "/reset": "/reset       forget the conversation",
    "/help": "/help        show this list",
    "/exit": "/exit        quit (also /quit, Ctrl-D)",
}
ALIASES = {"/quit": "/exit"}
WELCOME = (
    "Type a message; /image PATH or /video PATH attaches media to the next one; "
    "/help lists the commands."
)

# What a terminal may leave in a line when nothing interprets the keys: CSI and SS3 sequences
# (arrows, Home, function keys, bracketed paste), other escapes, and control characters.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1bO.|\x1b.?|[\x00-\x08\x0b-\x1f\x7f\x80-\x9f]")


def clean_line(line: str) -> str:
    """A typed line without escape sequences or control characters (tabs and newlines stay)."""
    return _ESCAPES.sub("", line)


# ---- paths as typed, pasted or dropped into a terminal -------------------------------------


def _expand(text: str) -> str:
    if text.startswith("file://"):  # some terminals drop URIs
        text = unquote(text[len("file://") :])
    return os.path.expanduser(text)


def user_paths(text: str) -> list:
    """The paths in `text`, read the way a shell would: `~` expanded, quotes and backslash escapes
    undone (what dragging files into a terminal produces), several paths separated by spaces.
    A name with spaces that exists as typed is taken whole."""
    text = text.strip()
    if not text:
        return []
    if Path(_expand(text)).is_file():
        return [_expand(text)]
    try:
        parts = shlex.split(text)
    except ValueError:  # an unbalanced quote: take the text as it is
        parts = [text]
    return [_expand(p) for p in parts]


def existing_paths(text: str, kind: str) -> list:
    """`user_paths(text)`, each of them an existing file, else one sentence naming the path."""
    paths = user_paths(text)
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        name = missing[0] if len(paths) == 1 or len(missing) < len(paths) else text.strip()
        raise Glm4vError(f"{name}: no such {kind} file.")
    return paths


# ---- attachments: opened and measured when attached, not when a question is spent ----------


@dataclass
class Attachment:
    kind: str  # "image" or "video"
    path: str
    size: tuple  # (width, height) of the file, or ()
    frames: int  # frames the processor samples (videos), else 0
    tokens: int  # vision tokens
    page: int = 0  # a PDF's page (1-based), else 0
    image: object = None  # the rendered page (PIL) for a PDF's page, else None: the path is read

    @property
    def name(self) -> str:
        return Path(self.path).name + (f" page {self.page}" if self.page else "")

    @property
    def source(self):
        """What the processor reads: the file, or the rendered page."""
        return self.image if self.image is not None else self.path

    @property
    def summary(self) -> str:
        """E.g. photo.jpg (1024x768, 999 tokens) or clip.mp4 (1280x720, 24 frames, 14,352
        tokens)."""
        details = [f"{self.size[0]}x{self.size[1]}"] if self.size else []
        details += [f"{self.frames:,} frames"] if self.kind == "video" else []
        return f"{self.name} ({', '.join(details + [f'{self.tokens:,} tokens'])})"


def attach(processor, path: str, kind: str, media_kwargs: dict) -> list:
    """Decode a file as the processor will and say what it costs; a bad file raises here. A PDF
    given as an image is its selected pages, rendered now, one attachment each.

    Tokens are the vision tokens the processor's real resize gives; for a video, with the
    frames its sampling picks."""
    from .inputs.pdf import is_pdf_file, render_pages
    from .inputs.processor import IMAGE, VIDEO, split_media_kwargs

    pdf, media_kwargs = split_media_kwargs(media_kwargs)
    settings = processor.image_settings if kind == "image" else processor.video_settings
    if kind == "image" and is_pdf_file(path):
        out = []
        for page in render_pages(path, pdf, path):
            grid = processor(IMAGE, images=[page], **media_kwargs)["image_grid_thw"][0]
            tokens = int(grid.prod()) // settings.merge_size**2
            out.append(Attachment(kind, path, page.size, 0, tokens, page.info["page"], page))
        return out
    if kind == "image":
        out = processor(IMAGE, images=[path], **media_kwargs)
        grid = out["image_grid_thw"][0]
    else:
        out = processor(VIDEO, videos=[path], **media_kwargs)
        grid = out["video_grid_thw"][0]
    tokens = int(grid.prod()) // settings.merge_size**2
    size = _image_size(path) if kind == "image" else _video_size(path)
    frames = int(grid[0]) * settings.temporal_patch_size if kind == "video" else 0
    return [Attachment(kind, path, size, frames, tokens)]


def _image_size(path: str):
    """(width, height) as the model sees it: EXIF rotation applied; from the header only."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        return (h, w) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)


def _video_size(path: str):
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        return stream.codec_context.width, stream.codec_context.height


# ---- showing a reply -----------------------------------------------------------------------

DIM, RESET = "\033[2m", "\033[0m"
ANSWER_LINE = "--- answer ---"


def use_color(stream) -> bool:
    """Colour on a terminal unless NO_COLOR is set (https://no-color.org) or TERM is dumb."""
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


class ReplyDisplay:
    """A streamed reply as shown: thinking dimmed (or hidden), then the answer, markers removed.

    Without colour a line stands before the answer, so the two are still told apart. White
    space at either end of each part is dropped (held back until more text shows it is inner).
    """

    def __init__(self, hide_thinking: bool = False, color: bool = True):
        self.hide_thinking, self.color = hide_thinking, color
        self.splitter = ReplySplitter()
        self.part = None  # the part being shown: "thinking", "answer" or None before any text
        self.space = ""  # white space held back at the end of the current part

    @property
    def thinking(self) -> bool:
        """Whether the model is thinking now (shown or not)."""
        return self.splitter.thinking

    def feed(self, text: str) -> str:
        reasoning, answer = self.splitter.feed(text)
        return self._put("thinking", reasoning) + self._put("answer", answer)

    def finish(self) -> str:
        reasoning, answer = self.splitter.finish()
        out = self._put("thinking", reasoning) + self._put("answer", answer)
        if self.part == "thinking" and self.color:
            out += RESET
        self.part, self.space = None, ""
        return out

    def _put(self, part: str, text: str) -> str:
        if not text or (part == "thinking" and self.hide_thinking):
            return ""
        out = ""
        if part != self.part:
            text = text.lstrip()
            if not text:
                return ""
            if self.part == "thinking":
                out += RESET + "\n\n" if self.color else "\n" + ANSWER_LINE + "\n"
            elif part == "thinking" and self.color:
                out += DIM
            self.part, self.space = part, ""
        text = self.space + text
        body = text.rstrip()
        self.space = text[len(body) :]
        return out + body


class StatusLine:
    """One line on stderr, rewritten in place and erased before anything else is printed;
    nothing at all when stderr is not a terminal."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.shown = False

    def show(self, text: str):
        if not self.enabled:
            return
        width = shutil.get_terminal_size().columns
        self.stream.write("\r\033[K" + text[: max(width - 1, 1)])
        self.stream.flush()
        self.shown = True

    def clear(self):
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


def reading_status(status: StatusLine, attachments: list):
    """The `progress` callback of a turn: vision encoding, then prompt tokens prefilled."""
    frames = sum(a.frames for a in attachments)
    videos_only = attachments and all(a.kind == "video" for a in attachments)

    def progress(stage: str, done: int, total: int):
        if stage == "vision":
            if videos_only:
                status.show(f"encoding video: {done * frames // total:,}/{frames:,} frames")
            else:
                status.show(f"encoding images and videos: {100 * done // total}%")
        else:
            status.show(f"reading the prompt: {done:,}/{total:,} tokens")

    return progress


# ---- the conversation loop -----------------------------------------------------------------


def take_ctrl_c():
    """Ctrl-C is part of the REPL (it stops a reply or clears the line), so take SIGINT even when
    whoever started us ignores it: a shell script's background job inherits SIGINT ignored, and
    Python then installs no KeyboardInterrupt at all, so a reply could never be stopped."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def enable_line_editing():
    """Python's readline under `input()`: arrows, Ctrl-A/E, history with Up; Tab completes
    commands and, after /image or /video, file names. Without readline, `clean_line` still
    keeps escape codes from the model."""
    try:
        import readline
    except ImportError:
        return
    readline.set_completer_delims(" \t\n")
    readline.set_completer(_complete)
    if "libedit" in (readline.__doc__ or ""):
        readline.parse_and_bind("bind ^I rl_complete")
    else:
        readline.parse_and_bind("tab: complete")


def _complete(text: str, state: int):
    import glob
    import readline

    line = readline.get_line_buffer()
    if line.startswith("/") and " " not in line:
        options = [c + " " for c in (*COMMANDS, *ALIASES) if c.startswith(text)]
    elif line.startswith(("/image ", "/video ")):
        options = [
            p + ("/" if os.path.isdir(p) else "") for p in glob.glob(os.path.expanduser(text) + "*")
        ]
    else:
        options = []
    return options[state] if state < len(options) else None


def say(text: str):
    print(text, file=sys.stderr, flush=True)


def run_chat(
    model,
    processor,
    *,
    system=None,
    images=(),
    videos=(),
    settings=None,
    hide_thinking=False,
    group=None,
    reuse=None,
):
    """The REPL of `mlx-glm4v chat`, until /exit or end of input; under mlx.launch (`group`, on
    rank 0) every turn also runs on the other ranks (`distributed.SharedSession`). `reuse`: a
    prompt cache file's prefix to start from (see `ChatSession`)."""
    from .generation.chat import ChatSession

    session = ChatSession(model, processor, system, reuse, **(settings or {}))
    if group is not None:
        from .serving.distributed import SharedSession

        session = SharedSession(group, session)
    media_kwargs = session.settings.media_kwargs
    pending = [a for p in images for a in attach(processor, p, "image", media_kwargs)]
    pending += [a for p in videos for a in attach(processor, p, "video", media_kwargs)]
    for a in pending:
        say(f"attached {a.summary}")
    color = use_color(sys.stdout)
    # the conversation's images so far, and the latest reply, for /boxes
    shown, last_reply = [], None
    take_ctrl_c()
    enable_line_editing()
    say(WELCOME)
    while True:
        try:
            line = clean_line(_read_line(">> "))
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        stripped = line.strip()
        if _dropped_files(stripped):
            say(f"{stripped} is a file: /image PATH or /video PATH attaches it.")
            continue
        if stripped.startswith("/") and not stripped.startswith("//"):
            command, _, argument = stripped.partition(" ")
            command = ALIASES.get(command, command)
            if command == "/exit":
                return
            if command == "/help":
                say(
                    "\n".join(COMMANDS.values())
                    + "\nStart a message with // to send text beginning with /."
                )
            elif command == "/reset":
                session.reset()
                pending, shown, last_reply = [], [], None
                say("(conversation cleared)")
            elif command in ("/image", "/video"):
                pending += _attach_all(processor, argument, command[1:], media_kwargs)
            elif command == "/boxes":
                _save_boxes(argument, last_reply, shown)
            else:
                say(f"unknown command {command}; the commands are {', '.join(COMMANDS)}.")
            continue
        if stripped.startswith("//"):
            line = line.replace("/", "", 1)
        if not stripped and not pending:
            continue
        shown += [a.source for a in pending if a.kind == "image"]
        last_reply = _reply(session, line, pending, hide_thinking, color)
        pending = []


def _read_line(prompt: str) -> str:
    """`input`, its prompt on stderr when stdout is not the terminal (readline needs both)."""
    if sys.stdout.isatty():
        return input(prompt)
    sys.stderr.write(prompt)
    sys.stderr.flush()
    return input()


def _dropped_files(line: str) -> bool:
    """Whether a line is nothing but files dragged into the terminal (absolute paths)."""
    paths = user_paths(line) if line.startswith(("/", "~", "'", '"', "file://")) else []
    return bool(paths) and all(os.path.isabs(p) and Path(p).is_file() for p in paths)


def _attach_all(processor, argument: str, kind: str, media_kwargs: dict) -> list:
    if not argument.strip():
        say(
            f"usage: {COMMANDS['/' + kind].split('  ')[0].strip()} (quote or escape spaces; "
            "~ works)"
        )
        return []
    done = []
    try:
        for path in existing_paths(argument, kind):
            for a in attach(processor, path, kind, media_kwargs):
                done.append(a)
                say(f"attached {a.summary}")
    except Glm4vError as e:
        say(f"error: {e}")
    except KeyboardInterrupt:
        say("(not attached)")
    return done


def _save_boxes(argument: str, reply, images: list):
    """/boxes PATH: the last reply's boxes drawn onto the conversation's images (grounding.py)."""
    from .generation.grounding import draw_reply

    paths = user_paths(argument)
    if len(paths) != 1:
        say(f"usage: {COMMANDS['/boxes'].split('  ')[0].strip()} (quote or escape spaces; ~ works)")
    elif reply is None:
        say("no reply yet: /boxes draws the boxes of the last reply.")
    else:
        try:
            for line in draw_reply(paths[0], reply, images):
                say(line)
        except Glm4vError as e:
            say(f"error: {e}")


def _reply(session, line: str, attachments: list, hide_thinking: bool, color: bool):
    """One turn: stream the reply; Ctrl-C stops it and keeps the conversation. Returns the reply's
    text as generated (markers included), so far as it went."""
    display = ReplyDisplay(hide_thinking, color)
    status = StatusLine()
    if attachments:
        status.show(f"reading {', '.join(a.name for a in attachments)}")
    images = [a.source for a in attachments if a.kind == "image"]
    videos = [a.path for a in attachments if a.kind == "video"]
    reply = session.ask(line, images, videos, progress=reading_status(status, attachments))
    thought, raw = 0, []
    try:
        for response in reply:
            raw.append(response.text)
            text = display.feed(response.text)
            if display.thinking and hide_thinking:
                thought += 1
                status.show(f"thinking ({thought:,} tokens)")
            else:
                status.clear()
            sys.stdout.write(text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        reply.close()
        status.clear()
        _forget_unanswered(session)
        sys.stdout.write(display.finish() + "\n(stopped)\n")
        sys.stdout.flush()
        return "".join(raw)
    except Glm4vError as e:
        status.clear()
        _forget_unanswered(session)
        say(f"error: {e}")
        return None
    status.clear()
    sys.stdout.write(display.finish() + "\n")
    sys.stdout.flush()
    return "".join(raw)


def _forget_unanswered(session):
    """A question stopped before its reply began leaves the history as it was."""
    if session.messages and session.messages[-1]["role"] == "user":
        session.messages.pop()
