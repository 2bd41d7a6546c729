"""Shared fixtures: where the real data lives, and a skip with a clear reason when it does not."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"
ESPNET_REFERENCE = SHARED / "reference" / "espnet"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real slides and ROIs); tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (clone beside ../shared to run these)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def espnet_reference() -> Path:
    """``../shared/reference/espnet`` (official weights and golden outputs)."""
    if not ESPNET_REFERENCE.is_dir():
        pytest.skip(f"official ESPNet reference not found at {ESPNET_REFERENCE}")
    return ESPNET_REFERENCE
