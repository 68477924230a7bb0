"""Resume at scale and per page: the compact done-set, pages streamed in chunks, only missing pages rendered,
unreadable inputs' error rows kept without re-reading. Preprocess runs in-process here (no Ray)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import connectors.decode as decode
import pipeline.preprocess as preprocess
from connectors.decode import content_id
from pipeline.config import JobConfig
from pipeline.preprocess import Preprocess, unreadable_id
from pipeline.resume import DoneSet
from tests.test_pipeline_support import image_bytes, pdf_bytes, smoke_checkpoint


def _hex(i: int) -> str:
    return f"{i:032x}"


def test_done_set_is_exact_and_newest_row_wins():
    ids = [_hex(i) + ":" + s for i, s in enumerate(["img", "unreadable", "1", "7", "123456789"])] + ["odd-id"]
    ids[0] = _hex(0xabc) + ":img"
    chunks = [(ids, ["ok", "error", "ok", "ok", "error", "ok"]), ([ids[0], ids[4]], ["error", "ok"])]
    done = DoneSet.build(chunks, include_errors=False)
    assert [i in done for i in ids] == [False, False, True, True, True, True] and len(done) == 4
    everything = DoneSet.build(chunks, include_errors=True)
    assert all(i in everything for i in ids) and len(everything) == 6
    # near misses: another page, another hash, the same hash as an image
    for miss in (_hex(2) + ":2", _hex(2) + ":img", _hex(99) + ":1", _hex(2), "", _hex(0xabc).upper() + ":img"):
        assert miss not in everything
    assert DoneSet.of([]).__len__() == 0 and "x" not in DoneSet.of([])


def test_done_set_of_many_ids_is_20_bytes_each_and_pickles_small_with_ray(tmp_path):
    import ray

    n = 200_000
    ids = np.char.add(np.char.mod("%032x", np.arange(n) * 7919), ":img").astype(object)
    done = DoneSet.build([(list(ids), ["ok"] * n)], include_errors=True)
    assert len(done) == n and done.nbytes == 20 * n
    assert _hex(7919 * 5) + ":img" in done and _hex(7919 * 5 + 1) + ":img" not in done
    if not ray.is_initialized():
        assert len(pickle.dumps(DoneSet.of(["0" * 32 + ":img"] * 3))) < 1000  # without Ray: a plain copy
        assert len(pickle.dumps(done)) > 20 * n
    started = not ray.is_initialized()  # another module's session-wide Ray may be up already
    if started:
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        blob = pickle.dumps(done)  # with Ray: a handle to one object-store copy
        assert len(blob) < 10_000
        # no CPU: a session-wide Ray of other tests may have every CPU held by its actors
        probe = ray.remote(num_cpus=0)(lambda d, k: (k in d, len(d), d._array().flags.writeable))
        assert ray.get(probe.remote(done, _hex(7919 * 12345) + ":img")) == (True, n, False)  # read-only: shared
    finally:
        if started:
            ray.shutdown()


def _pre(monkeypatch, done=frozenset(), **kw) -> tuple[Preprocess, list[int]]:
    rendered: list[int] = []
    real = decode._render_page

    def counting(source, pdf, number, limits, t0):
        rendered.append(number)
        return real(source, pdf, number, limits, t0)

    monkeypatch.setattr(decode, "_render_page", counting)
    config = JobConfig(input="x", output="y", model=str(smoke_checkpoint()), pdf_longest_side=384, **kw)
    return Preprocess(config, str(smoke_checkpoint()), done_ids=done), rendered


def _batch(*sources: str) -> dict:
    return {"source": np.array(sources, dtype=object)}


def test_a_big_pdf_streams_in_chunks_before_its_last_page_is_rendered(monkeypatch, tmp_path):
    n = 40
    (tmp_path / "big.pdf").write_bytes(pdf_bytes(n, "big"))
    pre, rendered = _pre(monkeypatch)
    chunks = pre(_batch(str(tmp_path / "big.pdf")))
    first = next(chunks)
    assert len(first["id"]) == preprocess._CHUNK_ROWS and len(rendered) < n  # shipped while pages remain
    rest = list(chunks)
    assert sum(len(c["id"]) for c in [first, *rest]) == n and rendered == list(range(1, n + 1))
    assert max(len(c["id"]) for c in rest) <= preprocess._CHUNK_ROWS


def test_resume_renders_only_the_missing_pages_and_skips_finished_documents(monkeypatch, tmp_path):
    doc, full = pdf_bytes(6, "partial"), pdf_bytes(4, "finished")
    (tmp_path / "doc.pdf").write_bytes(doc)
    (tmp_path / "full.pdf").write_bytes(full)
    done = DoneSet.of([content_id(doc, p) for p in (1, 2, 4, 5, 6)] + [content_id(full, p) for p in range(1, 5)])
    pre, rendered = _pre(monkeypatch, done)
    out = list(pre(_batch(str(tmp_path / "doc.pdf"), str(tmp_path / "full.pdf"))))
    status = {i: s for c in out for i, s in zip(c["id"], c["status"])}
    assert rendered == [3]  # one page of ten rendered
    assert status[content_id(doc, 3)] == "ok" and list(status.values()).count("skipped") == 9


def test_an_unreadable_inputs_error_row_is_kept_without_reading_it_again(monkeypatch, tmp_path):
    """A plain re-run keeps error rows (README): an input that was unreadable is not read, even if readable now."""
    path = tmp_path / "late.png"
    path.write_bytes(image_bytes(7))
    reads: list[str] = []
    real = preprocess.read_bytes
    monkeypatch.setattr(preprocess, "read_bytes", lambda s, **kw: reads.append(s) or real(s, **kw))
    pre, _ = _pre(monkeypatch, DoneSet.of([unreadable_id(str(path))]))
    (out,) = pre(_batch(str(path)))
    assert list(out["status"]) == ["skipped"] and list(out["id"]) == [unreadable_id(str(path))] and reads == []
    # --retry-errors (a done-set without error rows): read, and it gets its content id
    pre, _ = _pre(monkeypatch, DoneSet.of([]))
    (out,) = pre(_batch(str(path)))
    assert list(out["status"]) == ["ok"] and list(out["id"]) == [content_id(image_bytes(7), None)]
    assert reads == [str(path)]
