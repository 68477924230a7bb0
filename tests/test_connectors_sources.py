"""connectors.sources against the local filesystem and a real (moto server) S3."""

import io
import os
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.errors import InputError
from connectors.s3 import s3_client
from connectors.sources import InputRef, SourceOptions, list_inputs, read_bytes
from tests.s3server import s3_endpoint  # noqa: F401 - pytest fixture


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for rel in ("a.png", "sub/b.JPG", "sub/deeper/c.pdf", "sub/notes.txt", ".hidden/d.png", "_tmp/e.png", "f.webp"):
        _touch(tmp_path / rel, rel.encode())
    return tmp_path


def _names(refs, root) -> list[str]:
    return [os.path.relpath(r.source, root) for r in refs]


def test_local_dir_is_recursive_sorted_and_filtered(tree):
    refs = list(list_inputs(str(tree)))
    assert _names(refs, tree) == ["a.png", "f.webp", "sub/b.JPG", "sub/deeper/c.pdf"]
    assert all(os.path.isabs(r.source) and r.data is None for r in refs)
    assert refs[0].size == len(b"a.png")
    assert refs[0]["source"] == refs[0].source and dict(refs[0])["size"] == refs[0].size  # dict-like
    only_pdf = list(list_inputs(f"file://{tree}", options=SourceOptions(extensions=(".pdf",))))
    assert _names(only_pdf, tree) == ["sub/deeper/c.pdf"]


def test_local_glob_and_single_file(tree):
    # a glob means what it says (Python glob: dot-files are not matched, _underscored ones are)
    assert _names(list_inputs(f"{tree}/**/*.p*"), tree) == ["_tmp/e.png", "a.png", "sub/deeper/c.pdf"]
    assert _names(list_inputs(f"{tree}/sub/*"), tree) == ["sub/b.JPG"]
    assert _names(list_inputs(str(tree / "a.png")), tree) == ["a.png"]
    assert _names(list_inputs(str(tree / "sub/notes.txt")), tree) == ["sub/notes.txt"]  # named: taken as is


def test_missing_input_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        list(list_inputs(str(tmp_path / "nope")))


def test_read_bytes_local(tree, tmp_path):
    assert read_bytes(str(tree / "a.png")) == b"a.png"
    assert read_bytes(f"file://{tree}/a.png") == b"a.png"
    with pytest.raises(InputError, match=r"nope.png: file not found"):
        read_bytes(str(tmp_path / "nope.png"))
    with pytest.raises(InputError, match=r"empty.png: file is empty \(0 bytes\)"):
        read_bytes(str(_touch(tmp_path / "empty.png", b"")))
    with pytest.raises(InputError, match=r"too big \(5 bytes > max_bytes=4\)"):
        read_bytes(str(tree / "a.png"), options=SourceOptions(max_bytes=4))
    with pytest.raises(InputError, match="is a directory"):
        read_bytes(str(tree / "sub"))
    if os.geteuid() != 0:  # root reads anything
        p = _touch(tmp_path / "locked.png")
        p.chmod(0)
        with pytest.raises(InputError, match="permission denied"):
            read_bytes(str(p))


# ---------------------------------------------------------------- Parquet


def _write_parquet(path, table: pa.Table, **kw) -> None:
    pq.write_table(table, path, **kw)


def test_parquet_of_bytes_is_streamed(tmp_path, monkeypatch):
    images = [f"img{i}".encode() for i in range(10)]
    t = pa.table({"doc": [f"d{i}" for i in range(10)], "image": images, "caption": ["c"] * 10})
    _write_parquet(tmp_path / "t.parquet", t, row_group_size=3)
    batch_sizes = []
    orig = pq.ParquetFile.iter_batches

    def spy(self, *a, **kw):
        for b in orig(self, *a, **kw):
            batch_sizes.append(b.num_rows)
            assert set(b.schema.names) == {"image", "doc"}  # only the needed columns are read
            yield b

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("whole table read"))
    opts = SourceOptions(id_column="doc", parquet_batch_rows=2)
    refs = list(list_inputs(str(tmp_path / "t.parquet"), options=opts))
    assert [r.data for r in refs] == images
    assert [r.key for r in refs] == [f"d{i}" for i in range(10)]
    assert refs[3].source == f"{tmp_path}/t.parquet#row=3" and refs[3].size == len(images[3])
    assert max(batch_sizes) <= 2


def test_parquet_dir_of_bytes_with_names(tmp_path):
    d = tmp_path / "table"
    d.mkdir()
    for i in range(2):
        _write_parquet(d / f"part-{i}.parquet", pa.table({"path": [f"p{i}.png"], "bytes": [b"b%d" % i]}))
    _touch(d / "_SUCCESS")
    _touch(d / ".part-9.parquet.tmp", b"garbage")  # a half-written part of some writer: ignored
    refs = list(list_inputs(str(d)))
    assert [(r.source, r.data) for r in refs] == [("p0.png", b"b0"), ("p1.png", b"b1")]


def test_parquet_of_uris(tmp_path):
    t = pa.table({"id": [1, 2, 3], "uri": ["s3://b/x.pdf", None, "/data/y.png"]})
    _write_parquet(tmp_path / "u.parquet", t)
    refs = list(list_inputs(str(tmp_path / "u.parquet"), options=SourceOptions(id_column="id")))
    assert [(r.source, r.key, r.data) for r in refs] == [("s3://b/x.pdf", "1", None), ("/data/y.png", "3", None)]


def test_parquet_bad_columns(tmp_path):
    _write_parquet(tmp_path / "n.parquet", pa.table({"a": [1], "b": [2.0]}))
    with pytest.raises(InputError, match="cannot tell which column"):
        list(list_inputs(str(tmp_path / "n.parquet")))
    with pytest.raises(InputError, match="no column 'img'"):
        list(list_inputs(str(tmp_path / "n.parquet"), options=SourceOptions(bytes_column="img")))
    _touch(tmp_path / "bad.parquet", b"not parquet")
    with pytest.raises(InputError, match="bad.parquet: cannot open Parquet"):
        list(list_inputs(str(tmp_path / "bad.parquet")))


# ---------------------------------------------------------------- S3


def _bucket(name: str):
    client = boto3.client("s3")  # endpoint and credentials from the environment set by s3_endpoint
    client.create_bucket(Bucket=name)
    return client


def test_s3_prefix_listing_paginates(s3_endpoint):
    client = _bucket("pages")
    for i in range(23):
        client.put_object(Bucket="pages", Key=f"in/{i:03d}.png", Body=b"p" * (i + 1))
    client.put_object(Bucket="pages", Key="in/skip.txt", Body=b"x")
    client.put_object(Bucket="pages", Key="other/z.png", Body=b"x")
    calls = []
    opts = SourceOptions(s3_page_size=5)
    s3_client(opts).meta.events.register("before-call.s3.ListObjectsV2", lambda **kw: calls.append(1))
    refs = list(list_inputs("s3://pages/in/", options=opts))
    assert [r.source for r in refs] == [f"s3://pages/in/{i:03d}.png" for i in range(23)]
    assert refs[4].size == 5
    assert len(calls) == 5  # 24 keys, 5 per page
    globbed = list(list_inputs("s3://pages/in/00*.png", options=opts))
    assert len(globbed) == 10


def test_s3_read_bytes(s3_endpoint):
    client = _bucket("reads")
    client.put_object(Bucket="reads", Key="a.png", Body=b"hello")
    client.put_object(Bucket="reads", Key="empty.png", Body=b"")
    assert read_bytes("s3://reads/a.png") == b"hello"
    with pytest.raises(InputError, match="s3://reads/missing.png: object not found"):
        read_bytes("s3://reads/missing.png")
    with pytest.raises(InputError, match="s3://reads/empty.png: file is empty"):
        read_bytes("s3://reads/empty.png")
    with pytest.raises(InputError, match=r"s3://reads/a.png: file is too big \(5 bytes > max_bytes=3\)"):
        read_bytes("s3://reads/a.png", options=SourceOptions(max_bytes=3))


def test_s3_explicit_options_and_no_secret_in_errors(s3_endpoint, monkeypatch):
    client = _bucket("opts")
    client.put_object(Bucket="opts", Key="a.png", Body=b"hi")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    opts = SourceOptions(endpoint_url=s3_endpoint, region="us-east-1", aws_access_key_id="AKIAIOSFODNN7EXAMPLE",
                         aws_secret_access_key=secret)
    assert read_bytes("s3://opts/a.png", options=opts) == b"hi"
    assert secret not in repr(opts) and secret not in str(opts.model_dump())
    with pytest.raises(InputError) as e:
        list(list_inputs("s3://no-such-bucket/x/", options=opts))
    assert "s3://no-such-bucket/x/" in str(e.value) and secret not in str(e.value)


def test_s3_parquet_of_bytes_and_uris(s3_endpoint):
    client = _bucket("tables")
    for i in range(2):
        buf = io.BytesIO()
        pq.write_table(pa.table({"key": [f"k{i}a", f"k{i}b"], "image": [b"x%d" % i, b"y%d" % i]}), buf, row_group_size=1)
        client.put_object(Bucket="tables", Key=f"bytes/part-{i}.parquet", Body=buf.getvalue())
    client.put_object(Bucket="tables", Key="bytes/_SUCCESS", Body=b"")
    refs = list(list_inputs("s3://tables/bytes/", options=SourceOptions(id_column="key")))
    assert [(r.data, r.key) for r in refs] == [(b"x0", "k0a"), (b"y0", "k0b"), (b"x1", "k1a"), (b"y1", "k1b")]
    assert refs[1].source == "s3://tables/bytes/part-0.parquet#row=1"

    buf = io.BytesIO()
    pq.write_table(pa.table({"url": ["s3://tables/a.png", "s3://tables/b.pdf"]}), buf)
    client.put_object(Bucket="tables", Key="uris.parquet", Body=buf.getvalue())
    refs = list(list_inputs("s3://tables/uris.parquet"))
    assert [r.source for r in refs] == ["s3://tables/a.png", "s3://tables/b.pdf"] and refs[0].data is None


def test_inputref_key_is_optional():
    assert InputRef(source="x").key is None


def test_extensions_are_normalized():
    assert SourceOptions(extensions=["PDF", ".Png"]).extensions == (".pdf", ".png")
    assert SourceOptions(extensions="jpg, tif").extensions == (".jpg", ".tif")


def test_parquet_null_bytes_cell_becomes_empty_data(tmp_path):
    _write_parquet(tmp_path / "n.parquet", pa.table({"bytes": pa.array([b"x", None], pa.binary())}))
    refs = list(list_inputs(str(tmp_path / "n.parquet")))
    assert [(r.data, r.size) for r in refs] == [(b"x", 1), (b"", 0)]


def test_s3_read_survives_broken_bodies_through_a_fault_proxy(s3_endpoint, monkeypatch):
    """Truncated and reset response bodies (after the headers, so botocore does not retry) are read again."""
    from tests.faultproxy import S3FaultProxy, first_gets_fail

    monkeypatch.setattr("connectors.s3._BACKOFF_S", 0.01, raising=False)
    client = _bucket("flaky")
    blobs = {f"in/{i}.png": os.urandom(50_000 + i) for i in range(4)}
    for k, v in blobs.items():
        client.put_object(Bucket="flaky", Key=k, Body=v)
    with S3FaultProxy(s3_endpoint, first_gets_fail(2)) as proxy:
        opts = SourceOptions(endpoint_url=proxy.url)
        for k, v in blobs.items():
            assert read_bytes(f"s3://flaky/{k}", options=opts) == v
        assert sorted({kind for _, kind in proxy.faults}) == ["reset", "truncate"] and len(proxy.faults) == 8
    # a body that always breaks: a clear one-line InputError after the bounded retries, no traceback text
    with S3FaultProxy(s3_endpoint, first_gets_fail(100)) as proxy:
        with pytest.raises(InputError) as e:
            read_bytes("s3://flaky/in/0.png", options=SourceOptions(endpoint_url=proxy.url))
        assert str(e.value).startswith("s3://flaky/in/0.png: cannot read after 6 attempts: ")
        assert "\n" not in str(e.value) and proxy.counts["flaky/in/0.png"] == 6
