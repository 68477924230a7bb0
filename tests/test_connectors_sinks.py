"""connectors.sinks: Parquet (local, S3), SQLite and the real PostgreSQL on 127.0.0.1:5432."""

import os
import sqlite3
import uuid
from pathlib import Path

import boto3
import psycopg
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from connectors.errors import SinkError
from connectors.rows import ROW_ARROW_SCHEMA, OutputRow
from connectors.sinks import LocalParquetSink, open_sink, validate_table_name
from tests.s3server import s3_endpoint  # noqa: F401 - pytest fixture

PG = os.environ.get("PAGEMILL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def row(id_: str, status: str = "ok", **kw) -> dict:
    base = dict(id=id_, source=f"/in/{id_}", status=status, model="m", prompt="p", config_hash="h", job="digitize",
                error="boom" if status == "error" else None, text="t" if status == "ok" else None, page=1,
                width=10, height=20, boxes_json="[]", decode_ms=1.5, prompt_tokens=3)
    base.update(kw)
    return base


def _exercise_upserts(sink) -> None:
    """The contract every sink shares: validation, upsert on id, done_ids with and without errors."""
    assert sink.done_ids() == set()
    sink.write([row("a"), row("b", "error"), row("c")])
    assert sink.done_ids() == {"a", "c"}
    assert sink.done_ids(include_errors=True) == {"a", "b", "c"}
    sink.write([row("a", "error"), row("b")])  # a later write wins, both ways
    assert sink.done_ids() == {"b", "c"}
    assert sink.done_ids(include_errors=True) == {"a", "b", "c"}
    sink.write([row("d", "error"), row("d")])  # within one batch too
    assert "d" in sink.done_ids()
    sink.write([])
    with pytest.raises(ValidationError):
        sink.write([row("e", status="maybe")])
    with pytest.raises(ValidationError):
        sink.write([{**row("e"), "unexpected": 1}])
    assert "e" not in sink.done_ids(include_errors=True)


def test_local_parquet(tmp_path: Path):
    out = tmp_path / "out"
    sink = open_sink(str(out))
    assert isinstance(sink, LocalParquetSink)
    _exercise_upserts(sink)
    sink.close()
    parts = sorted(out.iterdir())
    assert len(parts) == 3 and all(p.name.startswith("part-") and p.suffix == ".parquet" for p in parts)
    t = pq.read_table(out)  # Arrow reads the directory as one table
    assert t.schema.equals(ROW_ARROW_SCHEMA) and t.num_rows == 6
    again = open_sink(f"file://{out}")  # resume from a fresh process-like sink
    assert again.done_ids() == {"b", "c", "d"}


def test_local_parquet_crash_leaves_nothing_visible(tmp_path: Path, monkeypatch):
    sink = open_sink(str(tmp_path))
    sink.write([row("a")])
    (tmp_path / ".part-20990101T000000000000000Z-dead.parquet.tmp").write_bytes(b"PAR1 half a file")

    def crash(table, where, **kw):
        where.write(b"PAR1 partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr("connectors.sinks.pq.write_table", crash)
    with pytest.raises(KeyboardInterrupt):
        sink.write([row("b")])
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [
        p.name for p in tmp_path.glob("part-*.parquet")
    ]
    # the sink removed its own temp file; the planted one stands for a SIGKILL, where no cleanup runs
    assert [p.name for p in tmp_path.glob("*.tmp")] == [".part-20990101T000000000000000Z-dead.parquet.tmp"]
    assert sink.done_ids(include_errors=True) == {"a"}
    assert pq.read_table(tmp_path).column("id").to_pylist() == ["a"]  # readers skip the hidden .tmp


def test_later_part_wins_even_with_same_second(tmp_path: Path):
    sink = open_sink(str(tmp_path))
    for i in range(20):
        sink.write([row("x", "ok" if i % 2 else "error")])
    assert sink.done_ids() == {"x"}
    sink.write([row("x", "error")])
    assert sink.done_ids() == set()


def test_s3_parquet(s3_endpoint):
    client = boto3.client("s3")
    client.create_bucket(Bucket="results")
    sink = open_sink("s3://results/run1/")
    _exercise_upserts(sink)
    client.put_object(Bucket="results", Key="run1/sub/part-x.parquet", Body=b"not ours")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="results")["Contents"]]
    assert sum(k.startswith("run1/part-") and k.endswith(".parquet") for k in keys) == 3
    assert open_sink("s3://results/run1").done_ids() == {"b", "c", "d"}


def test_sqlite_relative_and_absolute(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sink = open_sink("sqlite:///rel/out.db", table="rows_v1")
    _exercise_upserts(sink)
    sink.close()
    assert (tmp_path / "rel" / "out.db").is_file()
    con = sqlite3.connect(tmp_path / "rel" / "out.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    got = con.execute("SELECT source, page, width, decode_ms, text FROM rows_v1 WHERE id = 'c'").fetchone()
    assert got == ("/in/c", 1, 10, 1.5, "t")
    con.close()
    abs_path = tmp_path / "abs.db"
    sink = open_sink(f"sqlite:///{abs_path}")  # = sqlite:////tmp/.../abs.db
    sink.write([row("z")])
    sink.close()
    assert open_sink(f"sqlite:///{abs_path}").done_ids() == {"z"}


@pytest.fixture
def pg_table():
    """A unique table in the real PostgreSQL, dropped afterwards. No server = test failure, not a skip."""
    name = f"pagemill_test_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(PG, autocommit=True) as con:
        con.execute(f'DROP TABLE IF EXISTS "{name}"')


def test_postgresql(pg_table):
    sink = open_sink(PG, table=pg_table)
    _exercise_upserts(sink)
    sink.close()
    with psycopg.connect(PG) as con:
        got = con.execute(f'SELECT source, page, decode_ms, created_at FROM "{pg_table}" WHERE id = %s', ("c",)).fetchone()
    assert got[:3] == ("/in/c", 1, 1.5) and OutputRow.model_validate(row("c", created_at=got[3]))
    assert open_sink(PG, table=pg_table).done_ids() == {"b", "c", "d"}


def test_postgresql_error_hides_password():
    dsn = "postgresql://postgres:Sup3rS3cret@127.0.0.1:1/test"  # nothing listens on port 1
    with pytest.raises(SinkError) as e:
        open_sink(dsn)
    msg = str(e.value)
    assert "Sup3rS3cret" not in msg and "127.0.0.1" in msg and "postgres:***@" in msg
    assert e.value.__suppress_context__  # the driver's own message is not chained into tracebacks


@pytest.mark.parametrize("bad", ["rows; DROP TABLE x", "1rows", 'a"b', "a" * 64, "", "schema.table", "ro ws"])
def test_invalid_table_names_rejected(bad, tmp_path):
    with pytest.raises(ValueError, match="invalid table name"):
        validate_table_name(bad)
    with pytest.raises(ValueError, match="invalid table name"):
        open_sink(f"sqlite:///{tmp_path}/x.db", table=bad)


def test_valid_table_names():
    for ok in ("rows", "_x", "A1_b", "a" * 63):
        assert validate_table_name(ok) == ok


def test_bad_destinations(tmp_path):
    with pytest.raises(ValueError, match="sqlite:///"):
        open_sink(str(tmp_path / "out.db"))
    with pytest.raises(ValueError, match="unsupported sink"):
        open_sink("ftp://user:pw@host/x")
    with pytest.raises(ValueError) as e:
        open_sink("ftp://user:pw@host/x")
    assert "pw" not in str(e.value).replace("***", "")
