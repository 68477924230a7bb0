"""The jobs' CLI: every config field is a documented flag; flags override the file; errors exit 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import build_parser, job_fields, parse_config
from pipeline.config import JobConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("job", ["digitize", "catalog"])
def test_help_documents_every_field(job):
    text = build_parser(job).format_help()
    for name in job_fields(job):
        field = JobConfig.model_fields[name]
        assert "--" + name.replace("_", "-") in text, name
        assert field.description.split()[0] in text
    assert len(job_fields(job)) >= len(JobConfig.model_fields) - 2  # only job-specific options are left out


def test_flags_override_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("input: a\noutput: out/x\nmodel: m\nmax_new_tokens: 7\nretry_errors: true\n")
    c = parse_config("catalog", ["--config", str(cfg), "--max-new-tokens", "5", "--no-retry-errors", "--limit", "2"])
    assert (c.job, c.max_new_tokens, c.retry_errors, c.limit, c.input) == ("catalog", 5, False, 2, "a")


def test_default_config_file_is_used():
    c = parse_config("digitize", ["--input", "samples", "--model", "smoke"])
    assert c.output == "sqlite:///out/digitize.db" and "markdown" in c.effective_prompt


def test_bad_flag_value_exits_2_naming_the_field():
    p = subprocess.run([sys.executable, "-m", "jobs.digitize", "--input", "samples", "--model", "smoke",
                        "--max-new-tokens", "0"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "max_new_tokens" in p.stderr
