"""Shared test fixtures: where the reference goldens live."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("PAGEMILL_FIXTURES", REPO.parent / "shared" / "fixtures" / "dsvl2-ref"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"reference fixtures not found at {FIXTURES} (set PAGEMILL_FIXTURES)")
    return FIXTURES
