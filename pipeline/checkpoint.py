"""Which checkpoint a job loads; `smoke` means a random mini checkpoint generated once into a cache.

The smoke checkpoint exists so a fresh machine without network or weights can run the whole
pipeline; its outputs are noise, and we say so loudly every time it is used.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

SMOKE = "smoke"
SMOKE_WARNING = (
    "WARNING: --model smoke: no real checkpoint is used. Running a randomly initialised mini DeepSeek-VL2 "
    "checkpoint ({path}); every generated text and box is RANDOM, not a real OCR/caption. "
    "Pass --model <local dir | s3:// URL | HF hub id> for real outputs."
)


def cache_dir() -> Path:
    base = os.environ.get("PAGEMILL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pagemill")
    return Path(base)


def smoke_checkpoint(root: Path | None = None) -> Path:
    """Generate (once; atomic rename so concurrent jobs never see half a checkpoint) and return its path."""
    root = root or cache_dir()
    path = root / "smoke-tiny-mini-seed0"
    if (path / "config.json").is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smoke-", dir=root))
    try:
        from model.smoke import write_smoke_checkpoint

        write_smoke_checkpoint(tmp, "tiny", "mini", seed=0)
        try:
            os.replace(tmp, path)
        except OSError:  # another job won the race
            if not (path / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_model(spec: str) -> tuple[str, bool]:
    """(path or id to hand to model.load_pretrained, whether it is the random smoke checkpoint)."""
    if spec == SMOKE:
        path = smoke_checkpoint()
        print(SMOKE_WARNING.format(path=path), flush=True)
        return str(path), True
    return spec, False
