"""End to end on CPU: `expert_parallel_size: 2` (two rank processes per replica) and `vision_workers: 1`
give the same rows as the plain pipeline, and killing one rank of a group mid-run still ends with one
row per item."""
from __future__ import annotations

import pytest

from pipeline.config import JobConfig
from pipeline.generate import CRASH_RANK_ENV
from pipeline.run import run_job
from tests.test_pipeline_e2e import cfg, ray_session  # noqa: F401 - fixture
from tests.test_pipeline_support import image_bytes, read_rows

FIELDS = ("status", "error", "text", "generated_tokens", "prompt_tokens", "boxes_json")


def _rows(config: JobConfig) -> dict[str, tuple]:
    return {r["id"]: tuple(r[k] for k in FIELDS) for r in read_rows(config.output)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("ep-in")
    for i in range(5):
        (d / f"i{i}.png").write_bytes(image_bytes(60 + i, size=(96 + 40 * i, 64)))
    return d


def _config(folder, out, **kw) -> JobConfig:
    # half a CPU per model process: preprocessing (1 CPU) and a group of two fit the test's 2-CPU Ray
    return cfg(str(folder), f"sqlite:///{out}", **(dict(max_new_tokens=10, model_batch_size=2, cpus_per_model_worker=0.5) | kw))


@pytest.fixture(scope="module")
def baseline(ray_session, folder, tmp_path_factory):  # noqa: F811
    config = _config(folder, tmp_path_factory.mktemp("ep-base") / "rows.db")
    run_job(config, quiet=True)
    rows = _rows(config)
    assert len(rows) == 5 and all(r[0] == "ok" for r in rows.values())
    assert any(r[3] > 0 for r in rows.values())
    return rows


def _live_groups() -> list[dict]:
    import ray

    return [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]


def test_expert_parallel_2_gives_the_same_rows(baseline, folder, tmp_path):
    config = _config(folder, tmp_path / "ep.db", expert_parallel_size=2)
    s = run_job(config, quiet=True)
    assert s.items_ok == 5
    assert _rows(config) == baseline
    # a group's placement group lives as long as the driver, not its leader actor: the run removes its
    # own, so the next job in this process (this module's next test) gets the CPUs back
    assert _live_groups() == []


def test_vision_workers_give_the_same_rows(baseline, folder, tmp_path):
    config = _config(folder, tmp_path / "vision.db", vision_workers=1)
    run_job(config, quiet=True)
    assert _rows(config) == baseline


def test_a_rank_dies_mid_run_and_every_item_has_one_row(baseline, folder, tmp_path, monkeypatch):
    marker = tmp_path / "rank-crashed.json"
    monkeypatch.setenv(CRASH_RANK_ENV, str(marker))
    config = _config(folder, tmp_path / "crash.db", expert_parallel_size=2, model_batch_size=1)
    s = run_job(config, quiet=True)
    assert marker.is_file(), "the last rank of the group was supposed to die once"
    assert s.items_ok == 5
    assert _rows(config) == baseline  # one row per item, none lost, none duplicated
    assert _live_groups() == []  # the restarted group's too
