"""End to end through Ray Data on CPU with a random mini checkpoint: every source and sink kind,
bad inputs, resume, a model actor dying mid-run, the catalog job's structure and contact sheet."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from pipeline.config import JobConfig
from pipeline.generate import CRASH_ENV
from pipeline.run import run_job
from tests.s3server import s3_endpoint  # noqa: F401 - fixture
from tests.test_pipeline_support import image_bytes, make_folder, pdf_bytes, read_rows, smoke_checkpoint, summary_of

PG = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def ray_session():
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def cfg(input: str, output: str, **kw) -> JobConfig:
    base = dict(model=str(smoke_checkpoint()), max_new_tokens=4, cpu_batch_size=2, model_batch_size=2,
                pdf_longest_side=384)
    return JobConfig(input=input, output=output, **(base | kw))


def check_rows(rows: list[dict], n: int, config: JobConfig) -> None:
    assert len(rows) == n and len({r["id"] for r in rows}) == n
    for r in rows:
        assert r["status"] == "ok", r["error"]
        assert r["width"] > 0 and r["height"] > 0 and r["text"] is not None
        assert r["generated_tokens"] >= 0 and r["prompt_tokens"] > 0 and r["generate_ms"] > 0
        assert 0 <= r["queue_ms"] and 0 < r["prefill_ms"] and r["queue_ms"] + r["prefill_ms"] <= r["generate_ms"]
        assert r["finish_reason"] == ("length" if r["generated_tokens"] == config.max_new_tokens else "eos")
        assert r["config_hash"] == config.config_hash() and r["model_revision"].startswith("sha256:")
        assert r["prompt"] == config.effective_prompt and r["job"] == config.job
        assert isinstance(json.loads(r["boxes_json"]), list)
        page = r["page"]
        assert (page is None) == (not r["source"].endswith(".pdf") and "pdf" not in r["source"])
    pdf_pages = sorted(r["page"] for r in rows if r["page"] is not None)
    assert pdf_pages == list(range(1, len(pdf_pages) + 1))


def test_folder_to_parquet_then_resume(ray_session, tmp_path):
    n = make_folder(tmp_path / "in")
    out = tmp_path / "out"
    config = cfg(str(tmp_path / "in"), str(out))
    s = run_job(config)
    assert (s.items_ok, s.items_failed, s.items_skipped) == (n, 0, 0)
    check_rows(read_rows(str(out)), n, config)
    assert summary_of(tmp_path / "out.summary.json")["items_ok"] == n
    # re-run: everything is already there
    s2 = run_job(config)
    assert (s2.items_ok, s2.items_skipped) == (0, n)
    assert len(read_rows(str(out))) == n


def test_identical_files_give_one_parquet_row(ray_session, tmp_path):
    """Ids are content hashes: the same image under two names, in different batches, is one row."""
    (tmp_path / "in").mkdir()
    for name, i in (("a.png", 0), ("b.png", 1), ("c.png", 2), ("d.png", 3), ("z-copy-of-a.png", 0)):
        (tmp_path / "in" / name).write_bytes(image_bytes(i))
    out = tmp_path / "out"
    run_job(cfg(str(tmp_path / "in"), str(out), cpu_batch_size=1, model_batch_size=1))
    ids = pq.read_table(str(out)).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 4


def test_folder_to_sqlite_with_page_range(ray_session, tmp_path):
    make_folder(tmp_path / "in", n_images=1, pdf_pages=4)
    db = tmp_path / "o" / "rows.db"
    config = cfg(str(tmp_path / "in"), f"sqlite:///{db}", page_range="2-3", table="digitized")
    s = run_job(config)
    rows = read_rows(config.output, "digitized")
    assert s.items_ok == 3 and len(rows) == 3
    assert sorted(r["page"] for r in rows if r["page"]) == [2, 3]
    assert Path(str(db) + ".summary.json").is_file()


def test_folder_to_postgres(ray_session, tmp_path):
    import psycopg

    n = make_folder(tmp_path / "in", n_images=2, pdf_pages=2)
    table = "t_" + uuid.uuid4().hex[:12]
    config = cfg(str(tmp_path / "in"), PG, table=table, summary_path=str(tmp_path / "s.json"))
    try:
        s = run_job(config)
        assert s.items_ok == n
        check_rows(read_rows(PG, table), n, config)
    finally:
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")


def test_s3_prefix_input(ray_session, tmp_path, s3_endpoint):  # noqa: F811
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="scans")
    s3.put_object(Bucket="scans", Key="batch1/a.png", Body=image_bytes(1))
    s3.put_object(Bucket="scans", Key="batch1/deep/b.jpg", Body=image_bytes(2, "JPEG"))
    s3.put_object(Bucket="scans", Key="batch1/c.pdf", Body=pdf_bytes(2))
    s3.put_object(Bucket="scans", Key="other/x.png", Body=image_bytes(3))
    # Ray workers predate this test's environment, so S3 settings travel in the config.
    config = cfg("s3://scans/batch1/", f"sqlite:///{tmp_path}/s3.db", s3_endpoint_url=s3_endpoint,
                 s3_region="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    s = run_job(config)
    rows = read_rows(config.output)
    assert s.items_ok == 4 and len(rows) == 4
    assert all(r["source"].startswith("s3://scans/batch1/") for r in rows)


def test_parquet_tables_of_bytes_and_uris(ray_session, tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    paths = []
    for i in range(3):
        p = files / f"f{i}.png"
        p.write_bytes(image_bytes(10 + i))
        paths.append(str(p))
    pq.write_table(pa.table({"name": ["x0", "x1", "x2", "doc"],
                             "image": [image_bytes(20), image_bytes(21), image_bytes(22), pdf_bytes(2, "tbl")]}),
                   tmp_path / "bytes.parquet")
    pq.write_table(pa.table({"uri": paths}), tmp_path / "uris.parquet")

    c1 = cfg(str(tmp_path / "bytes.parquet"), f"sqlite:///{tmp_path}/b.db", id_column="name")
    assert run_job(c1).items_ok == 5
    rows = read_rows(c1.output)
    assert sorted(r["source"] for r in rows) == ["doc", "doc", "x0", "x1", "x2"]

    c2 = cfg(str(tmp_path / "uris.parquet"), f"sqlite:///{tmp_path}/u.db")
    assert run_job(c2).items_ok == 3
    assert sorted(r["source"] for r in read_rows(c2.output)) == paths


def test_mixed_corrupt_set_gives_one_error_row_per_bad_file(ray_session, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "good1.png").write_bytes(image_bytes(30))
    (d / "good2.pdf").write_bytes(pdf_bytes(2, "good"))
    good = image_bytes(31)
    (d / "truncated.png").write_bytes(good[: len(good) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "garbage.jpg").write_bytes(os.urandom(2000))
    (d / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj <<>>\n" + os.urandom(300))
    config = cfg(str(d), str(tmp_path / "out"))
    s = run_job(config)
    rows = read_rows(config.output)
    by_file = {}
    for r in rows:
        by_file.setdefault(Path(r["source"]).name, []).append(r)
    assert s.items_ok == 3 and s.items_failed == 4 and len(rows) == 7
    assert [r["status"] for r in by_file["good2.pdf"]] == ["ok", "ok"]
    for bad in ("truncated.png", "empty.jpg", "garbage.jpg", "broken.pdf"):
        (r,) = by_file[bad]
        assert r["status"] == "error" and bad in r["error"] and r["text"] is None
    # errors are not retried by default, and are retried with retry_errors
    assert run_job(config).items_skipped == 7
    s3 = run_job(config.model_copy(update={"retry_errors": True}))
    assert (s3.items_failed, s3.items_skipped) == (4, 3)
    assert len(read_rows(config.output)) == 7
    # the retried error rows replaced the old ones: any reader of the directory sees one row per id
    ids = pq.read_table(config.output).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 7


def test_model_actor_dies_mid_run_and_nothing_is_lost(ray_session, tmp_path, monkeypatch):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(6):
        (d / f"i{i}.png").write_bytes(image_bytes(40 + i))
    marker = tmp_path / "crashed.json"
    monkeypatch.setenv(CRASH_ENV, str(marker))
    config = cfg(str(d), f"sqlite:///{tmp_path}/crash.db", model_batch_size=1)
    s = run_job(config)
    assert marker.is_file(), "the model actor was supposed to die once"
    rows = read_rows(config.output)
    assert s.items_ok == 6 and len(rows) == 6 and all(r["status"] == "ok" for r in rows)


def test_catalog_rows_and_contact_sheet(ray_session, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.png").write_bytes(image_bytes(50, size=(200, 120)))
    (d / "b.jpg").write_bytes(image_bytes(51, "JPEG"))
    out = tmp_path / "cat"
    config = cfg(str(d), str(out), job="catalog")
    s = run_job(config)
    rows = read_rows(str(out))
    assert s.items_ok == 2 and len(rows) == 2
    for r in rows:
        rec = json.loads(r["items_json"])
        assert set(rec) == {"caption", "items", "label_text"}
        assert "catalog" == r["job"] and "Describe the items" in r["prompt"]
    sheet = (tmp_path / "cat.contact_sheet.html").read_text()
    assert sheet.count("<figure ") == 2 and "data:image/png;base64," in sheet


def test_engine_rows_equal_static_batch_generate(ray_session, tmp_path):
    """The engine stage gives the rows the old stage gave: per item, `model.generate` on the prepared
    tiles, trimmed at EOS and decoded (text and token counts), for greedy and for seeded sampling."""
    import numpy as np

    from model import load_pretrained
    from model.grounding import strip_grounding
    from pipeline.generate import item_seed
    from pipeline.preprocess import Preprocess, unpack_arrays

    n = make_folder(tmp_path / "in")
    for kw in (dict(max_new_tokens=12), dict(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=5)):
        config = cfg(str(tmp_path / "in"), f"sqlite:///{tmp_path}/engine-{len(kw)}.db", **kw)
        run_job(config)
        rows = {r["id"]: r for r in read_rows(config.output)}
        assert len(rows) == n
        model, processor = load_pretrained(str(smoke_checkpoint()))
        pre = Preprocess(config, str(smoke_checkpoint()))
        from pipeline.source import iter_ref_blocks
        from pipeline.preprocess import source_options

        checked = 0
        for block in iter_ref_blocks(config.input, source_options(config), None):
            refs = {k: np.array(block.column(k).to_pylist(), dtype=object) for k in block.column_names}
            for out in pre(refs):
                for i in range(len(out["id"])):
                    if out["status"][i] != "ok":
                        continue
                    prep = processor.unpack(unpack_arrays(out["prep"][i]))
                    ids = model.generate(processor.collate([prep]), max_new_tokens=config.max_new_tokens,
                                         temperature=config.temperature, top_p=config.top_p,
                                         seed=item_seed(config.seed, str(out["id"][i])))[0].tolist()
                    ids = ids[: ids.index(processor.eos_id)] if processor.eos_id in ids else ids
                    row = rows[str(out["id"][i])]
                    text = strip_grounding(processor.decode(ids, skip_special_tokens=False)).strip()
                    assert (row["text"], row["generated_tokens"]) == (text, len(ids)), row["source"]
                    checked += 1
        assert checked == n


def test_s3_faults_end_with_one_row_per_item(ray_session, tmp_path, s3_endpoint):  # noqa: F811
    """S3 in and out through a loopback proxy that breaks response bodies: every read is retried, the job
    completes, and an input that stayed unreadable keeps one error row until a --retry-errors run reads it."""
    from tests.faultproxy import S3FaultProxy, first_gets_fail

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="flaky")
    for i in range(3):
        s3.put_object(Bucket="flaky", Key=f"in/i{i}.png", Body=image_bytes(500 + i))
    s3.put_object(Bucket="flaky", Key="in/doc.pdf", Body=pdf_bytes(2, "flaky"))
    n = 3 + 2
    dead = "flaky/in/i2.png"
    # Run 1: the first two GETs of every object break (retried); i2.png breaks every time (an error row).
    policy = first_gets_fail(2)
    with S3FaultProxy(s3_endpoint, lambda m, k, nth: "truncate" if k == dead else policy(m, k, nth)) as proxy:
        config = cfg("s3://flaky/in/", "s3://flaky/out/", s3_endpoint_url=proxy.url, s3_region="us-east-1",
                     summary_path=str(tmp_path / "summary.json"),
                     aws_access_key_id="testing", aws_secret_access_key="testing")
        s1 = run_job(config)
        assert (s1.items_ok, s1.items_failed) == (n - 1, 1)
        assert proxy.counts[dead] == 6 and any(k.startswith("flaky/in/i0") for k, _ in proxy.faults)
    # Run 2, plain: reading the output back breaks too (retried); the error row is kept and i2 is not read.
    with S3FaultProxy(s3_endpoint, first_gets_fail(1)) as proxy:
        s2 = run_job(config.model_copy(update={"s3_endpoint_url": proxy.url}))
        assert (s2.items_ok, s2.items_failed, s2.items_skipped) == (0, 0, n)
        assert proxy.counts[dead] == 0 and any(k.startswith("flaky/out/part-") for k, _ in proxy.faults)
    # Run 3, --retry-errors, S3 healthy: i2 is read, and its content row replaces its unreadable row.
    s3_ = run_job(config.model_copy(update={"s3_endpoint_url": s3_endpoint, "retry_errors": True}))
    assert (s3_.items_ok, s3_.items_failed) == (1, 0)
    rows = []
    for key in sorted(o["Key"] for o in s3.list_objects_v2(Bucket="flaky", Prefix="out/part-")["Contents"]):
        rows += pq.read_table(pa.BufferReader(s3.get_object(Bucket="flaky", Key=key)["Body"].read())).to_pylist()
    assert len(rows) == n and len({r["id"] for r in rows}) == n and all(r["status"] == "ok" for r in rows)
