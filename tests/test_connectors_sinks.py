"""connectors.sinks: Parquet (local, S3), SQLite and the real PostgreSQL on 127.0.0.1:5432."""

import io
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
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


def test_s3_parquet_reads_back_through_broken_bodies(s3_endpoint, monkeypatch):
    """done_ids and compact read every part back; a truncated or reset body is read again, not fatal."""
    from connectors.s3 import S3Options
    from tests.faultproxy import S3FaultProxy, first_gets_fail

    monkeypatch.setattr("connectors.s3._BACKOFF_S", 0.01, raising=False)
    boto3.client("s3").create_bucket(Bucket="flaky")
    sink = open_sink("s3://flaky/out/")
    sink.write([row("a", "error"), row("b")])
    sink.write([row("a"), row("c")])
    with S3FaultProxy(s3_endpoint, first_gets_fail(2)) as proxy:
        flaky = open_sink("s3://flaky/out/", s3=S3Options(endpoint_url=proxy.url))
        assert flaky.done_ids() == {"a", "b", "c"}
        assert flaky.compact() == 1
        assert len(proxy.faults) == 4  # the first two reads of each of the two parts broke
    t = pq.read_table(io.BytesIO(boto3.client("s3").get_object(
        Bucket="flaky", Key=sink._parts()[0])["Body"].read()))
    assert _ids_and_status(t) == [("b", "ok")]


def _rerun_over_errors(open_out):
    """Run 1 leaves error rows; run 2 retries them into newer parts. Returns run 2's sink, not yet compacted.

    Parts, oldest first: P1 [a err, b, c err], P2 [d err], P3 [f], P4 [a, c], P5 [d].
    """
    first = open_out()
    first.write([row("a", "error"), row("b"), row("c", "error")])
    first.write([row("d", "error")])
    first.write([row("f")])
    first.close()
    second = open_out()
    assert second.done_ids() == {"b", "f"}
    second.write([row("a"), row("c")])
    second.write([row("d")])
    return second


def _ids_and_status(t) -> list[tuple[str, str]]:
    return sorted(zip(t.column("id").to_pylist(), t.column("status").to_pylist()))


ALL_OK = [(i, "ok") for i in "abcdf"]


def test_local_compact_keeps_only_the_newest_row_per_id(tmp_path: Path):
    out = tmp_path / "out"
    sink = _rerun_over_errors(lambda: open_sink(str(out)))
    p1, p2, p3, p4, p5 = sorted(out.glob("part-*.parquet"))
    assert pq.read_table(out).num_rows == 8  # before: the old error rows are still visible to readers

    def untouched() -> dict:
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in (p3, p4, p5)}

    before, b_row = untouched(), pq.read_table(p1).to_pylist()[1]
    assert sink.compact() == 2
    assert sorted(p.name for p in out.iterdir()) == [p1.name, p3.name, p4.name, p5.name]  # P2 emptied, no temp left
    assert pq.read_table(p1).to_pylist() == [b_row]  # rewritten in place with its one current row
    assert untouched() == before  # same inode, mtime and bytes: never rewritten
    t = pq.read_table(out)
    assert t.schema.equals(ROW_ARROW_SCHEMA) and _ids_and_status(t) == ALL_OK
    assert sink.compact() == 0 and open_sink(str(out)).compact() == 0


def test_s3_compact_keeps_only_the_newest_row_per_id(s3_endpoint):
    client = boto3.client("s3")
    client.create_bucket(Bucket="results")
    sink = _rerun_over_errors(lambda: open_sink("s3://results/run1"))

    def objects() -> dict[str, str]:
        return {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket="results")["Contents"]}

    k1, k2, k3, k4, k5 = keys = sorted(objects())
    before = objects()
    puts: list[str] = []
    real_put = sink.client.put_object
    with pytest.MonkeyPatch.context() as mp:  # the client is cached and shared: patch it for this call only
        mp.setattr(sink.client, "put_object", lambda **kw: puts.append(kw["Key"]) or real_put(**kw))
        assert sink.compact() == 2
    assert puts == [k1] and sorted(objects()) == [k1, k3, k4, k5]  # P1 rewritten, P2 deleted, the rest untouched
    assert {k: objects()[k] for k in (k3, k4, k5)} == {k: before[k] for k in (k3, k4, k5)}
    assert objects()[k1] != before[k1]
    rows = []
    for k in sorted(objects()):
        rows += pq.read_table(io.BytesIO(client.get_object(Bucket="results", Key=k)["Body"].read())).to_pylist()
    assert sorted((r["id"], r["status"]) for r in rows) == ALL_OK
    assert open_sink("s3://results/run1").compact() == 0 and len(keys) == 5


def test_compact_keeps_one_row_when_identical_inputs_land_in_two_parts_of_a_new_output(tmp_path: Path):
    sink = open_sink(str(tmp_path / "out"))
    sink.write([row("a"), row("b")])
    sink.write([row("c"), row("a")])  # the same content again, in a later batch: the same id
    sink.write([row("d"), row("d")])  # and twice in one batch
    assert sink.compact() == 1
    assert _ids_and_status(pq.read_table(str(tmp_path / "out"))) == [("a", "ok"), ("b", "ok"), ("c", "ok"), ("d", "ok")]


def test_next_run_compacts_what_a_killed_run_left(tmp_path: Path):
    out = str(tmp_path)
    open_sink(out).write([row("a", "error"), row("b")])
    open_sink(out).write([row("a")])  # a --retry-errors run killed before its compact
    assert pq.read_table(out).num_rows == 3
    rerun = open_sink(out)  # finds nothing to do, writes nothing, still compacts
    assert rerun.done_ids(include_errors=True) == {"a", "b"}
    assert rerun.compact() == 1
    assert _ids_and_status(pq.read_table(out)) == [("a", "ok"), ("b", "ok")]


def test_local_compact_crash_midway_loses_nothing_and_a_rerun_finishes(tmp_path: Path, monkeypatch):
    out = str(tmp_path)
    first = open_sink(out)
    first.write([row("a", "error"), row("x")])
    first.write([row("b", "error"), row("y")])
    second = open_sink(out)
    second.write([row("a"), row("b")])
    real_replace, replaced = os.replace, []

    def replace_once(src, dst):
        if replaced:
            raise KeyboardInterrupt("killed mid-compact")
        replaced.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr("connectors.sinks.os.replace", replace_once)
    with pytest.raises(KeyboardInterrupt):
        second.compact()
    monkeypatch.undo()
    assert len(replaced) == 1 and not list(tmp_path.glob(".*"))  # one part rewritten, the temp file removed
    t = pq.read_table(out)  # nothing lost: only b's superseded row is gone so far
    assert _ids_and_status(t) == [("a", "error"), ("a", "ok"), ("b", "ok"), ("x", "ok"), ("y", "ok")]
    assert open_sink(out).done_ids() == {"a", "b", "x", "y"}  # and the newest part still wins
    assert open_sink(out).compact() == 1
    assert _ids_and_status(pq.read_table(out)) == [(i, "ok") for i in "abxy"]


def test_s3_compact_crash_midway_loses_nothing_and_a_rerun_finishes(s3_endpoint):
    client = boto3.client("s3")
    client.create_bucket(Bucket="results")
    url = "s3://results/out"
    first = open_sink(url)
    first.write([row("a", "error"), row("x")])
    first.write([row("b", "error"), row("y")])
    second = open_sink(url)
    second.write([row("a"), row("b")])
    real_put, puts = second.client.put_object, []

    def put_once(**kw):
        if puts:
            raise KeyboardInterrupt("killed mid-compact")
        puts.append(kw["Key"])
        return real_put(**kw)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(second.client, "put_object", put_once)  # the client is cached and shared
        second.compact()
    assert len(puts) == 1
    assert open_sink(url).done_ids() == {"a", "b", "x", "y"}
    assert open_sink(url).done_ids(include_errors=True) == {"a", "b", "x", "y"}
    assert open_sink(url).compact() == 1
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="results")["Contents"]]
    rows = [r for k in keys
            for r in pq.read_table(io.BytesIO(client.get_object(Bucket="results", Key=k)["Body"].read())).to_pylist()]
    assert sorted((r["id"], r["status"]) for r in rows) == [(i, "ok") for i in "abxy"]


def test_sql_sinks_have_nothing_to_compact(tmp_path: Path):
    sink = open_sink(f"sqlite:///{tmp_path}/x.db")
    sink.write([row("a", "error")])
    sink.write([row("a")])
    assert sink.compact() == 0 and sink.done_ids() == {"a"}


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


def _without_write_override(code: str) -> subprocess.CompletedProcess:
    """Run `code` so that a directory's mode bits bind: root writes anywhere through CAP_DAC_OVERRIDE, so
    under root the capability is dropped (root stays the owner, so a checkout and venv readable only by
    root, e.g. a clone under `mktemp -d`, still import; another user could not read them)."""
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--bounding-set=-dac_override", "--inh-caps=-dac_override"] + cmd
    return subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)


def test_read_only_parquet_output_is_one_clear_error_and_loses_nothing():
    root = Path(tempfile.mkdtemp(prefix="pm-ro-"))
    try:
        root.chmod(0o755)
        out = root / "out"
        open_sink(str(out)).write([row("a")])
        before = sorted(p.name for p in out.iterdir())
        out.chmod(0o555)  # readable, not writable, owner included
        # At open: the job stops before any work, naming the directory and the reason.
        p = _without_write_override(f"from connectors.sinks import open_sink\nopen_sink({str(out)!r})")
        assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == (
            f"connectors.errors.SinkError: {out}: output directory is not writable: Permission denied")
        # At write (the directory became read-only after the open): a SinkError, not an OSError from the cleanup.
        code = (f"import os\nfrom connectors.sinks import LocalParquetSink\nfrom tests.test_connectors_sinks import row\n"
                f"s = LocalParquetSink.__new__(LocalParquetSink)\nfrom pathlib import Path\ns.root = Path({str(out)!r})\n"
                f"s.write([row('b')])")
        p = _without_write_override(code)
        last = p.stderr.strip().splitlines()[-1]
        assert p.returncode == 1 and last.startswith(f"connectors.errors.SinkError: {out}: cannot write part-"), p.stderr
        assert last.endswith(": Permission denied") and "During handling" not in p.stderr
        assert sorted(p.name for p in out.iterdir()) == before  # nothing lost, nothing half-written
        assert open_sink(str(root / "out")).done_ids() == {"a"}
    finally:
        (root / "out").chmod(0o755)
        shutil.rmtree(root)


def test_postgresql_concurrent_creation_of_one_new_table(pg_table):
    """CREATE TABLE IF NOT EXISTS races in PostgreSQL (pg_type_typname_nsp_index); 40 opens at once must all work."""
    import threading

    n = 40
    barrier = threading.Barrier(n)
    errors: list[str] = []
    sinks: list = []

    def opener() -> None:
        barrier.wait()
        try:
            sinks.append(open_sink(PG, table=pg_table))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(str(e))

    threads = [threading.Thread(target=opener) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in sinks:
        s.close()
    assert errors == [] and len(sinks) == n


def test_postgresql_backend_terminated_mid_run_resends_the_batch(pg_table):
    sink = open_sink(PG, table=pg_table)
    sink.write([row("a")])
    with psycopg.connect(PG, autocommit=True) as admin:  # what a restart or a DBA does to our session
        admin.execute("SELECT pg_terminate_backend(%s)", (sink.conn.info.backend_pid,))
    sink.write([row("b"), row("c")])  # "terminating connection due to administrator command" -> reconnect, re-send
    assert sink.done_ids() == {"a", "b", "c"}
    sink.close()


def _pg_ready() -> bool:
    return subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1"]).returncode == 0


def test_postgresql_server_restart_mid_run(pg_table):
    """A real restart of the local cluster while batches are being written: no batch fails, none is lost."""
    import threading

    sink = open_sink(PG, table=pg_table)
    sink.write([row("before")])
    written: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            try:
                sink.write([row(f"r{i}")])
                written.append(f"r{i}")
            except Exception as e:  # noqa: BLE001
                failures.append(str(e))
                return
            i += 1
            time.sleep(0.02)

    t = threading.Thread(target=writer)
    t.start()
    try:
        version = sorted(os.listdir("/etc/postgresql"))[-1]
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"], check=True,
                       timeout=120, capture_output=True)
    finally:
        deadline = time.time() + 60
        while not _pg_ready() and time.time() < deadline:
            time.sleep(0.5)
        n_at_restart = len(written)
        while len(written) < n_at_restart + 5 and not failures and time.time() < deadline:
            time.sleep(0.1)  # a few batches after the server came back
        stop.set()
        t.join(timeout=150)
    assert failures == [] and len(written) > n_at_restart
    assert sink.done_ids() == {"before", *written}
    sink.close()


def test_postgresql_gives_up_after_a_bounded_time_with_a_clear_error(pg_table):
    from connectors.sinks import PostgresSink
    from tests.faultproxy import TcpProxy

    proxy = TcpProxy("127.0.0.1", 5432)
    sink = PostgresSink(f"postgresql://postgres:pw-visible@127.0.0.1:{proxy.port}/test", pg_table, reconnect_s=1.5)
    sink.write([row("a")])
    proxy.down()  # the server went away and stays away
    t0 = time.monotonic()
    with pytest.raises(SinkError) as e:
        sink.write([row("b")])
    assert 1.0 < time.monotonic() - t0 < 15
    msg = str(e.value)
    assert msg.startswith(f"postgresql://postgres:***@127.0.0.1:{proxy.port}/test: cannot write to table {pg_table}: "
                          "connection lost (") and "not re-established within 1.5s" in msg
    assert "pw-visible" not in msg and "\n" not in msg
    proxy.up()  # back again: the same sink carries on
    sink.write([row("b")])
    assert sink.done_ids() == {"a", "b"}
    sink.close()
    proxy.down()


def test_postgresql_password_from_the_environment_not_the_command_line(pg_table, monkeypatch, tmp_path):
    """db_password_env names a variable; libpq's own PGPASSWORD / PGPASSFILE keep working too."""
    monkeypatch.setenv("PAGEMILL_TEST_PGPW", "from-named-var")
    sink = open_sink(PG, table=pg_table, password_env="PAGEMILL_TEST_PGPW")
    assert sink.conn.info.password == "from-named-var"
    sink.close()
    with pytest.raises(SinkError, match="db_password_env names PAGEMILL_TEST_UNSET, but that environment variable"):
        open_sink(PG, table=pg_table, password_env="PAGEMILL_TEST_UNSET")
    passfile = tmp_path / "pgpass"
    passfile.write_text("127.0.0.1:5432:test:postgres:from-passfile\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    sink = open_sink(PG, table=pg_table)
    assert sink.conn.info.password == "from-passfile"
    sink.close()


def _unreadable_then_read(sink) -> None:
    """Run 1 could not read /in/x (error row under its unreadable id); run 2 read it: 2 pages."""
    sink.write([row("u" * 32 + ":unreadable", "error", source="/in/x", page=None),
                row("v" * 32 + ":unreadable", "error", source="/in/still-missing", page=None), row("a")])
    sink.write([row("c" * 32 + ":1", source="/in/x"), row("c" * 32 + ":2", source="/in/x", page=2)])


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "parquet"])
def test_a_read_input_replaces_its_unreadable_row(kind, tmp_path, pg_table):
    """One input, one row: content rows replace the input's unreadable error row (SQL at write, Parquet at compact)."""
    dst = {"sqlite": f"sqlite:///{tmp_path}/u.db", "postgresql": PG, "parquet": str(tmp_path / "u")}[kind]
    sink = open_sink(dst, table=pg_table)
    _unreadable_then_read(sink)
    sink.compact()
    want = {"a", "c" * 32 + ":1", "c" * 32 + ":2", "v" * 32 + ":unreadable"}
    assert sink.done_ids(include_errors=True) == want
    sink.close()
    if kind == "parquet":  # what any reader of the directory sees
        assert sorted(pq.read_table(dst).column("id").to_pylist()) == sorted(want)
