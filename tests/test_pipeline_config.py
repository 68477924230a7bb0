"""JobConfig: YAML + flag merging, errors that name the field, stable hashes, no secrets leaking."""

from pathlib import Path

import pytest

from pipeline.config import ConfigError, JobConfig, load_config

BASE = {"input": "samples", "output": "sqlite:///out/x.db", "model": "smoke"}


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_then_overrides(tmp_path):
    p = write(tmp_path, "input: a\noutput: out/dir\nmodel: m\nmax_new_tokens: 7\ncpu_batch_size: 3\n")
    c = load_config(p, {"max_new_tokens": 9, "limit": None})
    assert c.max_new_tokens == 9 and c.cpu_batch_size == 3 and c.limit is None


@pytest.mark.parametrize("text,field", [
    ("max_new_tokens: 0", "max_new_tokens"),
    ("max_new_tokns: 5", "max_new_tokns"),
    ("table: 'rows; drop table x'", "table"),
    ("page_range: 'x-y'", "page_range"),
    ("device: tpu", "device"),
    ("num_model_workers_min: 3\nnum_model_workers_max: 2", "num_model_workers_max"),
    ("prompt: 'no image here'", "prompt"),
    ("engine_cuda_graphs: true\nexpert_parallel_size: 2", "engine_cuda_graphs"),
])
def test_bad_config_names_field(tmp_path, text, field):
    p = write(tmp_path, "input: a\noutput: b\nmodel: m\n" + text + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert field in str(e.value)


def test_missing_required_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="model"):
        load_config(write(tmp_path, "input: a\noutput: b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "input: [a\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_config_hash_tracks_output_fields_only():
    a = JobConfig(**BASE)
    assert a.config_hash() == JobConfig(**BASE).config_hash()
    assert a.config_hash() == JobConfig(**BASE | {"output": "other"}, cpu_batch_size=9, limit=3).config_hash()
    assert a.config_hash() != JobConfig(**BASE, max_new_tokens=5).config_hash()
    assert a.config_hash() != JobConfig(**BASE, job="catalog").config_hash()
    assert a.config_hash() != JobConfig(**BASE, prompt="<image>\nOCR.").config_hash()


def test_secrets_never_in_reprs_or_errors(tmp_path):
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    c = JobConfig(**BASE | {"output": "postgresql://u:hunter2@127.0.0.1/test"}, aws_secret_access_key=secret)
    for text in (repr(c), str(c.public_dict())):
        assert secret not in text
    assert "hunter2" not in str(c.public_dict())
    p = write(tmp_path, f"input: a\noutput: b\nmodel: m\naws_secret_access_key: 5\nmax_new_tokens: '{secret}'\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert secret not in str(e.value) and "max_new_tokens" in str(e.value)


def test_shipped_configs_are_valid():
    root = Path(__file__).resolve().parents[1] / "configs"
    for job in ("digitize", "catalog"):
        c = load_config(root / f"{job}.yaml", {"input": "samples", "model": "smoke", "job": job})
        assert c.output.startswith("sqlite:///") and "<image>" in c.effective_prompt


def test_engine_options_reach_the_engine():
    from pipeline.generate import engine_limits

    assert engine_limits(JobConfig(**BASE, job="catalog")) == {}
    c = JobConfig(**BASE, job="catalog", engine_max_seqs=32, engine_cuda_graphs=False)
    assert engine_limits(c) == {"max_seqs": 32, "cuda_graphs": False}
    c = JobConfig(**BASE, job="catalog", engine_paged_attention=False)
    assert engine_limits(c) == {"paged_attention": False}
    c = JobConfig(**BASE, job="catalog", engine_compiled_decode=False)
    assert engine_limits(c) == {"compiled_decode": False}
