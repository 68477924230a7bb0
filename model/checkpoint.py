"""Finding a checkpoint (local dir, s3://, fsspec URL, HF hub id) and reading it tensor by tensor.

Remote checkpoints are downloaded once into a local cache, into a temporary directory that is renamed into
place only when complete, so an interrupted download is never mistaken for a finished one.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import torch
from safetensors import safe_open

INDEX_NAME = "model.safetensors.index.json"
# Files a checkpoint needs; everything else in a remote prefix/repo (README, images, .bin) is skipped.
WANTED_PATTERNS = ["*.json", "*.safetensors", "tokenizer*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(Exception):
    """A checkpoint that cannot be found, fetched or read; the message names it and says why."""


def redact(url: str) -> str:
    """Drop user:password@ from a URL so error messages never carry credentials."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=host))


def default_cache_dir() -> Path:
    return Path(os.environ.get("PAGEMILL_CACHE") or Path.home() / ".cache" / "pagemill" / "checkpoints")


def resolve_checkpoint(spec: str, cache_dir: Path | None = None) -> Path:
    """Turn a local dir, s3:// or other fsspec URL, or `org/name` hub id into a validated local directory."""
    spec = str(spec)
    if "://" in spec:
        scheme = spec.split("://", 1)[0].lower()
        if scheme in ("s3", "s3a"):
            return _cached_download(spec, cache_dir, _download_s3)
        import fsspec

        if scheme in fsspec.available_protocols():
            return _cached_download(spec, cache_dir, _download_fsspec)
        raise CheckpointError(f"unsupported checkpoint URL {redact(spec)!r}: unknown scheme {scheme!r} "
                              "(use a local directory, s3://bucket/prefix, an fsspec URL or an org/name hub id)")
    path = Path(spec).expanduser()
    if path.exists():
        return validate_checkpoint_dir(path)
    if _HUB_ID.match(spec) and not spec.startswith("."):
        return _download_hub(spec, cache_dir)
    raise CheckpointError(f"checkpoint {spec!r} not found: not an existing directory, a URL or an org/name hub id")


def validate_checkpoint_dir(path: Path) -> Path:
    """Check the files a loader needs are there, so a broken checkpoint fails here and not mid-load."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory")
    config = path / "config.json"
    if not config.is_file():
        raise CheckpointError(f"checkpoint {path} has no config.json")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: config.json is not valid JSON ({e})") from e
    index = path / INDEX_NAME
    if index.is_file():
        for shard in sorted(set(_read_index(index).values())):
            if not (path / shard).is_file():
                raise CheckpointError(f"checkpoint {path}: shard {shard} named in {INDEX_NAME} is missing")
    elif not any(path.glob("*.safetensors")):
        raise CheckpointError(f"checkpoint {path} has no safetensors weights (no *.safetensors, no {INDEX_NAME})")
    return path


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {index.parent}: unreadable {INDEX_NAME} ({e!r})") from e
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"checkpoint {index.parent}: {INDEX_NAME} weight_map is not a mapping")
    return weight_map


# --------------------------------------------------------------------------------------------- remote

def _cached_download(url: str, cache_dir: Path | None, download: Callable[[str, Path], None]) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    if target.is_dir():  # only complete downloads are ever renamed to this name
        return validate_checkpoint_dir(target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=root))
    try:
        download(url, tmp)
        validate_checkpoint_dir(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not a concurrent download that finished first
                raise
    except OSError as e:
        raise CheckpointError(f"could not store checkpoint {redact(url)} in cache {root}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return validate_checkpoint_dir(target)


def _wanted(rel: str) -> bool:
    return "/" not in rel and any(fnmatch(rel, p) for p in WANTED_PATTERNS)


def _download_s3(url: str, dest: Path) -> None:
    """Copy the checkpoint files under s3://bucket/prefix; endpoint and credentials from the AWS chain."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    parts = urlsplit(url)
    bucket, prefix = parts.netloc, parts.path.strip("/")
    prefix = f"{prefix}/" if prefix else ""
    shown = f"s3://{bucket}/{prefix}"
    try:
        s3 = boto3.client("s3")
        found = 0
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):]
                if _wanted(rel):
                    s3.download_file(bucket, obj["Key"], str(dest / rel))
                    found += 1
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "error")
        raise CheckpointError(f"could not download checkpoint {shown}: {code}") from e
    except BotoCoreError as e:
        raise CheckpointError(f"could not download checkpoint {shown}: {type(e).__name__}: {e}") from e
    if not found:
        raise CheckpointError(f"no checkpoint files under {shown}")


def _download_fsspec(url: str, dest: Path) -> None:
    import fsspec

    shown = redact(url)
    try:
        fs, root = fsspec.core.url_to_fs(url)
        root = root.rstrip("/")
        files = [f for f in fs.find(root) if _wanted(f[len(root):].lstrip("/"))]
        for f in files:
            fs.get_file(f, str(dest / f[len(root):].lstrip("/")))
    except (OSError, ValueError, ImportError) as e:  # ImportError: the scheme's backend package is missing
        raise CheckpointError(f"could not download checkpoint {shown}: {type(e).__name__}: {e}") from e
    if not files:
        raise CheckpointError(f"no checkpoint files under {shown}")


def _download_hub(repo_id: str, cache_dir: Path | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = snapshot_download(repo_id, allow_patterns=WANTED_PATTERNS,
                                 cache_dir=str(cache_dir) if cache_dir is not None else None)
    except RepositoryNotFoundError as e:
        raise CheckpointError(f"Hugging Face hub repo {repo_id!r} not found or not accessible") from e
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise CheckpointError(
            f"could not reach the Hugging Face hub for {repo_id!r} (offline or unreachable, and not in the local "
            f"HF cache; no local directory of that name either); pass a local checkpoint directory or an s3:// URL "
            "instead") from e
    return validate_checkpoint_dir(Path(path))


# -------------------------------------------------------------------------------------------- reading

class CheckpointReader:
    """Reads one tensor at a time from the right shard, straight into the target device/dtype."""

    def __init__(self, local_dir: str | Path) -> None:
        self.path = validate_checkpoint_dir(Path(local_dir))
        index = self.path / INDEX_NAME
        weight_map = _read_index(index) if index.is_file() else None
        files = sorted(set(weight_map.values())) if weight_map is not None else \
            sorted(p.name for p in self.path.glob("*.safetensors"))
        self._handles: dict[tuple[str, str], Any] = {}
        self._where: dict[str, str] = {}
        for name in files:  # opening parses each header: corrupt files fail now, naming the file
            for key in self._open(name, "cpu").keys():
                self._where[key] = name
        if weight_map is not None:
            for key, name in weight_map.items():
                if self._where.get(key) != name:
                    raise CheckpointError(f"checkpoint {self.path}: {INDEX_NAME} maps {key} to {name}, "
                                          "which does not contain it")

    def _open(self, name: str, device: str) -> Any:
        handle = self._handles.get((name, device))
        if handle is None:
            try:
                handle = safe_open(str(self.path / name), framework="pt", device=device)
            except Exception as e:  # SafetensorError is not importable as a stable name
                raise CheckpointError(f"checkpoint {self.path}: corrupt or truncated safetensors file {name}: {e}") \
                    from e
            self._handles[(name, device)] = handle
        return handle

    def _file(self, key: str) -> str:
        try:
            return self._where[key]
        except KeyError:
            raise CheckpointError(f"checkpoint {self.path} has no tensor {key!r}") from None

    def keys(self) -> list[str]:
        return sorted(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._open(self._file(key), "cpu").get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        return _ST_DTYPES[self._open(self._file(key), "cpu").get_slice(key).get_dtype()]

    def get(self, key: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        name = self._file(key)
        try:
            tensor = self._open(name, str(device)).get_tensor(key)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"checkpoint {self.path}: cannot read {key} from {name}: {e}") from e
        return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)

    def config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text(encoding="utf-8"))

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
