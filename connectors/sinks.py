"""Where output rows go: a Parquet directory (local or S3), SQLite or PostgreSQL.

All sinks upsert on `id` (last write wins) and answer `done_ids` for resume. A Parquet directory
appends part files (the newest part wins) until `compact()` drops the rows that newer parts supersede.
"""

import hashlib
import io
import logging
import os
import re
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from botocore.exceptions import BotoCoreError, ClientError
from urllib3.exceptions import HTTPError as URLLib3Error

from connectors.errors import SinkError
from connectors.redact import redact
from connectors.rows import JSON_FIELDS, ROW_ARROW_SCHEMA, ROW_FIELDS, TIMESTAMP_FIELDS, OutputRow, arrow_table
from connectors.s3 import READ_ATTEMPTS, S3Options, get_object_bytes, s3_client, split_s3_url, with_retries

log = logging.getLogger(__name__)

_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# The id suffix of a row for an input that could not be read (no content to hash). One input, one row:
# once the input is read, its content rows replace that row (`write` in SQL, `compact` in Parquet).
UNREADABLE_SUFFIX = ":unreadable"
_DONE_COLUMNS = ["id", "status"]


class Sink(Protocol):
    def done_ids(self, include_errors: bool = False) -> set[str]: ...
    def done_id_chunks(self) -> Iterator[tuple[list[str] | pa.Array, list[str] | pa.Array]]: ...
    def write(self, rows: list[dict]) -> None: ...
    def close(self) -> None: ...
    def compact(self) -> int: ...


def validate_table_name(table: str) -> str:
    if not isinstance(table, str) or not _TABLE_NAME.fullmatch(table):
        raise ValueError(f"invalid table name {table!r}: must match {_TABLE_NAME.pattern}")
    return table


def _validated(rows: Iterable[dict | OutputRow]) -> list[dict]:
    """Validate and de-duplicate a batch (last row per id wins, like the upsert)."""
    out: dict[str, dict] = {}
    for r in rows:
        row = r if isinstance(r, OutputRow) else OutputRow.model_validate(r)
        out.pop(row.id, None)
        out[row.id] = row.model_dump()
    return list(out.values())


def _done(chunks: Iterable[tuple[Iterable[str], Iterable[str]]], include_errors: bool) -> set[str]:
    latest: dict[str, str] = {}
    for ids, statuses in chunks:
        ids = ids.to_pylist() if isinstance(ids, (pa.Array, pa.ChunkedArray)) else ids
        statuses = statuses.to_pylist() if isinstance(statuses, (pa.Array, pa.ChunkedArray)) else statuses
        for id_, status in zip(ids, statuses):
            latest[id_] = status
    return {i for i, s in latest.items() if include_errors or s == "ok"}


# Rows per chunk when a SQL sink streams its (id, status) pairs for resume.
_DONE_CHUNK = 100_000


def open_sink(dst: str, *, table: str = "pagemill_rows", s3: S3Options | None = None,
              password_env: str | None = None, part_bytes: int = 0, part_seconds: float = 0.0) -> "Sink":
    """Open `dst`: `sqlite:///rel.db`, `sqlite:////abs.db`, `postgresql://…`, or a directory (local, `file://`, `s3://`).

    `table` names the SQL table; a Parquet directory is the table itself and ignores it. `password_env` names
    the environment variable holding the PostgreSQL password (so it never appears in a process list). Parquet rows
    are buffered into one part of about `part_bytes` (or `part_seconds` old, whichever first; 0 = a
    part per write); `close()` and `compact()` write what is buffered.
    """
    sink = _open(dst, table, s3, password_env)
    if isinstance(sink, _ParquetSink):
        sink.part_bytes, sink.part_seconds = part_bytes, part_seconds
    return sink


def _open(dst: str, table: str, s3: S3Options | None, password_env: str | None) -> "Sink":
    validate_table_name(table)
    if dst.startswith("sqlite:"):
        return SqliteSink(dst, table)
    if dst.startswith(("postgresql://", "postgres://")):
        return PostgresSink(dst, table, password_env=password_env)
    if dst.startswith("s3://"):
        return S3ParquetSink(dst, s3)
    path = dst[len("file://"):] if dst.startswith("file://") else dst
    if "://" in path:
        raise ValueError(f"unsupported sink {redact(dst)!r}: use a directory, s3://, sqlite:/// or postgresql://")
    if path.lower().endswith((".db", ".sqlite", ".sqlite3")):
        raise ValueError(f"{path!r} looks like a database file; write sqlite:///{path} for SQLite")
    return LocalParquetSink(path)


# ---------------------------------------------------------------- Parquet


_last_part_ns = 0


def _part_name() -> str:
    """Time first, strictly increasing in this process, so name order is write order (a later part wins)."""
    global _last_part_ns
    _last_part_ns = max(time.time_ns(), _last_part_ns + 1)
    stamp = datetime.fromtimestamp(_last_part_ns // 10**9, timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"part-{stamp}{_last_part_ns % 10**9:09d}Z-{uuid.uuid4().hex}.parquet"


def _table(rows: list[dict]) -> pa.Table:
    return arrow_table(rows)


def _approx_bytes(row: dict) -> int:
    """Cheap size of a row in a part (Parquet compresses text, so parts end up at most this big)."""
    return 64 + sum(len(v) if isinstance(v, str) else 8 for v in row.values() if v is not None)


def _is_part(name: str) -> bool:
    return name.endswith(".parquet") and not name.startswith((".", "_"))


def _without(table: pa.Table, ids: set[str]) -> pa.Table:
    return table.filter(pc.invert(pc.is_in(table.column("id"), value_set=pa.array(list(ids), pa.string()))))


class _Closes:
    """`with open_sink(dst) as sink:` closes the sink however the block ends."""

    def close(self) -> None:  # pragma: no cover - every sink defines its own
        raise NotImplementedError

    def compact(self) -> int:
        """SQL sinks upsert, so they never hold superseded rows; the Parquet sinks override this."""
        return 0

    def __enter__(self) -> "_Closes":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ParquetSink(_Closes):
    """Part files of buffered rows; the newest part wins until `compact()` drops the rows it supersedes.

    Subclasses say where parts live: `_parts` (oldest first), `_new_part`, `_read`, `_put` (atomic), `_delete`.
    Rows are buffered up to `part_bytes` / `part_seconds` so that a long job makes parts of a useful size.
    """

    part_bytes: int = 0
    part_seconds: float = 0.0
    _buffer: list[dict] | None = None
    _buffer_bytes: int = 0
    _buffer_since: float = 0.0

    def done_ids(self, include_errors: bool = False) -> set[str]:
        return _done(self.done_id_chunks(), include_errors)

    def done_id_chunks(self) -> Iterator[tuple[pa.Array, pa.Array]]:
        """(ids, statuses) per part, oldest part first: a later row for an id supersedes an earlier one."""
        for part in self._parts():
            t = self._read(part, _DONE_COLUMNS)
            yield t.column("id"), t.column("status")
        if self._buffer:  # rows not yet flushed into a part are the newest
            yield [r["id"] for r in self._buffer], [r["status"] for r in self._buffer]

    def write(self, rows: list[dict]) -> None:
        rows = _validated(rows)
        if not rows:
            return
        if self._buffer is None:
            self._buffer, self._buffer_bytes, self._buffer_since = [], 0, time.monotonic()
        self._buffer.extend(rows)
        self._buffer_bytes += sum(_approx_bytes(r) for r in rows)
        if self._buffer_bytes >= self.part_bytes or time.monotonic() - self._buffer_since >= self.part_seconds:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one part (the last row per id wins, as in the upsert)."""
        rows, self._buffer, self._buffer_bytes = self._buffer, None, 0
        if rows:  # taken first: a failed write raises to the caller, it is not retried with the next batch
            self._put(self._new_part(), _table(_validated(rows)))

    def compact(self) -> int:
        """Leave one row per id (the newest) by rewriting older parts in place; return how many changed.

        Also on an output this run created: identical inputs share an id and may land in different parts.
        Only rows a newer part supersedes are dropped and each rewrite replaces its part atomically, so a
        crash at any point loses nothing, "newest part wins" keeps reading right, and a second call finishes.
        """
        self.flush()
        newer: set[str] = set()
        changed = 0
        with_unreadable = []
        for part in reversed(self._parts()):
            ids = self._read(part, ["id"]).column("id").to_pylist()
            if stale := newer.intersection(ids):
                changed += self._rewrite_without(part, stale)
            newer.update(ids)
            if any(i.endswith(UNREADABLE_SUFFIX) for i in ids):
                with_unreadable.append(part)
        if with_unreadable:
            changed += self._drop_unreadable_rows_of_read_inputs(with_unreadable)
        return changed

    def _rewrite_without(self, part, ids: set[str]) -> int:
        kept = _without(self._read(part), ids)
        if kept.num_rows:
            self._put(part, kept)
        else:
            self._delete(part)
        return 1

    def _drop_unreadable_rows_of_read_inputs(self, candidates: list) -> int:
        """An unreadable row whose input has content rows now (same `source`) is stale: drop it.

        Rare (only outputs that hold unreadable rows pay for it): the unreadable rows' sources are few,
        so the scan of every part's `source` column checks membership in that small set.
        """
        parts = self._parts()
        present = set(parts)
        candidates = [p for p in candidates if p in present]  # the loop above may have deleted some
        unreadable: dict[str, set[str]] = {}  # source -> its unreadable ids
        for part in candidates:
            t = self._read(part, ["id", "source"])
            mask = pc.ends_with(t.column("id"), UNREADABLE_SUFFIX)
            for i, src in zip(pc.filter(t.column("id"), mask).to_pylist(), pc.filter(t.column("source"), mask).to_pylist()):
                unreadable.setdefault(src, set()).add(i)
        wanted = pa.array(list(unreadable), pa.string())
        read_sources: set[str] = set()
        for part in parts:
            t = self._read(part, ["id", "source"])
            hit = pc.and_(pc.invert(pc.ends_with(t.column("id"), UNREADABLE_SUFFIX)),
                          pc.is_in(t.column("source"), value_set=wanted))
            read_sources.update(pc.filter(t.column("source"), hit).to_pylist())
        drop = set().union(*(unreadable[s] for s in read_sources)) if read_sources else set()
        changed = 0
        for part in candidates if drop else []:
            if drop.intersection(self._read(part, ["id"]).column("id").to_pylist()):
                changed += self._rewrite_without(part, drop)
        return changed

    def close(self) -> None:
        self.flush()


TMP_DIR = ".pagemill-tmp"


class LocalParquetSink(_ParquetSink):
    """Each part is written as a `.tmp` in a hidden subfolder and renamed, so readers never see half a file."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SinkError(f"{root}: cannot create output directory: {e.strerror or e}") from None
        try:  # an existing output we may not write to: say so now, not after the first batch is generated
            with tempfile.TemporaryFile(dir=self.root, prefix=".pagemill-probe-"):
                pass
        except OSError as e:
            raise SinkError(f"{root}: output directory is not writable: {e.strerror or e}") from None

    def _parts(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_file() and _is_part(p.name))

    def _new_part(self) -> Path:
        return self.root / _part_name()

    def _read(self, part: Path, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(part, columns=columns)

    def _put(self, final: Path, table: pa.Table) -> None:
        # In a hidden subfolder: no glob a data tool uses (DIR/*, DIR/**/*.parquet) and no Arrow/Spark
        # listing finds it, so a crash mid-write leaves nothing but Parquet where readers look.
        tmp = self.root / TMP_DIR / (final.name + ".tmp")
        try:
            tmp.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as fh:
                pq.write_table(table, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException as e:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # the directory that refused the write may refuse the cleanup too
                pass
            if isinstance(e, OSError):
                raise SinkError(f"{self.root}: cannot write {final.name}: {e.strerror or e}") from None
            raise
        finally:
            try:
                tmp.parent.rmdir()  # only when empty: a concurrent writer's temp file stays
            except OSError:
                pass

    def _delete(self, part: Path) -> None:
        try:
            part.unlink()
        except OSError as e:
            raise SinkError(f"{self.root}: cannot delete {part.name}: {e.strerror or e}") from None


class S3ParquetSink(_ParquetSink):
    """Each part is one `put_object`: an S3 PUT (also over an existing key) is atomic, so no temp key is needed."""

    def __init__(self, url: str, s3: S3Options | None = None) -> None:
        self.url = url.rstrip("/")
        self.bucket, prefix = split_s3_url(self.url)
        self.prefix = prefix + "/" if prefix else ""
        self.client = s3_client(s3)

    def _parts(self) -> list[str]:
        def listing() -> list[str]:
            keys: list[str] = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(self.prefix):]
                    if "/" not in rel and _is_part(rel):
                        keys.append(obj["Key"])
            return keys

        try:
            return sorted(with_retries(f"{self.url}: listing", listing))
        except (ClientError, BotoCoreError, URLLib3Error, OSError) as e:
            raise SinkError(redact(f"{self.url}: cannot list output: {e}")) from None

    def _new_part(self) -> str:
        return self.prefix + _part_name()

    def _read(self, key: str, columns: list[str] | None = None) -> pa.Table:
        try:
            body = get_object_bytes(self.client, self.bucket, key)
        except (ClientError, BotoCoreError, URLLib3Error, OSError) as e:
            raise SinkError(redact(f"s3://{self.bucket}/{key}: cannot read after {READ_ATTEMPTS} attempts: {e}")) from None
        return pq.read_table(io.BytesIO(body), columns=columns)

    def _put(self, key: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=buf.getvalue())
        except (ClientError, BotoCoreError) as e:
            raise SinkError(redact(f"s3://{self.bucket}/{key}: cannot write: {e}")) from None

    def _delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as e:
            raise SinkError(redact(f"s3://{self.bucket}/{key}: cannot delete: {e}")) from None


# ---------------------------------------------------------------- SQL


_SQL_TYPES = {"string": "TEXT", "int64": "BIGINT", "double": "DOUBLE PRECISION"}
# PostgreSQL stores timestamps and JSON typed; SQLite has no such types (ISO text, JSON text).
_PG_TYPES = {**{k: "TIMESTAMPTZ" for k in TIMESTAMP_FIELDS}, **{k: "JSONB" for k in JSON_FIELDS}}


def _sql_type(f: pa.Field, overrides: dict[str, str]) -> str:
    return overrides.get(f.name) or _SQL_TYPES.get(str(f.type), "TEXT")


def _column_defs(quote, overrides: dict[str, str] | None = None) -> str:
    defs = []
    for f in ROW_ARROW_SCHEMA:
        sql_type = _sql_type(f, overrides or {})
        null = "" if f.nullable else " NOT NULL"
        defs.append(f"{quote(f.name)} {sql_type}{null}" + (" PRIMARY KEY" if f.name == "id" else ""))
    return ", ".join(defs)


def _missing_columns(have: set[str], overrides: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """Nullable columns a table made by an older version lacks (added with ALTER TABLE, never dropped)."""
    return [(f.name, _sql_type(f, overrides or {})) for f in ROW_ARROW_SCHEMA if f.name not in have and f.nullable]


def _sqlite_quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class SqliteSink(_Closes):
    """SQLite in WAL mode so readers (dashboards, resume checks) do not block the writer."""

    def __init__(self, dsn: str, table: str) -> None:
        self.dsn = dsn
        self.table = validate_table_name(table)
        path = _sqlite_path(dsn)
        try:
            if path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            # check_same_thread off: the driver may open the sink in one thread and write from another
            # (never concurrently).
            self.conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            with self.conn:
                self.conn.execute(f"CREATE TABLE IF NOT EXISTS {_sqlite_quote(table)} ({_column_defs(_sqlite_quote)})")
                have = {r[1] for r in self.conn.execute(f"PRAGMA table_info({_sqlite_quote(table)})")}
                for name, typ in _missing_columns(have):
                    self.conn.execute(f"ALTER TABLE {_sqlite_quote(table)} ADD COLUMN {_sqlite_quote(name)} {typ}")
                self.conn.execute(f"CREATE INDEX IF NOT EXISTS {_sqlite_quote(_unreadable_index(table))} ON "
                                  f"{_sqlite_quote(table)} (source) WHERE {_UNREADABLE_SQL}")
        except (sqlite3.Error, OSError) as e:
            raise SinkError(redact(f"{dsn}: cannot open SQLite database: {e}")) from None
        cols = ", ".join(_sqlite_quote(c) for c in ROW_FIELDS)
        marks = ", ".join("?" for _ in ROW_FIELDS)
        updates = ", ".join(f"{_sqlite_quote(c)} = excluded.{_sqlite_quote(c)}" for c in ROW_FIELDS if c != "id")
        self._upsert = (
            f"INSERT INTO {_sqlite_quote(table)} ({cols}) VALUES ({marks}) ON CONFLICT(id) DO UPDATE SET {updates}"
        )

    def done_ids(self, include_errors: bool = False) -> set[str]:
        return _done(self.done_id_chunks(), include_errors)

    def done_id_chunks(self) -> Iterator[tuple[list[str], list[str]]]:
        cur = self.conn.execute(f"SELECT id, status FROM {_sqlite_quote(self.table)}")
        while rows := cur.fetchmany(_DONE_CHUNK):
            yield [r[0] for r in rows], [r[1] for r in rows]

    def write(self, rows: list[dict]) -> None:
        rows = _validated(rows)
        if not rows:
            return
        read = sorted({r["source"] for r in rows if not r["id"].endswith(UNREADABLE_SUFFIX)})
        try:
            with self.conn:
                self.conn.executemany(self._upsert, [tuple(r[c] for c in ROW_FIELDS) for r in rows])
                for k in range(0, len(read), 500):  # this input was read: its unreadable row goes
                    chunk = read[k:k + 500]
                    self.conn.execute(f"DELETE FROM {_sqlite_quote(self.table)} WHERE {_UNREADABLE_SQL} AND source IN "
                                      f"({', '.join('?' for _ in chunk)})", chunk)
        except sqlite3.Error as e:
            raise SinkError(redact(f"{self.dsn}: cannot write to table {self.table}: {e}")) from None

    def close(self) -> None:
        self.conn.close()


_UNREADABLE_SQL = "id LIKE '%" + UNREADABLE_SUFFIX + "'"  # also the partial index's predicate, word for word


def _unreadable_index(table: str) -> str:
    """A name within PostgreSQL's 63 characters, unique per table."""
    return f"{table[:36]}_unreadable_{hashlib.sha256(table.encode()).hexdigest()[:8]}"


def _sqlite_path(dsn: str) -> str:
    """SQLAlchemy-style URLs: sqlite:///rel.db is relative, sqlite:////abs.db absolute, sqlite:// in memory."""
    if not dsn.startswith("sqlite://"):
        raise ValueError(f"invalid SQLite URL {redact(dsn)!r}: expected sqlite:///relative.db or sqlite:////abs/path.db")
    rest = dsn[len("sqlite://"):]
    if rest in ("", "/", "/:memory:"):
        return ":memory:"
    if not rest.startswith("/"):
        raise ValueError(f"invalid SQLite URL {redact(dsn)!r}: expected sqlite:///relative.db or sqlite:////abs/path.db")
    return rest[1:]


# A lost connection (server restart, failover, network) is re-established with backoff for this long,
# then the batch is sent again (the upsert is idempotent); after that the job stops with a SinkError.
PG_RECONNECT_S = 120.0


def _pg_lock_key(table: str) -> int:
    """A stable signed 64-bit advisory-lock key per table name (pg_advisory_xact_lock takes a bigint)."""
    return int.from_bytes(hashlib.sha256(f"pagemill:create:{table}".encode()).digest()[:8], "big", signed=True)


def _pg_password(password_env: str | None) -> dict[str, str]:
    """The password from the environment variable the config names, never from the command line."""
    if not password_env:
        return {}  # libpq still reads PGPASSWORD, PGPASSFILE (~/.pgpass) and PGSERVICE / service= itself
    value = os.environ.get(password_env)
    if value is None:
        raise SinkError(f"db_password_env names {password_env}, but that environment variable is not set")
    return {"password": value}


class PostgresSink(_Closes):
    """PostgreSQL via psycopg 3; rows are upserted with a pipelined executemany in one transaction.

    A batch whose connection breaks is sent again on a new connection (see PG_RECONNECT_S).
    """

    def __init__(self, dsn: str, table: str, *, password_env: str | None = None,
                 reconnect_s: float = PG_RECONNECT_S) -> None:
        import psycopg
        from psycopg import sql

        self.name = redact(dsn)
        self.table = validate_table_name(table)
        self._errors = psycopg.Error
        self._dsn = dsn
        self._connect_kwargs = {"connect_timeout": 10} | _pg_password(password_env)
        self.reconnect_s = reconnect_s
        ident = sql.Identifier(table)
        try:
            self.conn = psycopg.connect(dsn, **self._connect_kwargs)
        except psycopg.Error as e:
            raise SinkError(redact(f"{self.name}: cannot connect to PostgreSQL: {e}")) from None
        columns = sql.SQL(_column_defs(lambda c: sql.Identifier(c).as_string(self.conn), _PG_TYPES))
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in ROW_FIELDS)
        updates = sql.SQL(", ").join(
            sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(c), sql.Identifier(c)) for c in ROW_FIELDS if c != "id"
        )
        self._upsert = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT (id) DO UPDATE SET {}").format(
            ident, cols, sql.SQL(", ").join(sql.Placeholder() for _ in ROW_FIELDS), updates
        )
        self._select_all = sql.SQL("SELECT id FROM {}").format(ident)
        self._select_ok = sql.SQL("SELECT id FROM {} WHERE status = %s").format(ident)
        self._select_pairs = sql.SQL("SELECT id, status FROM {}").format(ident)
        create = sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(ident, columns)
        index = sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (source) WHERE " + _UNREADABLE_SQL.replace("%", "%%")).format(
            sql.Identifier(_unreadable_index(table)), ident)
        self._drop_unreadable = sql.SQL(
            "DELETE FROM {} WHERE " + _UNREADABLE_SQL.replace("%", "%%") + " AND source = ANY(%s)").format(ident)

        def create_table(conn) -> None:
            # CREATE TABLE IF NOT EXISTS is not atomic: two sessions creating the same new table race on
            # the catalog (pg_type_typname_nsp_index). One transaction-scoped lock per table name orders them.
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_pg_lock_key(table),))
                conn.execute(create)
                have = {r[0] for r in conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema()"
                    " AND table_name = %s", (table,))}
                for name, typ in _missing_columns(have, _PG_TYPES):  # tables written by an older pagemill
                    conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} " + typ).format(
                        ident, sql.Identifier(name)))
                conn.execute(index)

        try:
            self._with_reconnect(create_table)
        except SinkError as e:
            self.conn.close()
            raise SinkError(f"{self.name}: cannot create table {table}: {e}") from None

    def _with_reconnect(self, fn):
        """`fn(conn)`, re-run on a new connection while the old one is broken, for at most `reconnect_s`."""
        import psycopg

        deadline = None
        while True:
            try:
                return fn(self.conn)
            except psycopg.Error as e:
                if not (isinstance(e, psycopg.OperationalError) and (self.conn.broken or self.conn.closed)):
                    raise SinkError(redact(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)) from None
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if deadline is None:
                    deadline = time.monotonic() + self.reconnect_s
                    log.warning("%s", redact(f"{self.name}: connection lost ({first}); reconnecting"))
                self._reconnect(deadline, first)

    def _reconnect(self, deadline: float, cause: str) -> None:
        import psycopg

        delay = 0.2
        while True:
            try:
                self.conn.close()
                self.conn = psycopg.connect(self._dsn, **self._connect_kwargs)
                return
            except psycopg.Error as e:
                if time.monotonic() + delay > deadline:
                    last = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise SinkError(redact(f"connection lost ({cause}) and not re-established within "
                                           f"{self.reconnect_s:g}s: {last}")) from None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def done_ids(self, include_errors: bool = False) -> set[str]:
        def select(conn) -> set[str]:
            with conn.transaction():
                if include_errors:
                    cur = conn.execute(self._select_all)
                else:
                    cur = conn.execute(self._select_ok, ("ok",))
                return {r[0] for r in cur}

        try:
            return self._with_reconnect(select)
        except SinkError as e:
            raise SinkError(f"{self.name}: cannot read table {self.table}: {e}") from None

    def done_id_chunks(self) -> Iterator[tuple[list[str], list[str]]]:
        """All (id, status) pairs through a server-side cursor, so neither side holds the table at once."""
        try:
            with self.conn.transaction(), self.conn.cursor(name=f"pagemill_done_{uuid.uuid4().hex[:8]}") as cur:
                cur.execute(self._select_pairs)
                while rows := cur.fetchmany(_DONE_CHUNK):
                    yield [r[0] for r in rows], [r[1] for r in rows]
        except self._errors as e:
            raise SinkError(redact(f"{self.name}: cannot read table {self.table}: {e}")) from None

    def write(self, rows: list[dict]) -> None:
        rows = _validated(rows)
        if not rows:
            return
        values = [tuple(r[c] for c in ROW_FIELDS) for r in rows]
        read = sorted({r["source"] for r in rows if not r["id"].endswith(UNREADABLE_SUFFIX)})

        def upsert(conn) -> None:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(self._upsert, values)
                if read:  # these inputs were read: their unreadable rows go (one input, one row)
                    cur.execute(self._drop_unreadable, (read,))

        try:
            self._with_reconnect(upsert)
        except SinkError as e:
            raise SinkError(f"{self.name}: cannot write to table {self.table}: {e}") from None

    def close(self) -> None:
        self.conn.close()
