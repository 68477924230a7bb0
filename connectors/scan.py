"""Read an output back: the rows a sink holds (one per id, as resume sees them), and counts by column.

What the contact sheet, the Markdown export, `pagemill inspect` and the pre-run ownership check
need; kept apart from the sinks so that writing stays their only concern.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pyarrow as pa

from connectors.errors import SinkError
from connectors.redact import redact
from connectors.rows import ROW_FIELDS, plain_row
from connectors.sinks import PostgresSink, SqliteSink, _ParquetSink, _sqlite_quote


def iter_rows(sink: object, columns: list[str] | None = None) -> Iterator[dict]:
    """Every current row (Parquet: newest part wins), as row dicts restricted to `columns` (+ id).

    Columns an older output lacks come back as None.
    """
    cols = list(dict.fromkeys(["id", *(columns or ROW_FIELDS)]))
    if isinstance(sink, _ParquetSink):
        yield from _parquet_rows(sink, cols)
    elif isinstance(sink, SqliteSink):
        yield from _sqlite_rows(sink, cols)
    elif isinstance(sink, PostgresSink):
        yield from _postgres_rows(sink, cols)
    else:  # pragma: no cover - every sink kind is listed above
        raise TypeError(f"cannot read rows back from {type(sink).__name__}")


def counts(sink: object, columns: list[str]) -> Counter:
    """How many current rows have each combination of `columns` (tuples, in that order).

    SQL sinks count in the database (GROUP BY); a Parquet directory is read column-wise.
    """
    if isinstance(sink, SqliteSink):
        q = _sqlite_quote
        have = {r[1] for r in sink.conn.execute(f"PRAGMA table_info({q(sink.table)})")}
        sel = ", ".join(q(c) if c in have else "NULL" for c in columns)
        cur = sink.conn.execute(f"SELECT {sel}, COUNT(*) FROM {q(sink.table)} GROUP BY {sel}")
        return Counter({tuple(r[:-1]): r[-1] for r in cur})
    if isinstance(sink, PostgresSink):
        from psycopg import sql

        try:
            with sink.conn.transaction():
                have = _pg_columns(sink)
                sel = sql.SQL(", ").join(sql.Identifier(c) if c in have else sql.SQL("NULL") for c in columns)
                cur = sink.conn.execute(sql.SQL("SELECT {}, COUNT(*) FROM {} GROUP BY {}").format(
                    sel, sql.Identifier(sink.table), sel))
                return Counter({tuple(r[:-1]): r[-1] for r in cur})
        except sink._errors as e:
            raise SinkError(redact(f"{sink.name}: cannot read table {sink.table}: {e}")) from None
    return Counter(tuple(r.get(c) for c in columns) for r in iter_rows(sink, columns))


def _pg_columns(sink: PostgresSink) -> set[str]:
    return {r[0] for r in sink.conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema()"
        " AND table_name = %s", (sink.table,))}


def _parquet_rows(sink: _ParquetSink, cols: list[str]) -> Iterator[dict]:
    if hasattr(sink, "flush"):
        sink.flush()
    seen: set[str] = set()
    for part in reversed(sink._parts()):  # newest first: the first row seen for an id is the current one
        try:
            table: pa.Table = sink._read(part, cols)
        except (pa.ArrowInvalid, KeyError):  # a part written before a column existed
            table = sink._read(part)
        have = [c for c in cols if c in table.column_names]
        for row in table.select(have).to_pylist():
            if row["id"] in seen:
                continue
            seen.add(row["id"])
            yield plain_row({c: row.get(c) for c in cols})


def _sqlite_rows(sink: SqliteSink, cols: list[str]) -> Iterator[dict]:
    q = _sqlite_quote
    have = {r[1] for r in sink.conn.execute(f"PRAGMA table_info({q(sink.table)})")}
    sel = [c for c in cols if c in have]
    cur = sink.conn.execute(f"SELECT {', '.join(q(c) for c in sel)} FROM {q(sink.table)}")
    for values in cur:
        row = dict(zip(sel, values))
        yield {c: row.get(c) for c in cols}


def _postgres_rows(sink: PostgresSink, cols: list[str]) -> Iterator[dict]:
    from psycopg import sql

    try:
        with sink.conn.transaction():
            have = _pg_columns(sink)
            sel = [c for c in cols if c in have]
            query = sql.SQL("SELECT {} FROM {}").format(
                sql.SQL(", ").join(sql.Identifier(c) for c in sel), sql.Identifier(sink.table))
            with sink.conn.cursor(name="pagemill_scan") as cur:  # server-side: streams, never all rows in memory
                cur.itersize = 2000
                cur.execute(query)
                for values in cur:
                    row = dict(zip(sel, values))
                    yield plain_row({c: row.get(c) for c in cols})
    except sink._errors as e:
        raise SinkError(redact(f"{sink.name}: cannot read table {sink.table}: {e}")) from None
