"""Recognised regions -> Markdown and JSON, as the GLM-OCR SDK (0.1.5) writes them: contents
cleaned (runs of dots and underscores shortened, long repeats cut, inline formulas spaced),
titles as headings, formulas in $$ blocks with their numbers merged as \\tag, words broken by a
hyphen across text blocks joined, list items between bullets given one."""

import re
from collections import Counter
from copy import deepcopy

try:  # the SDK checks joined words with wordfreq when it is installed, else a pattern
    from wordfreq import zipf_frequency
except ImportError:
    zipf_frequency = None

KINDS = {
    "table": ("table",),
    "formula": ("display_formula", "inline_formula"),
    "image": ("chart", "image"),
}  # every other label is text
_INLINE = re.compile(r"(?<!\$)\$\s*((?:[^$\\]|\\.)+?)\s*\$(?!\$)")


def kind(label: str) -> str:
    for name, labels in KINDS.items():
        if label in labels:
            return name
    return "text"


def _cut_repeat(text: str, unit: int = 10, times: int = 10):
    """The text up to the end of the first unit repeated `times` times in a row, or None."""
    longest = len(text) // times
    if len(text) < unit * times or longest < unit:
        return None
    match = re.search(rf"(.{{{unit},{longest}}}?)\1{{{times - 1},}}", text, re.DOTALL)
    return text[: match.start()] + match.group(1) if match else None


def _cut_repeats(content: str) -> str:
    """A reply that loops: cut after the first repeat (of a run of text, or of one line)."""
    stripped = content.strip()
    if not stripped:
        return content
    if len(stripped) > 100 and (cut := _cut_repeat(stripped)) is not None:
        return cut
    lines = [line.strip() for line in content.split("\n") if line.strip()]
    if len(lines) >= 10:
        common, count = Counter(lines).most_common(1)[0]
        if count >= 10 and count / len(lines) >= 0.8:
            for i, line in enumerate(lines):
                if line != common:
                    continue
                if sum(1 for j in range(i, min(i + 3, len(lines))) if lines[j] == common) >= 3:
                    seen = 0
                    original = content.split("\n")
                    for k, raw in enumerate(original):
                        if raw.strip():
                            seen += 1
                            if seen == i + 1:
                                return "\n".join(original[: k + 1])
                break
    return content


def _space_inline_formulas(content: str) -> str:
    """`$ x $` -> `$x$`, with a space between it and a letter or digit beside it."""
    if "$" not in content:
        return content
    parts, last = [], 0
    for m in _INLINE.finditer(content):
        formula = m.group(1).strip()
        if not formula:
            continue
        before = content[last : m.start()]
        parts += [before + " " if before and before[-1].isalnum() else before, f"${formula}$"]
        if m.end() < len(content) and content[m.end()].isalnum():
            parts.append(" ")
        last = m.end()
    return "".join(parts + [content[last:]]) if parts else content


def clean(content) -> str:
    if content is None:
        return ""
    content = re.sub(r"^(\\t)+", "", content).lstrip()
    content = re.sub(r"(\\t)+$", "", content).rstrip()
    for run in (r"(\.)", r"(·)", r"(_)", r"(\\_)"):
        content = re.sub(run + r"\1{2,}", r"\1\1\1", content)
    if len(content) >= 2048:
        content = _cut_repeats(content)
    return _space_inline_formulas(content).strip()


def _format(content, label: str, native: str):
    """One region's content as Markdown."""
    if content is None:
        return None
    if label == "table" and content.startswith("<table") and content.endswith("</table>"):
        content = content.strip()
    elif label == "formula" and content.startswith("$$") and content.endswith("$$"):
        content = content.strip()
    else:
        content = clean(str(content))
    if native == "doc_title":
        content = "# " + re.sub(r"^#+\s*", "", content)
    elif native == "paragraph_title":
        if content.startswith(("- ", "* ")):
            content = content[2:].lstrip()
        content = "## " + re.sub(r"^#+\s*", "", content).lstrip()
    if label == "formula":
        if content.startswith(("$$", "\\[", "\\(")):
            content = content[2:].strip()
        if content.endswith(("$$", "\\]", "\\)")):
            content = content[:-2].strip()
        content = "$$\n" + content + "\n$$"
    if label == "text":
        if content.startswith("```") and not content.endswith("```"):
            content += "\n```"
        if content.startswith(("·", "•", "* ")):
            content = "- " + content[1:].lstrip()
        if m := re.match(r"^(\(|\（)(\d+|[A-Za-z])(\)|\）)(.*)$", content):
            content = f"({m.group(2)}) {m.group(4).lstrip()}"
        if m := re.match(r"^(\d+|[A-Za-z])(\.|\)|\）)(.*)$", content):
            sep = ")" if m.group(2) == "）" else m.group(2)
            content = f"{m.group(1)}{sep} {m.group(3).lstrip()}"
        content = re.sub(r"(?<!\n)\n(?!\n)", "\n\n", content)
    return content


def _number(text: str) -> str:
    text = text.strip()
    if (text[:1], text[-1:]) in (("(", ")"), ("（", "）")):
        return text[1:-1]
    return text


def _tagged(formula: dict, number: dict) -> dict:
    merged = deepcopy(formula)
    if formula.get("content", "").endswith("\n$$"):
        tag = _number(number.get("content", "").strip())
        merged["content"] = formula["content"][:-3] + f" \\tag{{{tag}}}\n$$"
    return merged


def merge_formula_numbers(blocks: list) -> list:
    """A formula number beside a formula (before or after) becomes its \\tag."""
    out, skip = [], set()
    for i, block in enumerate(blocks):
        if i in skip:
            continue
        after = blocks[i + 1] if i + 1 < len(blocks) else None
        if block.get("native_label") == "formula_number":
            if after is not None and after.get("label") == "formula":
                out.append(_tagged(after, block))
                skip.add(i + 1)
            continue
        if block.get("label") == "formula" and after is not None:
            if after.get("native_label") == "formula_number":
                out.append(_tagged(block, after))
                skip.add(i + 1)
                continue
        out.append(block)
    for i, block in enumerate(out):
        block["index"] = i
    return out


def _a_word(word: str) -> bool:
    word = word.strip().lower()
    if not word:
        return False
    if zipf_frequency is not None:
        try:
            return zipf_frequency(word, "en") >= 2.5
        except Exception:  # wordfreq's own failures: the pattern decides, as in the SDK
            pass
    return (
        bool(re.fullmatch(r"[a-z][a-z'\-]{2,30}", word)) and "--" not in word and "''" not in word
    )


def merge_text_blocks(blocks: list) -> list:
    """A text block ending in a hyphen joined with the first text block after it that starts in
    lower case (past any that do not, as the SDK looks), when the joined word is a word."""
    out, skip = [], set()
    for i, block in enumerate(blocks):
        if i in skip:
            continue
        content = block.get("content", "")
        if block.get("label") != "text" or not isinstance(content, str):
            out.append(block)
            continue
        head = content.rstrip()
        if not head.endswith("-"):
            out.append(block)
            continue
        merged = False
        for j in range(i + 1, len(blocks)):
            following = blocks[j].get("content", "")
            if blocks[j].get("label") != "text" or not isinstance(following, str):
                continue
            tail = following.lstrip()
            if not tail or not tail[0].islower():
                continue
            before, after = head[:-1].split(), tail.split()
            if before and after and _a_word(before[-1] + after[0]):
                joined = deepcopy(block)
                joined["content"] = head[:-1] + tail
                out.append(joined)
                skip.add(j)
                merged = True
            break
        if not merged:
            out.append(block)
    for i, block in enumerate(out):
        block["index"] = i
    return out


def bullet_points(blocks: list, within: float = 10.0) -> list:
    """A text block between two bullet items, left-aligned with both, becomes one too."""
    for i in range(1, len(blocks) - 1):
        prev, cur, nxt = blocks[i - 1], blocks[i], blocks[i + 1]
        if any(b.get("native_label") != "text" for b in (prev, cur, nxt)):
            continue
        if cur.get("content", "").startswith("- "):
            continue
        if not (
            prev.get("content", "").startswith("- ") and nxt.get("content", "").startswith("- ")
        ):
            continue
        boxes = [b.get("bbox_2d") or [] for b in (prev, cur, nxt)]
        if all(boxes) and all(abs(boxes[1][0] - b[0]) <= within for b in (boxes[0], boxes[2])):
            cur["content"] = "- " + cur["content"]
    return blocks


def page_blocks(regions: list) -> list:
    """One page's regions (dicts: index, label, content, bbox_2d, polygon) -> its JSON blocks."""
    blocks = []
    for region in sorted(regions, key=lambda r: r.get("index", 0)):
        block = deepcopy(region)
        block["native_label"] = block.get("label", "text")
        block["label"] = kind(block["native_label"])
        block["content"] = _format(block["content"], block["label"], block["native_label"])
        if block["label"] != "image" and not (block["content"] or "").strip():
            continue
        block["index"] = len(blocks)
        block.pop("task_type", None)
        block.pop("score", None)
        blocks.append(block)
    return bullet_points(merge_text_blocks(merge_formula_numbers(blocks)))


def page_markdown(blocks: list, page: int, pictures: list) -> str:
    """A page's Markdown; each picture block gets a link `imgs/NAME` (its name appended to
    `pictures`, numbered across the document)."""
    parts = []
    for block in blocks:
        if block["label"] == "image":
            name = f"cropped_page{page}_idx{len(pictures)}.jpg"
            block["image_path"] = f"imgs/{name}"
            parts.append(f"![Image {page}-{len(pictures)}](imgs/{name})")
            pictures.append((name, page, block.get("bbox_2d")))
        elif block["content"]:
            parts.append(block["content"])
    return "\n\n".join(parts)


def whole_page(content: str) -> list:
    """A page read without layout: one text block."""
    return [{"index": 0, "label": "text", "content": clean(content), "bbox_2d": None}]
