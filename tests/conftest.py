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


@pytest.fixture(scope="session")
def tissue_card(tmp_path_factory):
    """The shipped breast-tissue card when its trained weights are present, else the same
    architecture with seeded random weights (a fixture-only card, never shown to users)."""
    from wsi_espnet.models.cards import load_card, random_card

    shipped = load_card("breast-tissue-espnet")
    if shipped.weights_present and shipped.trained:
        return shipped.path
    return random_card(shipped, tmp_path_factory.mktemp("card"), "fixture-random-espnet").path


@pytest.fixture(scope="session")
def small_slide(tmp_path_factory):
    """A small synthetic pyramidal slide: 2048x1536 px at 0.5 µm/px (1024x768 at 1 µm/px)."""
    from wsi_espnet.sample import write_sample_slide

    folder = tmp_path_factory.mktemp("slides")
    return write_sample_slide(folder / "small.tif", 2048, 1536, mpp=0.5, tissue_fraction=0.35, seed=3)


@pytest.fixture
def one_torch_thread():
    """Tiny models on tiny crops train faster on one thread, and stay fast (instead of ~10x
    slower) when other processes share the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
