"""Parse DeepSeek-VL2 grounding output into pixel boxes.

The model writes `<|ref|>label<|/ref|><|det|>[[x1,y1,x2,y2],...]<|/det|>` with integer
coordinates 0..999 relative to the image. Real outputs are often malformed (odd-length
or nested lists, runaway "9999...", a missing `<|/det|>` at the token limit, a det with no
ref), so parsing is a single forgiving left-to-right scan that never raises: a page's text
is worth keeping even when its boxes are not.
"""
from __future__ import annotations

import re
from typing import Any

REF, REF_END, DET, DET_END, GROUNDING = "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>"
_TAG = re.compile(r"<\|(/?)(ref|det)\|>")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
# What an unterminated det block can contain before ordinary text resumes.
_COORDS = re.compile(r"[\s\d,.\[\]-]*")


def _coord(s: str) -> float:
    """Clamp to 0..999 without int() on a runaway digit string (Python caps those at 4300 digits)."""
    if s.startswith("-"):
        return 0.0
    whole = s.split(".")[0].lstrip("0")
    if len(whole) > 3:
        return 999.0
    return min(float(s), 999.0)


def _boxes(block: str, label: str, width: float, height: float) -> list[dict[str, Any]]:
    """Every run of numbers between brackets is a list; read it 4 at a time, drop leftovers."""
    out = []
    for group in re.split(r"[\[\]]", block):
        vals = [_coord(n) for n in _NUMBER.findall(group)]
        for i in range(0, len(vals) - 3, 4):
            x1, y1, x2, y2 = vals[i : i + 4]
            x1, x2 = sorted((x1 / 999 * width, x2 / 999 * width))
            y1, y2 = sorted((y1 / 999 * height, y2 / 999 * height))
            out.append({"label": label, "box": [round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2)]})
    return out


def parse_grounding(text: str, width: float, height: float) -> list[dict[str, Any]]:
    """Boxes in pixels as [{"label", "box": [x1, y1, x2, y2]}] with x1 <= x2, y1 <= y2.

    A det takes the label of the ref before it (since the previous det), else "".
    An unterminated ref or det ends at the next tag or at the end of the text.
    """
    try:
        if not isinstance(text, str):
            return []
        w, h = max(float(width), 0.0), max(float(height), 0.0)
        boxes: list[dict[str, Any]] = []
        label = ""
        ref_start: int | None = None
        det_start: int | None = None
        det_label = ""
        for m in _TAG.finditer(text):
            closing, kind = m.group(1) == "/", m.group(2)
            if det_start is not None and not (closing and kind == "det"):
                boxes += _boxes(text[det_start : m.start()], det_label, w, h)  # det cut short by a new tag
                det_start = None
            if kind == "ref" and not closing:
                ref_start = m.end()
            elif kind == "ref" and ref_start is not None:
                label, ref_start = text[ref_start : m.start()].strip(), None
            elif kind == "det" and not closing:
                if ref_start is not None:  # "<|ref|>cat<|det|>...": the ref was never closed
                    label, ref_start = text[ref_start : m.start()].strip(), None
                det_start, det_label, label = m.end(), label, ""
            elif kind == "det" and det_start is not None:
                boxes += _boxes(text[det_start : m.start()], det_label, w, h)
                det_start = None
        if det_start is not None:  # never closed: read only the coordinate-looking prefix
            boxes += _boxes(text[det_start : _COORDS.match(text, det_start).end()], det_label, w, h)
        return boxes
    except Exception:  # never let one bad generation take down a batch
        return []


def strip_grounding(text: str) -> str:
    """Readable text: tags and coordinate blocks removed, ref labels kept."""
    if not isinstance(text, str):
        return ""
    out: list[str] = []
    i = 0
    while True:
        j = text.find(DET, i)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j])
        start = j + len(DET)
        nxt = text.find("<|", start)  # the block is terminated only if the next tag closes it
        if nxt >= 0 and text.startswith(DET_END, nxt):
            i = nxt + len(DET_END)
        else:  # unterminated: drop only what looks like coordinates
            i = _COORDS.match(text, start).end()
            while i > start and text[i - 1].isspace():  # keep the space before the text that follows
                i -= 1
    s = "".join(out)
    for tag in (REF, REF_END, DET_END, GROUNDING):
        s = s.replace(tag, "")
    return s
