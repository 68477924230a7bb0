"""The catalog job's HTML contact sheet: thumbnails with their boxes, written as rows stream in.

One self-contained file (thumbnails inlined as data URIs, boxes as SVG), so it cannot reference
or write anything outside its own path; every model-produced string is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any, TextIO

_HEAD = """<!doctype html>
<html><head><meta charset="utf-8"><title>pagemill catalog contact sheet</title>
<style>
body{font-family:sans-serif;margin:1em;background:#fafafa}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:280px;background:#fff;border:1px solid #ddd;padding:6px}
figcaption{font-size:12px;word-wrap:break-word}
.src{color:#666}
svg text{font-size:10px;fill:#e00}
</style></head><body>
<h1>pagemill catalog contact sheet</h1>
<div class="grid">
"""
_TAIL = "</div>\n<p>{n} item(s){more}</p>\n</body></html>\n"


class ContactSheet:
    def __init__(self, path: str | Path, max_items: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_items = max_items
        self.count = 0
        self.skipped = 0
        # Built under a temporary name: a resumed run with nothing new keeps the previous sheet.
        self._tmp = self.path.with_name("." + self.path.name + ".tmp")
        self._fh: TextIO = open(self._tmp, "w", encoding="utf-8")
        self._fh.write(_HEAD)

    def add(self, row: dict[str, Any], thumb_png: bytes) -> None:
        if not thumb_png or self.count >= self.max_items:
            self.skipped += bool(thumb_png)
            return
        self.count += 1
        self._fh.write(figure(row, thumb_png))

    def close(self) -> None:
        if self._fh.closed:
            return
        more = f"; {self.skipped} more not shown (contact_sheet_max)" if self.skipped else ""
        self._fh.write(_TAIL.format(n=self.count, more=more))
        self._fh.close()
        if self.count or not self.path.exists():
            os.replace(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)


def _thumb_size(png: bytes) -> tuple[int, int]:
    # PNG IHDR: width and height are the big-endian u32s at bytes 16..24
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def figure(row: dict[str, Any], thumb_png: bytes) -> str:
    e = html.escape
    tw, th = _thumb_size(thumb_png)
    sx = tw / row["width"] if row.get("width") else 1.0
    sy = th / row["height"] if row.get("height") else 1.0
    items = json.loads(row["items_json"])["items"] if row.get("items_json") else []
    rects = []
    for it in items:
        x1, y1, x2, y2 = it["box"]
        rects.append(
            f'<rect x="{x1 * sx:.1f}" y="{y1 * sy:.1f}" width="{max(x2 - x1, 0) * sx:.1f}" '
            f'height="{max(y2 - y1, 0) * sy:.1f}" fill="none" stroke="#e00" stroke-width="1.5"/>'
            f'<text x="{x1 * sx + 2:.1f}" y="{y1 * sy + 10:.1f}">{e(it["label"][:40])}</text>'
        )
    data = base64.b64encode(thumb_png).decode("ascii")
    caption = (row.get("text") or "")[:300]
    labels = ", ".join(e(it["label"]) for it in items)
    page = f" p.{row['page']}" if row.get("page") else ""
    return (
        f'<figure><svg width="{tw}" height="{th}" viewBox="0 0 {tw} {th}" xmlns="http://www.w3.org/2000/svg">'
        f'<image href="data:image/png;base64,{data}" width="{tw}" height="{th}"/>{"".join(rects)}</svg>'
        f'<figcaption><div class="src">{e(row["source"])}{e(page)}</div>'
        f"<div>{e(caption)}</div><div><b>items:</b> {labels or '-'}</div></figcaption></figure>\n"
    )
