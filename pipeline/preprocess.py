"""CPU stage: read an input, expand it into pages, tile them, and hand the model ready tensors.

Runs on CPU actors so that GPU actors only ever see numpy arrays. A bad input becomes an
error row here and flows on; nothing in this stage raises for bad data.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
from collections.abc import Container, Iterator
from typing import Any

import numpy as np

from connectors.decode import DecodeLimits, content_key, expand, is_pdf, row_id
from connectors.errors import InputError
from connectors.redact import redact
from connectors.sinks import UNREADABLE_SUFFIX
from connectors.sources import SourceOptions, read_bytes
from pipeline.config import JobConfig

THUMB_SIDE = 256
# Rows per yielded block: keeps blocks of tiles (MBs each) small enough to stream.
_CHUNK_ROWS = 8


def source_options(config: JobConfig) -> SourceOptions:
    return SourceOptions(
        endpoint_url=config.s3_endpoint_url,
        region=config.s3_region,
        aws_access_key_id=config.aws_access_key_id,
        aws_secret_access_key=config.aws_secret_access_key,
        id_column=config.id_column,
        bytes_column=config.bytes_column,
        uri_column=config.uri_column,
        max_bytes=config.max_bytes,
    )


def decode_limits(config: JobConfig) -> DecodeLimits:
    return DecodeLimits(
        max_pixels=config.max_pixels,
        max_bytes=config.max_bytes,
        max_pdf_pages=config.max_pdf_pages,
        pdf_longest_side=config.pdf_longest_side,
        page_range=config.page_range,
    )


def conversation(prompt: str) -> list[dict[str, str]]:
    return [{"role": "<|User|>", "content": prompt}, {"role": "<|Assistant|>", "content": ""}]


def unreadable_id(source: str) -> str:
    """An input we could not read has no content hash; its name is the only stable key for resume."""
    return hashlib.sha256(("source:" + source).encode()).hexdigest()[:32] + UNREADABLE_SUFFIX


def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """Prepared tensors as one bytes value: Ray blocks then hold a plain binary column of any shape."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack_arrays(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _thumbnail(image: Any) -> bytes:
    thumb = image.copy()
    thumb.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buf = io.BytesIO()
    thumb.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


class _Rows:
    """Column builder with fixed dtypes (sentinels instead of None) so every block has the same schema."""

    def __init__(self) -> None:
        self.cols: dict[str, list[Any]] = {k: [] for k in COLUMNS}

    def add(self, **row: Any) -> None:
        for k, default in COLUMNS.items():
            v = row.get(k)
            self.cols[k].append(default if v is None else v)

    def __len__(self) -> int:
        return len(self.cols["id"])

    def take(self) -> dict[str, np.ndarray]:
        out = {k: np.array(v, dtype=object if isinstance(COLUMNS[k], (str, bytes)) else type(COLUMNS[k]))
               for k, v in self.cols.items()}
        self.cols = {k: [] for k in COLUMNS}
        return out


# column -> value meaning "none" (0 is never a valid page, width or token count)
COLUMNS: dict[str, Any] = {
    "id": "", "source": "", "page": 0, "width": 0, "height": 0, "status": "", "error": "",
    "decode_ms": -1.0, "prompt_tokens": 0, "prep": b"", "thumb": b"",
}


class Preprocess:
    """Ray Data class UDF: input refs -> one row per page/image with packed model inputs.

    Rows leave in chunks of `_CHUNK_ROWS` as pages are rendered, so a 1000-page PDF is never held whole.
    `done_ids` (a `pipeline.resume.DoneSet`, or any set of ids) is skipped before decoding: an image or an
    unreadable input by its id, a PDF page by page without rendering it.
    """

    def __init__(self, config: JobConfig, model_path: str, done_ids: Container[str] = frozenset()) -> None:
        from model import load_processor

        _big_allocations_from_mmap()
        self.processor = load_processor(model_path)
        self.limits = decode_limits(config)
        self.options = source_options(config)
        self.conversation = conversation(config.effective_prompt)
        self.done = done_ids
        self.thumbnails = config.contact_sheet

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        rows = _Rows()
        keys = batch.get("key")
        for i, raw_source in enumerate(batch["source"]):
            data = batch["data"][i] if "data" in batch else None
            name = str(keys[i]) if keys is not None and keys[i] else redact(raw_source)
            for _ in self._one(str(raw_source), name, data, rows):
                if len(rows) >= _CHUNK_ROWS:
                    yield rows.take()
        if len(rows):
            yield rows.take()

    def _one(self, source: str, name: str, data: bytes | None, rows: _Rows) -> Iterator[None]:
        """Add the rows of one input, yielding after each so the caller can ship full chunks."""
        if not data:  # None: a URI to read; b"": an empty Parquet cell, which read_bytes-style checks reject
            uid = unreadable_id(source)
            if uid in self.done:  # its error row stands (errors are kept unless --retry-errors): not even read
                rows.add(id=uid, source=name, status="skipped")
                yield
                return
            try:
                data = read_bytes(source, options=self.options) if data is None else _empty(source)
            except Exception as e:  # noqa: BLE001 - an unexpected reader failure is still one item's error
                msg = str(e) if isinstance(e, InputError) else f"{name}: cannot read: {type(e).__name__}: {e}"
                rows.add(id=uid, source=name, status="error", error=redact(msg))
                yield
                return
        key = content_key(data)
        if not is_pdf(data) and row_id(key, None) in self.done:
            rows.add(id=row_id(key, None), source=name, status="skipped")  # skip before decoding
            yield
            return
        try:
            for page in expand(source, data, limits=self.limits, skip=lambda n: row_id(key, n) in self.done):
                rows.add(**self._page(page, name, key))
                yield
        except Exception as e:  # noqa: BLE001 - expand promises not to raise; belt and braces
            rows.add(id=row_id(key, None), source=name, status="error",
                     error=redact(f"{name}: cannot decode: {type(e).__name__}: {e}"))
            yield

    def _page(self, page: Any, name: str, key: str) -> dict[str, Any]:
        pid = row_id(key, page.page)
        base = {"id": pid, "source": name, "page": page.page, "decode_ms": page.decode_ms}
        if page.skipped or pid in self.done:
            return base | {"status": "skipped"}
        if page.error or page.image is None:
            return base | {"status": "error", "error": redact(page.error or f"{name}: no image decoded")}
        image = page.image
        base |= {"width": image.width, "height": image.height}
        try:
            arrays = self.processor.prepare_packed(self.conversation, [image])
        except Exception as e:  # noqa: BLE001
            return base | {"status": "error", "error": redact(f"{name}: cannot prepare model input: {e}")}
        return base | {
            "status": "ok",
            "prompt_tokens": len(arrays["input_ids"]),
            "prep": pack_arrays(arrays),
            "thumb": _thumbnail(image) if self.thumbnails else b"",
        }


def _big_allocations_from_mmap(threshold: int = 128 * 1024) -> None:
    """Pin glibc's mmap threshold, so page-sized buffers (bitmaps, tiles: MBs each) go back to the OS when freed.

    By default glibc raises the threshold after the first large free and serves later ones from its heap,
    where interleaved pdfium and numpy allocations fragment it: measured, the actor's RSS then grew by
    ~17 MB per page (1.1 GB after 60 pages) although every page was freed; pinned, it stays flat.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _empty(source: str) -> bytes:
    raise InputError(f"{redact(source)}: file is empty (0 bytes)")
