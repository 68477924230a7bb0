"""The model benchmark and the GPU check run end to end on CPU; their last line is the JSON report."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.smoke import write_smoke_checkpoint

REPO = Path(__file__).resolve().parents[1]


def test_bench_prints_json_report(tmp_path):
    """The engine benchmark on CPU with a mini checkpoint: every variant runs, the report has its figures."""
    ckpt = write_smoke_checkpoint(tmp_path / "tiny", "tiny", "mini", seed=2)
    out = subprocess.run(
        [sys.executable, "-m", "model.bench", "--checkpoint", str(ckpt), "--workload", "catalog", "--device", "cpu",
         "--requests", "4", "--batch-size", "2", "--max-new-tokens", "5"],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout.strip().splitlines()
    report = json.loads(out[-1])
    assert report["requests"] == 4 and report["generated_tokens"] == 20 and report["new_tokens_per_request"] == 5
    for key in ("items_per_s", "prefill_tokens_per_s", "decode_tokens_per_s", "vision_tiles_per_s",
                "baseline_items_per_s", "static_batch_items_per_s", "speedup"):
        assert report[key] > 0, key
    assert 0 < report["roofline_fraction"] <= 1
    assert report["speedup"] == round(report["items_per_s"] / report["baseline_items_per_s"], 2)
    (e,), (b,) = report["walls_s"]["engine"], report["walls_s"]["baseline"]  # one repeat: one pair
    assert report["speedup_per_repeat"] == [pytest.approx((4 / e) / (report["baseline_requests"] / b), abs=0.02)]
    assert report["vision_tiles"] == 4 * 7  # 1024x768 photo: 3x2 tiles + the global view
    assert report["prompt_tokens"] > 4 * 900 and report["cost"]["vision_flops"] > 0


def test_step_host_bench_runs_every_request_to_the_end(tmp_path):
    """The host-time benchmark: with the device's work replaced by zeros, each (path, guard, sequences) run
    decodes its sequences together, the bucketed path through the bucketed step."""
    ckpt = write_smoke_checkpoint(tmp_path / "tiny", "tiny", "mini", seed=2)
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "step_host_bench.py"), "--checkpoint", str(ckpt), "--sequences", "3",
         "--path", "static", "packed", "--ngram", "0", "4", "--window", "10", "--max-new-tokens", "12"],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout.strip().splitlines()
    runs = json.loads(out[-1])["runs"]
    assert [(r["path"], r["ngram"]) for r in runs] == [("static", 0), ("static", 4), ("packed", 0), ("packed", 4)]
    for r in runs:
        assert r["sequences"] == 3 and 0 < r["decode_steps"] <= 11 and r["host_ms_per_decode_step"] > 0
        assert (r["static_decode_steps"] >= r["decode_steps"]) == (r["path"] == "static")


def test_gpu_check_dry_run_on_cpu(tmp_path, fixtures_dir):
    """The script a GPU session runs, here on CPU with a mini checkpoint: float32 matches the reference in full."""
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--size", "mini",
         "--checkpoint", str(tmp_path / "tiny"), "--requests", "2", "--max-new-tokens", "2",
         "--fixtures", str(fixtures_dir / "tiny_mha-seed1"), "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, check=True, timeout=600,
    ).stdout.strip().splitlines()
    report = json.loads(out[-1])
    assert report == json.loads((tmp_path / "r.json").read_text())
    two = report["tiny_two_images"]
    assert two["images_per_request"] == 2 and two["dtype"] == "bfloat16" and two["generated_tokens"] == 4
    cases = report["fixtures"]["tiny_mha-seed1"]
    assert len(cases) == 5
    assert all(row["float32_agree"] == row["of"] == 8 for row in cases.values())
    assert all(0 <= row["bfloat16_agree"] <= 8 for row in cases.values())
    assert report["bf16_cases_agreeing_8"].endswith("/5")


def test_gpu_engine_rehearsal_on_cpu(tmp_path, fixtures_dir):
    """The engine's one-call GPU script, rehearsed on CPU at mini size with in-memory models: every part runs,
    the engine's tokens equal model.generate's, and the model stage runs without Ray."""
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_engine.py"), "--device", "cpu", "--size", "mini",
         "--page-requests", "2", "--catalog-requests", "2", "--base-requests", "2", "--max-new-tokens", "2",
         "--profile-requests", "2", "--fixtures", str(fixtures_dir / "tiny_mha-seed1"),
         "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, check=True, timeout=600,
    ).stdout.strip().splitlines()
    summary, report = json.loads(out[-1]), json.loads((tmp_path / "r.json").read_text())
    assert not [k for k, v in report.items() if isinstance(v, dict) and "error" in v]
    assert summary["skipped"] == [] and set(summary["elapsed_s"]) == set(gpu_engine_parts())
    assert report["kernel_canary"]["ok"] is True and report["kernel_canary"]["engine_parts_paged_attention"] == "auto"
    assert report["kernel_canary"]["result"]["small"]["8"]["paged_ms"] > 0
    for name in ("tiny_page", "small_page", "base_page", "tiny_page_in_place", "tiny_page_no_graphs",
                 "tiny_page_gathered", "tiny_page_gathered_no_graphs"):
        assert report[name]["generated_tokens"] == 4 and report[name]["items_per_s"] > 0, name
    assert report["tiny_catalog"]["baseline_items_per_s"] > 0 and report["small_page"]["speedup"] > 0
    assert report["base_page"]["speedup"] is None and report["base_page"]["walls_s"]["baseline"] == []
    assert report["small_page"]["checkpoint"] == "random:small-mini"
    assert report["small_catalog"]["generated_tokens"] == 4
    assert report["tiny_page_in_place"]["in_place_decode"] is True
    # CUDA graphs: never on a CPU device (auto), and the eager comparison run is there
    assert report["tiny_page"]["cuda_graphs"]["on"] is False and report["tiny_page"]["cuda_graphs"]["fallback"] is None
    for name in ("tiny_page_no_graphs", "tiny_page_gathered_no_graphs"):
        assert not report[name]["cuda_graphs"]["on"]
    # the paged kernel: auto is off on CPU (no fallback to report), off where asked; alone, it agrees with
    # gathered SDPA at each variant's mini shapes (run in Triton's interpreter here)
    assert report["tiny_page"]["paged_attention"] == {"on": False, "fallback": None}
    assert report["tiny_page_gathered"]["paged_attention"]["on"] is False
    for v in ("tiny", "small", "base"):
        for b in ("2", "4"):
            row = report["paged_decode"][v][b]
            assert row["max_abs_diff"] <= 1e-5 * max(row["ref_max_abs"], 1.0) and row["ref_max_abs"] > 0
            assert row["paged_ms"] > 0 and row["gathered_ms"] > 0 and row["kv_read_mb"] > 0
    fix = report["bf16_fixtures"]
    cases = fix["tiny_mha-seed1"]["engine"]
    assert len(cases) == 5 and all(c["engine_vs_generate"] == c["of"] == 8 for c in cases.values())
    assert fix["engine_equal_generate_bf16"] == "5/5" and fix["bf16_cases_agreeing_8"].endswith("/5")
    assert all(row["float32_agree"] == row["of"] for row in fix["tiny_mha-seed1"]["generate"].values())
    for w in ("page", "catalog"):  # the profiled phases ran: all prompts prefilled, then 20 decode steps
        prof = report[f"profile_{w}"]
        assert prof["prefill"]["steps"] >= 1 and prof["decode"]["steps"] == 20
        assert "scaled_dot_product" in prof["prefill"]["table"] and prof["decode"]["wall_ms_per_step"] > 0
    fold = report["moe_fold"]  # the fold A/B: both ways agree at each variant's mini shapes, and were timed
    for v in ("tiny", "small", "base"):
        for n in ("256", "4096"):
            row = fold[v][n]
            assert row["max_abs_diff"] <= 1e-5 * max(row["ref_max_abs"], 1.0) and row["ref_max_abs"] > 0
            assert row["today_ms"] > 0 and row["folded_ms"] > 0
    assert summary["tiny_page"]["items_per_s"] == report["tiny_page"]["items_per_s"]
    stage = report["pipeline_stage"]
    assert stage["items"] == 4 and stage["status"] == ["ok"] * 4 and set(stage["finish_reason"]) <= {"eos", "length"}


def gpu_engine_parts() -> list[str]:
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_engine

    return list(gpu_engine.ESTIMATE_S)


def test_gpu_engine_deadline_and_a_failing_kernel_canary(tmp_path):
    """A part that would pass the deadline is skipped and named, the JSON still written: the device call ends
    inside its limit with what fitted. A kernel canary that fails (here: no Triton interpreter on CPU, so its
    subprocess exits with an error) turns the paged kernel off for the engine parts and keeps the in-process
    kernel benchmark from running."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_engine.py"), "--device", "cpu", "--size", "mini",
         "--parts", "kernel_canary", "paged_decode", "tiny_catalog", "base_page", "--deadline-s", "80",
         "--catalog-requests", "2", "--max-new-tokens", "2", "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, check=True, timeout=600, env=env,
    ).stdout.strip().splitlines()
    summary, report = json.loads(out[-1]), json.loads((tmp_path / "r.json").read_text())
    assert summary["skipped"] == ["base_page"] and list(summary["elapsed_s"]) == ["kernel_canary", "paged_decode",
                                                                                 "tiny_catalog"]
    canary = report["kernel_canary"]
    assert canary["ok"] is False and canary["rc"] != 0 and "TRITON_INTERPRET" in canary["stderr_tail"]
    assert canary["engine_parts_paged_attention"] == "off" and "canary failed" in report["paged_decode"]["skipped"]
    assert report["tiny_catalog"]["generated_tokens"] == 4
