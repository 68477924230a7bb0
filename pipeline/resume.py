"""The done-set: which row ids an output already holds, exact, at ~20 bytes per id instead of ~100.

A resume over an output of tens of millions of rows must not hand every CPU actor a Python set of
every id (gigabytes each). Row ids are `<32 hex of sha256>:<page | img | unreadable>`, so each one is
packed into 20 bytes (16 of hash, 4 of page code) and all of them into one sorted numpy array. The
driver builds it chunk by chunk from the sink (never a Python string per id), puts it in the Ray
object store once, and every actor maps that one copy read-only; a lookup is a binary search.
Ids of another shape (none are written today) are kept exactly in a small frozenset beside it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

KEY_BYTES = 20
_IMG, _UNREADABLE = 0, 0xFFFFFFFF
_ID_SHAPE = r"^[0-9a-f]{32}:(img|unreadable|[1-9][0-9]{0,8})$"
_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10, dtype=np.uint8)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16, dtype=np.uint8)


def _encode(ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(keys 'S20' for the well-shaped ids, boolean mask of which ids those were), vectorized."""
    ids = ids.cast(pa.string()) if ids.type != pa.string() else ids
    ok = pc.fill_null(pc.match_substring_regex(ids, _ID_SHAPE), False).to_numpy(zero_copy_only=False)
    good = ids if ok.all() else pc.filter(ids, pa.array(ok))
    n = len(good)
    if n == 0:
        return np.empty(0, dtype=f"S{KEY_BYTES}"), ok
    hexes = pc.utf8_slice_codeunits(good, 0, 32).combine_chunks() if isinstance(good, pa.ChunkedArray) else \
        pc.utf8_slice_codeunits(good, 0, 32)
    # Every hex part is exactly 32 ASCII bytes, so the string data buffer is an (n, 32) byte matrix.
    offsets = np.frombuffer(hexes.buffers()[1], dtype=np.int32, count=len(hexes) + 1, offset=hexes.offset * 4)
    data = np.frombuffer(hexes.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]].reshape(n, 32)
    nib = _HEX[data]
    digest = (nib[:, 0::2] << 4) | nib[:, 1::2]  # (n, 16)
    suffix = pc.utf8_slice_codeunits(good, 33, 64)
    code = np.full(n, _IMG, dtype=">u4")
    is_unreadable = pc.equal(suffix, "unreadable").to_numpy(zero_copy_only=False)
    is_page = np.logical_not(np.logical_or(is_unreadable, pc.equal(suffix, "img").to_numpy(zero_copy_only=False)))
    code[is_unreadable] = _UNREADABLE
    if is_page.any():
        code[is_page] = pc.cast(pc.filter(suffix, pa.array(is_page)), pa.uint32()).to_numpy()
    raw = np.empty((n, KEY_BYTES), dtype=np.uint8)
    raw[:, :16] = digest
    raw[:, 16:] = code.view(np.uint8).reshape(n, 4)
    return raw.view(f"S{KEY_BYTES}").reshape(n), ok


def _stable_order(keys: np.ndarray) -> np.ndarray:
    """argsort of 'S20' keys in byte order, stable; as three integer columns (numpy sorts bytes ~5x slower)."""
    raw = keys.view(np.uint8).reshape(len(keys), KEY_BYTES)
    hi = raw[:, 0:8].copy().view(">u8").ravel()
    lo = raw[:, 8:16].copy().view(">u8").ravel()
    code = raw[:, 16:20].copy().view(">u4").ravel()
    return np.lexsort((code, lo, hi))


_HEX_CHARS = frozenset("0123456789abcdef")


def _encode_one(id_: str) -> np.bytes_ | None:
    """`_encode` for one id without Arrow (a lookup per page must cost microseconds, not an Arrow call)."""
    if len(id_) < 34 or id_[32] != ":" or not _HEX_CHARS.issuperset(id_[:32]):
        return None
    suffix = id_[33:]
    if suffix == "img":
        code = _IMG
    elif suffix == "unreadable":
        code = _UNREADABLE
    elif suffix.isascii() and suffix.isdigit() and suffix[0] != "0" and len(suffix) <= 9:
        code = int(suffix)
    else:
        return None
    # numpy drops trailing NULs of "S" items; drop them here too so the comparison below is like for like
    return np.bytes_((bytes.fromhex(id_[:32]) + code.to_bytes(4, "big")).rstrip(b"\0"))


def _as_arrow(values: Any) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    return values if isinstance(values, pa.Array) else pa.array(values, pa.string())


class DoneSet:
    """Exact, compact membership over row ids; `id in done`, `len(done)`. Pickles as an object-store handle."""

    def __init__(self, keys: np.ndarray | None = None, extra: Iterable[str] = ()) -> None:
        self._keys = np.empty(0, dtype=f"S{KEY_BYTES}") if keys is None else keys  # sorted, unique
        self._extra = frozenset(extra)
        self._ref: Any = None  # ObjectRef of _keys once shared through Ray

    @classmethod
    def build(cls, chunks: Iterable[tuple[Any, Any]], include_errors: bool) -> "DoneSet":
        """From (ids, statuses) chunks in write order (a later row for an id wins); keeps ids whose row is ok,
        or every id when `include_errors`."""
        keys, oks, extra_status = [], [], {}
        for ids, statuses in chunks:
            ids, statuses = _as_arrow(ids), _as_arrow(statuses)
            k, shaped = _encode(ids)
            st_ok = pc.fill_null(pc.equal(statuses, "ok"), False).to_numpy(zero_copy_only=False)
            keys.append(k)
            oks.append(st_ok[shaped])
            if not shaped.all():
                for i, s in zip(pc.filter(ids, pa.array(~shaped)).to_pylist(), st_ok[~shaped].tolist()):
                    extra_status[i] = s
        extra = {i for i, s in extra_status.items() if include_errors or s}
        if not keys:
            return cls(None, extra)
        all_keys = np.concatenate(keys)
        del keys
        order = _stable_order(all_keys)  # equal ids stay in write order
        sorted_keys = all_keys[order]
        del all_keys
        last = np.ones(len(sorted_keys), dtype=bool)
        last[:-1] = sorted_keys[1:] != sorted_keys[:-1]  # the last (newest) row of each id
        keep = last if include_errors else last & np.concatenate(oks)[order]
        return cls(sorted_keys[keep], extra)

    @classmethod
    def of(cls, ids: Iterable[str], include_errors: bool = True) -> "DoneSet":
        ids = list(ids)
        return cls.build([(ids, ["ok"] * len(ids))], include_errors)

    def _array(self) -> np.ndarray:
        if self._keys is None:
            import ray

            self._keys = ray.get(self._ref)  # a read-only view of the one shared copy
        return self._keys

    def __contains__(self, id_: object) -> bool:
        if not isinstance(id_, str):
            return False
        if id_ in self._extra:
            return True
        k = _encode_one(id_)
        if k is None:
            return False
        keys = self._array()
        i = int(np.searchsorted(keys, k))
        return i < len(keys) and keys[i] == k

    def __len__(self) -> int:
        return len(self._array()) + len(self._extra)

    @property
    def nbytes(self) -> int:
        return int(self._array().nbytes)

    def __reduce__(self):
        # Shipped to actors as a reference to one object-store copy, never as a pickled copy each.
        import ray

        if self._ref is None and ray.is_initialized() and len(self._keys):
            self._ref = ray.put(self._keys)
        if self._ref is None:
            return (DoneSet, (self._keys, self._extra))
        return (_from_ref, (self._ref, self._extra))


def _from_ref(ref: Any, extra: frozenset[str]) -> DoneSet:
    d = DoneSet(None, extra)
    d._keys, d._ref = None, ref
    return d


def load_done_set(sink: Any, include_errors: bool) -> DoneSet:
    """The sink's done ids as a DoneSet, read in chunks (`done_id_chunks`) so no Python set of them is built."""
    return DoneSet.build(sink.done_id_chunks(), include_errors)


def iter_ids(done: DoneSet) -> Iterator[str]:  # pragma: no cover - debugging aid
    for k in done._array():
        raw = k.ljust(KEY_BYTES, b"\0")
        code = int.from_bytes(raw[16:], "big")
        yield raw[:16].hex() + ":" + ("img" if code == _IMG else "unreadable" if code == _UNREADABLE else str(code))
