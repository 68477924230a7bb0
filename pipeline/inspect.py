"""`pagemill inspect OUTPUT`: what an output holds, without a query tool: counts by status, finish
reason, job and config_hash, and the latest errors."""

from __future__ import annotations

from collections import Counter

from connectors.scan import iter_rows


def inspect_output(sink: object, *, errors: int = 10) -> str:
    by: dict[str, Counter] = {k: Counter() for k in ("status", "finish_reason", "job", "config_hash")}
    latest: list[dict] = []
    total = 0
    for r in iter_rows(sink, ["source", "page", "status", "error", "finish_reason", "job", "config_hash",
                              "created_at"]):
        total += 1
        for k, c in by.items():
            c[r.get(k) or "-"] += 1
        if r.get("status") == "error":
            latest.append(r)
            if len(latest) > 4 * errors:  # keep it bounded: the newest `errors` survive the trims
                latest = sorted(latest, key=lambda x: str(x.get("created_at")), reverse=True)[:errors]
    lines = [f"{total} row(s)"]
    for k, c in by.items():
        lines.append(f"by {k}: " + (", ".join(f"{n} {v}" for v, n in c.most_common()) or "-"))
    latest = sorted(latest, key=lambda x: str(x.get("created_at")), reverse=True)[:errors]
    if latest:
        lines.append(f"latest {len(latest)} error(s):")
        for r in latest:
            page = f" p.{r['page']}" if r.get("page") else ""
            lines.append(f"  {r.get('created_at')}  {r['id']}  {r.get('source')}{page}: {r.get('error')}")
    return "\n".join(lines)
