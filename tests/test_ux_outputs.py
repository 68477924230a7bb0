"""What users get, without Ray: typed Parquet/PostgreSQL columns read by DuckDB and Polars, Parquet
parts of a useful size, Markdown documents, the contact sheet's HTML, the summary's place, the
preflight's one-line refusals, `pagemill inspect`, and per-job `--help` with layered configs."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.scan import iter_rows
from connectors.sinks import open_sink
from jobs.cli import build_parser, effective_defaults, parse_config
from pipeline.config import DEFAULT_PROMPTS, JobConfig
from pipeline.contact_sheet import SheetBuilder, SheetHeader, previous_thumbs
from pipeline.inspect import inspect_output
from pipeline.markdown import common_root, export_markdown, input_root, relative_name, render
from pipeline.preflight import PreflightError, check_input, check_model, check_output_owner
from pipeline.summary import side_path
from tests.s3server import s3_endpoint  # noqa: F401 - fixture
from tests.test_pipeline_support import smoke_checkpoint

REPO = Path(__file__).resolve().parents[1]
PG = "postgresql://postgres@127.0.0.1:5432/test"


def row(id_: str, source: str = "/in/a.png", page: int | None = None, status: str = "ok", **kw) -> dict:
    base = dict(id=id_, source=source, page=page, status=status, model="m", prompt="p", config_hash="h1",
                job="digitize", text=f"text of {id_}", generated_tokens=None if status != "ok" else 5,
                finish_reason="error" if status != "ok" else "eos",
                error=None if status == "ok" else f"{source}: broken", boxes_json="[]" if status == "ok" else None)
    return base | kw


# ------------------------------------------------------------------ typed outputs, read by data tools


def test_parquet_types_and_duckdb_polars_read_the_directory(tmp_path):
    out = tmp_path / "out"
    with open_sink(str(out)) as sink:
        sink.write([row("a"), row("b", status="error")])
        sink.write([row("c", page=2, source="/in/d.pdf", prompt_tokens=None)])
    (tmp_path / "out.summary.json").write_text("{}")  # what a run puts beside it, never inside
    assert sorted(p.name.split("-")[0] for p in out.iterdir()) == ["part", "part"]  # nothing but Parquet
    (out / ".pagemill-tmp").mkdir()  # what a SIGKILL mid-write leaves: a temp file in the hidden subfolder
    (out / ".pagemill-tmp" / "part-x.parquet.tmp").write_bytes(b"PAR1 half a file")
    schema = pq.read_schema(next(out.glob("*.parquet")))
    assert schema.field("created_at").type == pa.timestamp("us", tz="UTC")
    assert schema.field("page").type == pa.int64() and schema.field("generated_tokens").type == pa.int64()
    for glob in (f"{out}/*", f"{out}/**/*.parquet"):
        rel = duckdb.sql(f"SELECT id, page, generated_tokens, created_at FROM read_parquet('{glob}') ORDER BY id")
        got = rel.fetchall()
        assert [r[0] for r in got] == ["a", "b", "c"]
        assert got[1][2] is None and got[0][2] == 5 and isinstance(got[0][3], datetime)
        types = dict(zip(rel.columns, map(str, rel.types)))
        assert types["page"] == "BIGINT" and types["created_at"].startswith("TIMESTAMP WITH TIME ZONE")
        df = pl.read_parquet(glob)
        assert df.height == 3 and df.schema["generated_tokens"] == pl.Int64 and df["page"].null_count() == 2
        assert isinstance(df.schema["created_at"], pl.Datetime)


def test_parquet_parts_are_buffered_to_a_size_and_resume_still_sees_every_row(tmp_path):
    out = tmp_path / "out"
    sink = open_sink(str(out), part_bytes=4000, part_seconds=3600)
    for i in range(40):  # ~40 rows of ~400 bytes: about 4 parts, not 40
        sink.write([row(f"r{i}", text="x" * 300)])
    assert sink.done_ids() == {f"r{i}" for i in range(40)}  # buffered rows count for resume in this process
    sink.write([row("r0", status="error")])  # a later write of the same id wins
    sink.close()
    parts = list(out.glob("*.parquet"))
    assert 2 <= len(parts) <= 6, len(parts)
    assert open_sink(str(out)).done_ids() == {f"r{i}" for i in range(1, 40)}
    open_sink(str(out)).compact()
    ids = pq.read_table(out).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 40


def test_postgres_columns_are_typed_and_read_back_as_rows():
    import psycopg

    table = "t_" + uuid.uuid4().hex[:12]
    try:
        with open_sink(PG, table=table) as sink:
            sink.write([row("a", boxes_json='[{"label": "x", "box": [1, 2, 3, 4]}]'), row("b", status="error")])
            back = {r["id"]: r for r in iter_rows(sink)}
        with psycopg.connect(PG) as conn:
            types = dict(conn.execute("SELECT column_name, data_type FROM information_schema.columns "
                                      "WHERE table_name = %s", (table,)).fetchall())
            box = conn.execute(f"SELECT boxes_json -> 0 ->> 'label' FROM {table} WHERE id = 'a'").fetchone()[0]
        assert types["created_at"] == "timestamp with time zone"
        assert types["boxes_json"] == types["items_json"] == "jsonb" and types["page"] == "bigint"
        assert box == "x"  # queryable as JSON
        assert json.loads(back["a"]["boxes_json"])[0]["box"] == [1, 2, 3, 4]
        assert datetime.fromisoformat(back["a"]["created_at"]).tzinfo is not None
        assert back["b"]["finish_reason"] == "error"
    finally:
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")


def test_an_older_sqlite_table_gains_the_new_columns(tmp_path):
    import sqlite3

    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE pagemill_rows (id TEXT PRIMARY KEY, source TEXT, page BIGINT, width BIGINT, "
                     "height BIGINT, status TEXT, error TEXT, text TEXT, boxes_json TEXT, items_json TEXT, model TEXT, "
                     "model_revision TEXT, prompt TEXT, config_hash TEXT, job TEXT, decode_ms DOUBLE PRECISION, "
                     "generate_ms DOUBLE PRECISION, prompt_tokens BIGINT, generated_tokens BIGINT, created_at TEXT)")
    with open_sink(f"sqlite:///{db}") as sink:
        sink.write([row("a")])
        assert [r["finish_reason"] for r in iter_rows(sink)] == ["eos"]


# ------------------------------------------------------------------ Markdown


def test_markdown_pages_in_order_with_separators_and_errors():
    rows = [row("3", page=3, source="/s/d.pdf", text="third"),
            row("1", page=1, source="/s/d.pdf", text="first"),
            row("2", page=2, source="/s/d.pdf", status="error", error="/s/d.pdf: page 2 -- broken -->")]
    md = render(rows)
    assert md.index("<!-- page 1 -->") < md.index("first") < md.index("<!-- page 2 -->") < md.index("<!-- page 3 -->")
    assert "third" in md and "\n---\n" in md
    err = md[md.index("<!-- page 2 -->") + 15:md.index("<!-- page 3 -->")]
    assert "<!-- error: /s/d.pdf: page 2 - - broken - -> -->" in err  # the comment cannot be closed early
    assert render([row("i", text="  an image  ")]) == "an image\n"


def test_markdown_paths_relative_to_the_input_root(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    assert input_root(str(tmp_path / "in")) == str(tmp_path / "in")
    assert input_root(str(tmp_path / "in" / "**" / "*.pdf")) == str(tmp_path / "in")
    assert input_root("s3://b/scans/2024/") == "s3://b/scans/2024/"
    assert input_root("s3://b/scans/*.pdf") == "s3://b/scans/"
    assert relative_name(f"{tmp_path}/in/sub/a.pdf", str(tmp_path / "in")) == "sub/a.pdf"
    assert relative_name("s3://b/scans/x/y.png", "s3://b/scans/") == "x/y.png"
    assert relative_name("../../etc/passwd", "/in") == "_/_/etc/passwd"  # never outside DIR
    assert common_root(["/a/b/c.pdf", "/a/b/d/e.png"]) == "/a/b"


def test_export_builds_every_document_from_the_sink(tmp_path):
    out = tmp_path / "out"
    with open_sink(str(out)) as sink:
        sink.write([row("p2", page=2, source="/in/doc.pdf", text="two"), row("img", source="/in/sub/a.png")])
        sink.write([row("p1", page=1, source="/in/doc.pdf", text="one")])  # another run, another part
    p = subprocess.run([sys.executable, "-m", "jobs.pagemill", "export", "--output", str(out),
                        "--markdown", str(tmp_path / "md")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "2 document(s)" in p.stdout
    doc = (tmp_path / "md" / "doc.pdf.md").read_text()
    assert doc.index("one") < doc.index("two")
    assert (tmp_path / "md" / "sub" / "a.png.md").read_text() == "text of img\n"
    with open_sink(str(out)) as sink:
        assert export_markdown(sink, str(tmp_path / "md2"), "/in") == 2


# ------------------------------------------------------------------ contact sheet


def _png(w: int, h: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), "gray").save(buf, format="PNG")
    return buf.getvalue()


def test_contact_sheet_shows_every_item_escaped_and_keeps_earlier_thumbnails(tmp_path):
    path = tmp_path / "sheet.html"
    header = SheetHeader(job="catalog", model="smoke", smoke_model=True, started_at="2026-01-01T00:00:00+00:00",
                         output="out", skipped=1)
    items = json.dumps({"caption": "c", "items": [{"label": "<b>jar</b>", "box": [1, 1, 5, 5]}],
                        "label_text": ["<script>x</script>"]})
    first = SheetBuilder(path, 10)
    first.add(row("a", items_json=items, width=20, height=10), _png(20, 10))
    first.write([row("a", items_json=items, width=20, height=10)], header)
    assert set(previous_thumbs(path)) == {"a"}
    second = SheetBuilder(path, 10)  # a later run: a new item and a failure; "a" comes from the sink only
    second.add(row("b"), _png(8, 8))
    rows = [row("a", items_json=items, width=20, height=10), row("b"),
            row("e", status="error", error="/in/e.png: <corrupt> & bad")]
    html_text = second.write(rows, header).read_text()
    assert html_text.count("<figure ") == 3
    assert 'id="n-ok">2<' in html_text and 'id="n-error">1<' in html_text and 'id="n-skipped">1<' in html_text
    assert "&lt;b&gt;jar&lt;/b&gt;" in html_text and "<script>x</script>" not in html_text
    assert "&lt;corrupt&gt; &amp; bad" in html_text and "randomly initialised" in html_text
    assert html_text.count("data:image/png;base64,") == 2  # "a" kept its thumbnail from the previous sheet
    assert html_text.index('data-id="e"') < html_text.index('data-id="a"')  # errors first
    assert 'href="file:///in/a.png"' in html_text


# ------------------------------------------------------------------ summary place, preflight, inspect


def test_summary_goes_beside_the_output_never_inside_or_in_the_cwd(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEMILL_CACHE", str(tmp_path / "cache"))
    c = JobConfig(input="i", model="m", output=str(tmp_path / "pq"))
    assert side_path(c, "summary.json") == tmp_path / "pq.summary.json"
    c = JobConfig(input="i", model="m", output="sqlite:///out/x.db")
    assert side_path(c, "summary.json") == Path("out/x.db.summary.json")
    c = JobConfig(input="i", model="m", output=PG)
    assert side_path(c, "summary.json", "2026-01-02T03:04:05+00:00").parent == tmp_path / "cache" / "runs"


def test_preflight_refusals_are_one_line(tmp_path):
    with pytest.raises(PreflightError, match="not found"):
        check_model(str(tmp_path / "nope"), str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreflightError, match="no inputs found"):
        check_input(JobConfig(input=str(tmp_path / "empty"), model="m", output="o"))
    out = tmp_path / "out"
    with open_sink(str(out)) as sink:
        sink.write([row("a"), row("b")])
        config = JobConfig(job="catalog", input="i", model="m", output=str(out))
        with pytest.raises(PreflightError) as e:
            check_output_owner(sink, config)
        msg = str(e.value)
        assert "2 row(s)" in msg and "job digitize" in msg and "--append" in msg and "\n" not in msg
        check_output_owner(sink, config.model_copy(update={"append": True}))


def test_inspect_counts_and_latest_errors(tmp_path):
    with open_sink(str(tmp_path / "o")) as sink:
        sink.write([row("a"), row("b", status="error"), row("c", finish_reason="length")])
    p = subprocess.run([sys.executable, "-m", "jobs.pagemill", "inspect", str(tmp_path / "o")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "3 row(s)" in p.stdout and "by status: 2 ok, 1 error" in p.stdout
    assert "1 eos" in p.stdout and "1 length" in p.stdout and "by job: 3 digitize" in p.stdout
    assert "/in/a.png: broken" in p.stdout and " b " in p.stdout
    with open_sink(str(tmp_path / "o")) as sink:
        assert "by config_hash: 3 h1" in inspect_output(sink)


# ------------------------------------------------------------------ the command line


def test_help_per_job_grouped_with_effective_defaults_and_examples():
    text = build_parser("digitize").format_help()
    for group in ("input:", "output:", "model:", "generation:", "resources:", "limits:"):
        assert group in text
    assert "--markdown" in text and "examples:" in text and text.count("pagemill digitize --input") >= 2
    assert repr(DEFAULT_PROMPTS["digitize"])[:30] in text.replace("\n", "").replace("  ", "")
    assert "[default: 1024]" in text  # configs/digitize.yaml, not the field's default
    catalog = build_parser("catalog").format_help()
    assert "--markdown" not in catalog and "[default: 512]" in catalog
    assert effective_defaults("digitize")["contact_sheet"] is False


def test_config_file_is_layered_over_the_builtin_defaults(tmp_path):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("max_new_tokens: 7\n")
    c = parse_config("digitize", ["--config", str(cfg), "--input", "samples", "--model", "smoke"])
    assert c.max_new_tokens == 7 and c.output == "sqlite:///out/digitize.db" and c.contact_sheet is False


def test_console_script_version_and_one_line_errors(tmp_path):
    exe = Path(sys.executable).with_name("pagemill")
    v = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert v.returncode == 0 and v.stdout.startswith("pagemill ")
    bad = subprocess.run([str(exe), "digitize", "--input", "samples", "--output", str(tmp_path / "o"),
                          "--model", str(tmp_path / "no-model")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        f"pagemill digitize: error: checkpoint '{tmp_path / 'no-model'}' not found: not an existing directory, "
        "a URL or an org/name hub id"]
    assert not (tmp_path / "o").exists()  # refused before the output was even created
    (tmp_path / "empty").mkdir()
    empty = subprocess.run([sys.executable, "-m", "jobs.digitize", "--input", str(tmp_path / "empty"),
                            "--output", str(tmp_path / "o"), "--model", str(smoke_checkpoint())], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert empty.returncode == 1 and "Traceback" not in empty.stderr
    assert empty.stderr.strip().splitlines()[-1].startswith("pagemill digitize: error: input ")
    assert len(empty.stderr.strip().splitlines()) == 1


def test_progress_line_in_a_terminal_counts_the_listing():
    import io
    import time

    from pipeline.progress import Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    p = Progress("digitize", iter(range(40)), stream=out, every=0.0)
    deadline = time.time() + 10
    while p.listed != 40 and time.time() < deadline:  # counted by a background thread
        time.sleep(0.01)
    p.update(10, 12, 1)
    p.close()
    line = out.getvalue()
    assert line.startswith("\rpagemill digitize: 10/40 items · ") and "pages/s · 1 error(s) · ETA 0:" in line
    assert line.endswith("\n")
    quiet = io.StringIO()  # not a terminal: nothing drawn
    Progress("digitize", iter(range(3)), stream=quiet).update(1, 1, 0, force=True)
    assert quiet.getvalue() == ""


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "parquet"])
def test_counts_by_job_and_config_in_every_sink(tmp_path, kind):
    from connectors.scan import counts

    table = "t_" + uuid.uuid4().hex[:12]
    dst = {"sqlite": f"sqlite:///{tmp_path}/c.db", "postgresql": PG, "parquet": str(tmp_path / "pq")}[kind]
    try:
        with open_sink(dst, table=table) as sink:
            sink.write([row("a"), row("b"), row("c", job="catalog", config_hash="h2")])
            got = counts(sink, ["job", "config_hash"])
        assert got == {("digitize", "h1"): 2, ("catalog", "h2"): 1}
    finally:
        if kind == "postgresql":
            import psycopg

            with psycopg.connect(PG, autocommit=True) as conn:
                conn.execute(f"DROP TABLE IF EXISTS {table}")


def test_markdown_to_s3(tmp_path, s3_endpoint):  # noqa: F811
    import boto3

    from connectors.s3 import S3Options

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="docs")
    with open_sink(str(tmp_path / "o")) as sink:
        sink.write([row("p1", page=1, source="/in/x/doc.pdf", text="one"), row("i", source="/in/a.png")])
        assert export_markdown(sink, "s3://docs/md/", "/in", S3Options(endpoint_url=s3_endpoint)) == 2
    body = boto3.client("s3", endpoint_url=s3_endpoint).get_object(Bucket="docs", Key="md/x/doc.pdf.md")["Body"]
    assert "<!-- page 1 -->" in body.read().decode()


def test_a_local_pdf_is_written_as_soon_as_its_last_page_has_a_row(tmp_path):
    from pipeline.markdown import MarkdownWriter, local_pdf_pages
    from tests.test_pipeline_support import pdf_bytes

    (tmp_path / "in").mkdir()
    pdf = tmp_path / "in" / "doc.pdf"
    pdf.write_bytes(pdf_bytes(3))
    md = tmp_path / "md"
    w = MarkdownWriter(str(md), str(tmp_path / "in"), expected=local_pdf_pages("2-", 1000),
                       prior={"/elsewhere/old.pdf"})
    w.add([row("p3", page=3, source=str(pdf), text="three")])
    assert not (md / "doc.pdf.md").exists()  # page 2 is still missing
    w.add([row("p2", page=2, source=str(pdf), text="two"), row("o1", page=1, source="/elsewhere/old.pdf")])
    doc = (md / "doc.pdf.md").read_text()  # written before the run ends, pages 2-3 as selected
    assert doc.index("<!-- page 2 -->") < doc.index("two") < doc.index("<!-- page 3 -->") < doc.index("three")
    assert w.touched == {"/elsewhere/old.pdf"}  # a document with rows from an earlier run waits for the sink
