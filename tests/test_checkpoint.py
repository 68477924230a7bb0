"""resolve_checkpoint / CheckpointReader: local dirs, S3 (moto server on loopback), fsspec, hub, every error."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors import safe_open

from model.checkpoint import INDEX_NAME, CheckpointError, CheckpointReader, resolve_checkpoint
from model.smoke import write_smoke_checkpoint


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_smoke_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", "mini", seed=3)


@pytest.fixture
def ckpt(smoke: Path, tmp_path: Path) -> Path:
    """A private copy that a test may break."""
    return Path(shutil.copytree(smoke, tmp_path / "copy"))


def _same_dir(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# ------------------------------------------------------------------------------------------------ local

@pytest.mark.parametrize("name", ["tiny_mha-seed1", "small_mla-seed1"])
def test_reads_reference_fixtures(fixtures_dir: Path, name: str) -> None:
    path = resolve_checkpoint(str(fixtures_dir / name))
    assert path == fixtures_dir / name
    weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
    with CheckpointReader(path) as reader:
        assert reader.keys() == sorted(weight_map)
        assert reader.config()["model_type"] == "deepseek_vl_v2"
        key = "language.model.embed_tokens.weight"
        with safe_open(str(path / weight_map[key]), framework="pt") as f:
            expected = f.get_tensor(key)
        assert reader.shape(key) == tuple(expected.shape)
        assert reader.dtype(key) == torch.float32
        assert torch.equal(reader.get(key), expected)
        as_bf16 = reader.get(key, dtype=torch.bfloat16)
        assert as_bf16.dtype == torch.bfloat16 and torch.equal(as_bf16, expected.to(torch.bfloat16))


def test_single_file_without_index(ckpt: Path) -> None:
    (ckpt / INDEX_NAME).unlink()
    (ckpt / "model-00001-of-000001.safetensors").rename(ckpt / "model.safetensors")
    with CheckpointReader(resolve_checkpoint(str(ckpt))) as reader:
        assert "vision.pos_embed" in reader.keys()
        assert reader.get("vision.pos_embed").shape == (1, 729, 64)


def test_unknown_key_is_a_clear_error(smoke: Path) -> None:
    with CheckpointReader(smoke) as reader, pytest.raises(CheckpointError, match="no tensor 'nope'"):
        reader.get("nope")


def test_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(str(tmp_path / "absent"))


def test_missing_config(ckpt: Path) -> None:
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve_checkpoint(str(ckpt))


def test_invalid_config_json(ckpt: Path) -> None:
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        resolve_checkpoint(str(ckpt))


def test_no_weights(ckpt: Path) -> None:
    for p in ckpt.glob("model*"):
        p.unlink()
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        resolve_checkpoint(str(ckpt))


def test_index_names_missing_shard(ckpt: Path) -> None:
    (ckpt / "model-00001-of-000001.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00001-of-000001.safetensors .* is missing"):
        resolve_checkpoint(str(ckpt))


def test_index_key_not_in_shard(ckpt: Path) -> None:
    index = json.loads((ckpt / INDEX_NAME).read_text())
    index["weight_map"]["language.extra.weight"] = "model-00001-of-000001.safetensors"
    (ckpt / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="language.extra.weight"):
        CheckpointReader(ckpt)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_names_file(ckpt: Path, damage: str) -> None:
    shard = ckpt / "model-00001-of-000001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors file model-00001-of-000001"):
        CheckpointReader(resolve_checkpoint(str(ckpt)))


# ---------------------------------------------------------------------------------------- hub / bad specs

def test_hub_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="could not reach the Hugging Face hub") as info:
        resolve_checkpoint("deepseek-ai/deepseek-vl2-tiny", cache_dir=tmp_path)
    assert "local checkpoint directory or an s3:// URL" in str(info.value)


def test_hub_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    with pytest.raises(CheckpointError, match="could not reach the Hugging Face hub"):
        resolve_checkpoint("deepseek-ai/deepseek-vl2-tiny", cache_dir=tmp_path)


@pytest.mark.parametrize("spec", ["gopher://user:hunter2@host/ckpt", "nonsense://x"])
def test_unsupported_url_is_clear_and_redacted(spec: str) -> None:
    with pytest.raises(CheckpointError, match="unsupported checkpoint URL") as info:
        resolve_checkpoint(spec)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("spec", ["not a checkpoint!", "./relative/missing", "a/b/c"])
def test_unrecognised_spec(spec: str) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(spec)


# ---------------------------------------------------------------------------------------------- fsspec

def test_memory_url_downloaded_once(smoke: Path, tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    for p in smoke.iterdir():
        fs.pipe_file(f"/ckpt-mem/tiny/{p.name}", p.read_bytes())
    fs.pipe_file("/ckpt-mem/tiny/README.md", b"skipped")
    try:
        first = resolve_checkpoint("memory://ckpt-mem/tiny", cache_dir=tmp_path)
        _same_dir(first, smoke)
        fs.rm("/ckpt-mem", recursive=True)  # a second download would now fail
        assert resolve_checkpoint("memory://ckpt-mem/tiny", cache_dir=tmp_path) == first
    finally:
        if fs.exists("/ckpt-mem"):
            fs.rm("/ckpt-mem", recursive=True)


def test_file_url_uses_pagemill_cache(smoke: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEMILL_CACHE", str(tmp_path / "cache"))
    path = resolve_checkpoint(smoke.as_uri())
    assert path.parent == tmp_path / "cache"
    _same_dir(path, smoke)


def test_failed_download_leaves_no_cache_entry(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "config.json").unlink()
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve_checkpoint(ckpt.as_uri(), cache_dir=cache)
    assert list(cache.iterdir()) == []  # neither a complete-looking entry nor a leftover partial dir


# -------------------------------------------------------------------------------------------------- S3

@pytest.fixture(scope="module")
def moto_endpoint() -> str:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    import boto3

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto_endpoint}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    return boto3.client("s3")


def test_s3_download(s3, smoke: Path, tmp_path: Path) -> None:
    s3.create_bucket(Bucket="models")
    for p in smoke.iterdir():
        s3.upload_file(str(p), "models", f"dsvl2/tiny/{p.name}")
    s3.put_object(Bucket="models", Key="dsvl2/tiny/nested/ignored.bin", Body=b"x")
    first = resolve_checkpoint("s3://models/dsvl2/tiny", cache_dir=tmp_path)
    _same_dir(first, smoke)
    with CheckpointReader(first) as reader:
        assert reader.get("image_newline").shape == (64,)


def test_s3_cache_hit_needs_no_bucket(s3, smoke: Path, tmp_path: Path) -> None:
    s3.create_bucket(Bucket="once")
    for p in smoke.iterdir():
        s3.upload_file(str(p), "once", f"tiny/{p.name}")
    first = resolve_checkpoint("s3://once/tiny", cache_dir=tmp_path)
    for obj in s3.list_objects_v2(Bucket="once")["Contents"]:
        s3.delete_object(Bucket="once", Key=obj["Key"])
    s3.delete_bucket(Bucket="once")
    assert resolve_checkpoint("s3://once/tiny", cache_dir=tmp_path) == first
    assert resolve_checkpoint("s3://once/tiny/", cache_dir=tmp_path) == first  # same prefix, same cache entry
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_s3_missing_bucket_is_clear(s3, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="s3://no-such-bucket/x/: NoSuchBucket") as info:
        resolve_checkpoint("s3://no-such-bucket/x", cache_dir=tmp_path)
    assert "testing-secret" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_s3_empty_prefix_is_clear(s3, tmp_path: Path) -> None:
    s3.create_bucket(Bucket="empty")
    with pytest.raises(CheckpointError, match="no checkpoint files under s3://empty/none/"):
        resolve_checkpoint("s3://empty/none", cache_dir=tmp_path)
