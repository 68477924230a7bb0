"""The HTML contact sheet: a QA page of a whole output (catalog always, digitize when asked).

Rebuilt from the sink after each run, so it shows every item of the output, failed ones and those
of earlier runs included, under a header with the job, model and counts. One self-contained file
(thumbnails inlined as data URIs, boxes as SVG, filters and sort in a small inline script); every
string that comes from a model or an input is HTML-escaped. Thumbnails of earlier runs are carried
over from the previous sheet at the same path; items without one say so.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel

MIN_THUMB = 160  # px: small images are drawn at least this big
CARD_COLUMNS = ["source", "page", "status", "error", "text", "items_json", "boxes_json", "width", "height",
                "finish_reason", "created_at"]
_PREVIOUS = re.compile(r'<figure[^>]*\sdata-id="([^"]+)"[^>]*>.*?<image data-thumb href="data:image/png;base64,'
                       r'([A-Za-z0-9+/=]+)"', re.S)


class SheetHeader(BaseModel):
    job: str
    model: str
    smoke_model: bool
    started_at: str
    output: str
    skipped: int = 0  # items of this run already in the output


class SheetBuilder:
    """Keeps this run's thumbnails (at most `max_items`) until `write` renders the sheet from the sink's rows."""

    def __init__(self, path: str | Path, max_items: int) -> None:
        self.path = Path(path)
        self.max_items = max_items
        self.thumbs: dict[str, bytes] = {}

    def add(self, row: dict[str, Any], thumb_png: bytes) -> None:
        if thumb_png and len(self.thumbs) < self.max_items:
            self.thumbs[row["id"]] = bytes(thumb_png)

    def write(self, rows: Any, header: SheetHeader) -> Path:
        """Render `rows` (every current row of the output) and replace the sheet atomically."""
        thumbs = previous_thumbs(self.path) | self.thumbs
        ok_with, ok_without, errors = [], [], []
        n_ok = n_err = 0
        for r in rows:
            if r["status"] == "ok":
                n_ok += 1
                bucket = ok_with if r["id"] in thumbs else ok_without
                if len(bucket) < self.max_items:
                    bucket.append(r)
            else:
                n_err += 1
                if len(errors) < self.max_items:
                    errors.append(r)
        errors.sort(key=_order)
        cards = (errors + sorted(ok_with, key=_order) + sorted(ok_without, key=_order))[: self.max_items]
        body = "".join(card(r, thumbs.get(r["id"])) for r in cards)
        hidden = n_ok + n_err - len(cards)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name("." + self.path.name + ".tmp")
        tmp.write_text(page(header, n_ok, n_err, len(cards), hidden, body), encoding="utf-8")
        os.replace(tmp, self.path)
        return self.path


def _order(r: dict) -> tuple:
    return (r.get("source") or "", r.get("page") or 0)


def previous_thumbs(path: Path) -> dict[str, bytes]:
    """Thumbnails of the sheet this one replaces, by row id (items of earlier runs keep their picture)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    out = {}
    for rid, data in _PREVIOUS.findall(text):
        try:
            out[html.unescape(rid)] = base64.b64decode(data, validate=True)
        except ValueError:
            continue
    return out


def _thumb_size(png: bytes) -> tuple[int, int]:
    # PNG IHDR: width and height are the big-endian u32s at bytes 16..24
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _link(source: str) -> str:
    e = html.escape
    if source.startswith(("http://", "https://")):
        return f'<a href="{e(source)}">{e(source)}</a>'
    if source.startswith("/"):
        return f'<a href="file://{e(quote(source))}">{e(source)}</a>'
    return e(source)


def _items(r: dict) -> tuple[list[dict], list[str]]:
    if r.get("items_json"):
        rec = json.loads(r["items_json"])
        return rec.get("items") or [], rec.get("label_text") or []
    return (json.loads(r["boxes_json"]) if r.get("boxes_json") else []), []


def card(r: dict, thumb: bytes | None) -> str:
    e = html.escape
    items, label_text = _items(r) if r["status"] == "ok" else ([], [])
    page_no = f" p.{r['page']}" if r.get("page") else ""
    search = " ".join([r.get("source") or "", r.get("text") or "", r.get("error") or "", r["id"],
                       *(str(it.get("label", "")) for it in items), *label_text]).lower()
    attrs = (f'class="card {e(r["status"])}" data-id="{e(r["id"])}" data-status="{e(r["status"])}" '
             f'data-items="{len(items)}" data-source="{e((r.get("source") or "") + page_no)}" '
             f'data-search="{e(search[:2000])}"')
    if r["status"] != "ok":
        pic = f'<div class="err">error: {e(r.get("error") or "failed")}</div>'
    elif thumb:
        pic = _svg(r, thumb, items)
    else:
        pic = '<div class="nothumb">no thumbnail (written by an earlier run)</div>'
    labels = ", ".join(e(str(it.get("label", ""))) for it in items) or "-"
    extra = (f'<div><b>label text:</b> {", ".join(e(t) for t in label_text)}</div>' if label_text else "")
    finish = f' · finish: {e(r["finish_reason"])}' if r.get("finish_reason") else ""
    return (
        f"<figure {attrs}>{pic}<figcaption><div class=\"src\">{_link(r.get('source') or '')}{e(page_no)}</div>"
        f'<div class="id">id {e(r["id"])}{finish}</div>'
        f"<div class=\"text\">{e((r.get('text') or '')[:300])}</div><div><b>items:</b> {labels}</div>{extra}"
        "</figcaption></figure>\n"
    )


def _svg(r: dict, thumb: bytes, items: list[dict]) -> str:
    e = html.escape
    tw, th = _thumb_size(thumb)
    scale = max(1.0, MIN_THUMB / max(tw, th, 1))
    sx = tw / r["width"] if r.get("width") else 1.0
    sy = th / r["height"] if r.get("height") else 1.0
    rects = []
    for it in items:
        try:
            x1, y1, x2, y2 = (float(v) for v in it["box"])
        except (KeyError, TypeError, ValueError):
            continue
        rects.append(
            f'<rect x="{x1 * sx:.1f}" y="{y1 * sy:.1f}" width="{max(x2 - x1, 0) * sx:.1f}" '
            f'height="{max(y2 - y1, 0) * sy:.1f}" fill="none" stroke="#e00" stroke-width="1.5"/>'
            f'<text x="{x1 * sx + 2:.1f}" y="{y1 * sy + 10:.1f}">{e(str(it.get("label", ""))[:40])}</text>'
        )
    data = base64.b64encode(thumb).decode("ascii")
    return (f'<svg width="{tw * scale:.0f}" height="{th * scale:.0f}" viewBox="0 0 {tw} {th}" '
            f'xmlns="http://www.w3.org/2000/svg"><image data-thumb href="data:image/png;base64,{data}" '
            f'width="{tw}" height="{th}"/>{"".join(rects)}</svg>')


_STYLE = """
body{font-family:sans-serif;margin:1em;background:#fafafa}
header{margin-bottom:1em} .warn{background:#fee;border:1px solid #c00;padding:6px;color:#900}
.counts span{margin-right:1em} .controls{margin:.5em 0;display:flex;gap:1em;flex-wrap:wrap;align-items:center}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:280px;background:#fff;border:1px solid #ddd;padding:6px}
figure.error{border-color:#c00;background:#fff6f6}
figcaption{font-size:12px;word-wrap:break-word} .src,.id{color:#666}
.err{color:#900;font-size:13px;padding:8px 0;word-wrap:break-word} .nothumb{color:#999;font-size:12px;padding:8px 0}
svg text{font-size:10px;fill:#e00}
"""

_SCRIPT = """
(function(){
  var grid=document.getElementById('grid'), cards=Array.prototype.slice.call(grid.children);
  var st=document.getElementById('f-status'), it=document.getElementById('f-items'),
      q=document.getElementById('f-q'), so=document.getElementById('f-sort'), shown=document.getElementById('shown');
  var h=new URLSearchParams(location.hash.slice(1));
  if(h.get('status')) st.value=h.get('status'); if(h.get('items')==='1') it.checked=true;
  if(h.get('q')) q.value=h.get('q'); if(h.get('sort')) so.value=h.get('sort');
  function apply(){
    var s=st.value, needItems=it.checked, text=q.value.toLowerCase(), n=0;
    var key={source:function(c){return c.dataset.source;}, status:function(c){return c.dataset.status+c.dataset.source;},
             items:function(c){return ('00000'+(99999-+c.dataset.items)).slice(-5)+c.dataset.source;}}[so.value];
    cards.slice().sort(function(a,b){var x=key(a),y=key(b);return x<y?-1:x>y?1:0;}).forEach(function(c){grid.appendChild(c);});
    cards.forEach(function(c){
      var ok=(s==='all'||c.dataset.status===s)&&(!needItems||+c.dataset.items>0)&&(!text||c.dataset.search.indexOf(text)>=0);
      c.hidden=!ok; if(ok) n++;
    });
    shown.textContent=String(n);
  }
  [st,it,q,so].forEach(function(el){el.addEventListener('input',apply);el.addEventListener('change',apply);});
  apply();
})();
"""


def page(h: SheetHeader, n_ok: int, n_err: int, n_cards: int, hidden: int, body: str) -> str:
    e = html.escape
    warn = ('<p class="warn">Model "smoke" is a randomly initialised test checkpoint: every text and box on this '
            "page is random, not a real result.</p>") if h.smoke_model else ""
    more = f" ({hidden} more not shown: contact_sheet_max)" if hidden else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>pagemill {e(h.job)} contact sheet</title>
<style>{_STYLE}</style></head><body>
<header><h1>pagemill {e(h.job)} contact sheet</h1>{warn}
<div>output <code>{e(h.output)}</code> · model <code>{e(h.model)}</code> · run started {e(h.started_at)}</div>
<div class="counts"><span>ok: <b id="n-ok">{n_ok}</b></span><span>error: <b id="n-error">{n_err}</b></span>
<span>skipped (already done) this run: <b id="n-skipped">{h.skipped}</b></span>
<span>shown: <b id="shown">{n_cards}</b> of {n_cards}{more}</span></div>
<div class="controls">
<label>status <select id="f-status"><option value="all">all</option><option value="ok">ok</option>
<option value="error">error</option></select></label>
<label><input type="checkbox" id="f-items"> has items</label>
<label>search <input type="search" id="f-q" placeholder="text, label, source, id"></label>
<label>sort <select id="f-sort"><option value="status">errors first</option><option value="source">source</option>
<option value="items">most items</option></select></label>
</div></header>
<div class="grid" id="grid">
{body}</div>
<script>{_SCRIPT}</script>
</body></html>
"""
