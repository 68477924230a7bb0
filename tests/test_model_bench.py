"""The model benchmark runs end to end on CPU and its last line is the JSON report."""
import json
import subprocess
import sys

from model.smoke import write_smoke_checkpoint


def test_bench_prints_json_report(tmp_path, fixtures_dir):
    ckpt = write_smoke_checkpoint(tmp_path / "tiny", "tiny", "mini", seed=2)
    out = subprocess.run(
        [sys.executable, "-m", "model.bench", "--checkpoint", str(ckpt), "--workload", "page", "--device", "cpu",
         "--requests", "2", "--batch-size", "2", "--max-new-tokens", "3",
         "--golden", str(fixtures_dir / "tiny_mha-seed1")],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout.strip().splitlines()
    report = json.loads(out[-1])
    assert report["requests"] == 2 and report["generated_tokens"] == 6
    assert report["generated_tokens_per_s"] > 0 and report["peak_gb"] > 0
    # float32 on CPU is the reference setting: every golden case agrees in full
    assert all(v["agree_prefix"] == v["of"] for v in report["golden"].values())
