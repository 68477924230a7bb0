"""Shared test fixtures: where the reference goldens live."""
import os
from pathlib import Path

# The paged decode kernel (model/paged_attention.py) runs on CPU tensors in Triton's interpreter, a switch
# triton reads when it is imported: set before any test imports the model.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The compiled CPU decode step (model/compiled_decode.py) compiles once per model, ~10-40 s on two cores: its
# own tests ask for it; everywhere else (many models, Ray actors, CLI runs, which inherit this) it is off.
os.environ.setdefault("PAGEMILL_COMPILED_DECODE", "0")

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("PAGEMILL_FIXTURES", REPO.parent / "shared" / "fixtures" / "dsvl2-ref"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"reference fixtures not found at {FIXTURES} (set PAGEMILL_FIXTURES)")
    return FIXTURES
