"""Listing inputs (local folder/glob, S3 prefix, Parquet table) and reading their bytes.

Everything is a generator: listings of millions of objects and Parquet tables of
image bytes are streamed, never materialized.
"""

import fnmatch
import glob
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import Field, field_validator
from urllib3.exceptions import HTTPError as URLLib3Error

from connectors.errors import InputError
from connectors.record import Record
from connectors.redact import redact
from connectors.s3 import (READ_ATTEMPTS, ObjectTooBig, S3Options, arrow_s3_fs, get_object_bytes, is_transient,
                           s3_client, split_s3_url)

log = logging.getLogger(__name__)

DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".pdf")
_GLOB_CHARS = set("*?[")
# Column names tried (in order) when bytes_column / uri_column are not given.
_BYTES_NAMES = ("bytes", "image", "data", "content", "image_bytes")
_URI_NAMES = ("uri", "url", "path", "source", "image_uri", "image_url")


class SourceOptions(S3Options):
    id_column: str | None = None
    bytes_column: str | None = None
    uri_column: str | None = None
    max_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    s3_page_size: int = Field(default=1000, ge=1, le=1000)  # MaxKeys per list_objects_v2 call
    parquet_batch_rows: int = Field(default=16, ge=1)  # rows of image bytes held in memory at once

    @field_validator("extensions", mode="before")
    @classmethod
    def _dotted_lower(cls, v: object) -> object:
        if isinstance(v, str):
            v = v.split(",")
        if isinstance(v, (list, tuple)):
            return tuple("." + str(e).strip().lower().lstrip(".") for e in v if str(e).strip())
        return v


class InputRef(Record):
    """One input file or Parquet row. Dict-like (`ref["source"]`, `dict(ref)`) for Ray batches.

    `data` is set only for Parquet tables of bytes (then `source` is the row's path/URI column or
    `<table>#row=N`, which `read_bytes` cannot read); otherwise read `source` with `read_bytes`.
    """

    source: str
    data: bytes | None = None
    size: int | None = None
    key: str | None = None  # value of SourceOptions.id_column, if configured


def _has_ext(name: str, exts: tuple[str, ...]) -> bool:
    return name.lower().endswith(tuple(e.lower() for e in exts))


def _is_parquet(name: str) -> bool:
    return name.lower().rstrip("/").endswith(".parquet")


def _hidden(rel: str) -> bool:
    # Spark/Hive/our own sink markers (_SUCCESS, .tmp parts) are never inputs.
    return any(p.startswith((".", "_")) for p in rel.split("/") if p)


def list_inputs(spec: str, *, options: SourceOptions | None = None) -> Iterator[InputRef]:
    """Yield inputs for `spec`: a local file/folder/glob, `s3://bucket/prefix[glob]`, or a Parquet table.

    A folder or prefix with image/PDF files yields those; one holding only `.parquet` files is a table.
    """
    opts = options or SourceOptions()
    if spec.startswith("file://"):
        spec = spec[len("file://"):]
    if spec.startswith("s3://"):
        yield from _list_s3(spec, opts)
    else:
        yield from _list_local(spec, opts)


# ---------------------------------------------------------------- local


def _list_local(spec: str, opts: SourceOptions) -> Iterator[InputRef]:
    path = Path(spec)
    if _GLOB_CHARS & set(spec):
        files = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    elif path.is_file():
        if not _is_parquet(spec):  # named explicitly: decode it whatever its extension, errors become rows
            yield InputRef(source=os.path.abspath(spec), size=os.path.getsize(spec))
            return
        files = [spec]
    elif path.is_dir():
        files = sorted(
            str(p) for p in path.rglob("*") if p.is_file() and not _hidden(str(p.relative_to(path)))
        )
    else:
        raise InputError(f"{spec}: no such file or directory")
    media = [f for f in files if _has_ext(f, opts.extensions) and not _is_parquet(f)]
    tables = [f for f in files if _is_parquet(f)]
    if media:
        if tables:
            log.warning("%s: mixes media and Parquet files; ignoring %d Parquet files", spec, len(tables))
        for f in media:
            yield InputRef(source=os.path.abspath(f), size=os.path.getsize(f))
    elif tables:
        for f in tables:
            yield from _read_table(os.path.abspath(f), pafs.LocalFileSystem(), os.path.abspath(f), opts)
    else:
        log.warning("%s: no inputs found (extensions: %s)", spec, ", ".join(opts.extensions))


# ---------------------------------------------------------------- S3


def _list_s3(spec: str, opts: SourceOptions) -> Iterator[InputRef]:
    bucket, key = split_s3_url(spec)
    pattern = key if _GLOB_CHARS & set(key) else None
    prefix = key[: min(key.index(c) for c in _GLOB_CHARS if c in key)] if pattern else key
    client = s3_client(opts)
    paginator = client.get_paginator("list_objects_v2")
    tables: list[str] = []
    n_media = 0
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": opts.s3_page_size}):
            for obj in page.get("Contents", []):
                k = obj["Key"]
                if k.endswith("/") or (pattern and not fnmatch.fnmatchcase(k, pattern)):
                    continue
                if _hidden(k[len(prefix):] if not pattern else k.rsplit("/", 1)[-1]):
                    continue
                if _is_parquet(k):
                    tables.append(k)
                elif _has_ext(k, opts.extensions):
                    n_media += 1
                    yield InputRef(source=f"s3://{bucket}/{k}", size=obj["Size"])
    except (ClientError, BotoCoreError) as e:
        raise InputError(redact(f"{spec}: cannot list: {e}")) from None
    if tables and not n_media:
        fs = arrow_s3_fs(opts)
        for k in tables:
            yield from _read_table(f"{bucket}/{k}", fs, f"s3://{bucket}/{k}", opts)
    elif tables:
        log.warning("%s: mixes media and Parquet objects; ignoring %d Parquet objects", spec, len(tables))
    elif not n_media:
        log.warning("%s: no inputs found", spec)


# ---------------------------------------------------------------- Parquet


def _is_bin(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_str(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _pick(schema: pa.Schema, wanted: str | None, names: tuple[str, ...], ok_type, url: str, *, only_one: bool) -> str | None:
    """The configured column, else a well-known name of the right type, else the only column of that type."""
    if wanted:
        if wanted not in schema.names:
            raise InputError(f"{url}: Parquet has no column {wanted!r} (columns: {', '.join(schema.names)})")
        return wanted
    for n in names:
        if n in schema.names and ok_type(schema.field(n).type):
            return n
    candidates = [f.name for f in schema if ok_type(f.type)]
    return candidates[0] if only_one and len(candidates) == 1 else None


def _read_table(path: str, fs: pafs.FileSystem, url: str, opts: SourceOptions) -> Iterator[InputRef]:
    """Stream one Parquet file batch by batch; a table holds image bytes (optionally with a name) or URIs."""
    try:
        f = fs.open_input_file(path)
        pf = pq.ParquetFile(f)
    except (OSError, pa.ArrowException) as e:
        raise InputError(redact(f"{url}: cannot open Parquet: {e}")) from None
    with f:
        schema = pf.schema_arrow
        bcol = _pick(schema, opts.bytes_column, _BYTES_NAMES, _is_bin, url, only_one=opts.uri_column is None)
        # With bytes, a URI/path column only names the row, so it is taken by name, never guessed.
        ucol = _pick(schema, opts.uri_column, _URI_NAMES, _is_str, url, only_one=bcol is None)
        if not bcol and not ucol:
            raise InputError(
                f"{url}: cannot tell which column holds image bytes or URIs (columns: {', '.join(schema.names)});"
                " set bytes_column or uri_column"
            )
        if opts.id_column and opts.id_column not in schema.names:
            raise InputError(f"{url}: Parquet has no id column {opts.id_column!r}")
        cols = [c for c in dict.fromkeys([bcol, ucol, opts.id_column]) if c]
        row = 0
        for batch in pf.iter_batches(batch_size=opts.parquet_batch_rows, columns=cols):
            d = batch.to_pydict()
            for i in range(batch.num_rows):
                key = d[opts.id_column][i] if opts.id_column else None
                key = None if key is None else str(key)
                uri = d[ucol][i] if ucol else None
                if bcol:
                    data = d[bcol][i] or b""  # a null cell decodes as an empty file: an error row, not a crash
                    yield InputRef(
                        source=uri or f"{url}#row={row}", data=data, size=len(data), key=key
                    )
                elif uri:
                    yield InputRef(source=uri, key=key)
                else:
                    log.warning("%s#row=%d: empty URI, skipped", url, row)
                row += 1


# ---------------------------------------------------------------- reading


def read_bytes(source: str, *, options: SourceOptions | None = None) -> bytes:
    """Read a whole input (`/path`, `file://`, `s3://`), refusing empty or oversized ones."""
    opts = options or SourceOptions()
    if source.startswith("s3://"):
        return _read_s3(source, opts)
    path = source[len("file://"):] if source.startswith("file://") else source
    try:
        size = os.stat(path).st_size
        if os.path.isdir(path):
            raise InputError(f"{source}: is a directory")
        _check_size(source, size, opts)
        with open(path, "rb") as fh:
            data = fh.read(opts.max_bytes + 1)
    except FileNotFoundError:
        raise InputError(f"{source}: file not found") from None
    except PermissionError:
        raise InputError(f"{source}: permission denied") from None
    except OSError as e:
        raise InputError(f"{source}: cannot read: {e.strerror or e}") from None
    _check_size(source, len(data), opts)  # the file may have changed since stat
    return data


def _check_size(source: str, size: int, opts: SourceOptions) -> None:
    if size == 0:
        raise InputError(f"{source}: file is empty (0 bytes)")
    if size > opts.max_bytes:
        raise InputError(f"{source}: file is too big ({size} bytes > max_bytes={opts.max_bytes})")


def _read_s3(source: str, opts: SourceOptions) -> bytes:
    try:
        bucket, key = split_s3_url(source)
    except ValueError as e:
        raise InputError(redact(str(e))) from None
    try:
        data = get_object_bytes(s3_client(opts), bucket, key, max_bytes=opts.max_bytes)
    except ObjectTooBig as e:
        _check_size(source, e.size, opts)
        raise
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            raise InputError(f"{source}: object not found") from None
        if code in ("AccessDenied", "403"):
            raise InputError(f"{source}: access denied") from None
        raise InputError(redact(f"{source}: cannot read: {e}")) from None
    except (BotoCoreError, URLLib3Error, OSError) as e:
        tries = f" after {READ_ATTEMPTS} attempts" if is_transient(e) else ""
        raise InputError(redact(f"{source}: cannot read{tries}: {e}")) from None
    _check_size(source, len(data), opts)
    return data
