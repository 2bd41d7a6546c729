"""Training and evaluation from a real pyramidal TIFF with QuPath-style GeoJSON annotations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wsi_espnet.errors import AnnotationError
from wsi_espnet.models.cards import load_card
from wsi_espnet.sample import write_sample_slide
from wsi_espnet.slide import Slide
from wsi_espnet.train.datasets import IGNORE_INDEX, load_annotated_slides, read_annotations
from wsi_espnet.train.evaluate import evaluate_model
from wsi_espnet.train.loop import TrainConfig, train

CARD = load_card("breast-tissue-espnet")  # mpp 1.0; the slide is 0.5 µm/px, so scale = 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _feature(coords: list[list[float]], name: str | None) -> dict:
    """A feature as QuPath 0.4+ exports it (classification as a name/colour object)."""
    props: dict = {"objectType": "annotation"}
    if name is not None:
        props["classification"] = {"name": name, "color": [200, 0, 0]}
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [coords]}, "properties": props}


@pytest.fixture(scope="module")
def annotated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("qupath")
    slide = write_sample_slide(root / "slide.tif", 2048, 1536, mpp=0.5, tissue_fraction=0.5, seed=1)
    features = [
        # Triangle 200..600 (level 0): its bounding box is half labelled, half ignore.
        _feature([[200, 200], [600, 200], [200, 600], [200, 200]], "Malignant epithelium"),
        # A child square inside it, exported after its parent: it wins.
        _feature([[220, 220], [300, 220], [300, 300], [220, 300], [220, 220]], "Normal stroma"),
        # A separate region far away.
        _feature([[1400, 1000], [1600, 1000], [1600, 1200], [1400, 1200], [1400, 1000]], "blood"),
        # Unclassified outlines are not labels and are skipped.
        _feature([[0, 0], [2048, 0], [2048, 1536], [0, 1536], [0, 0]], None),
    ]
    geojson = root / "slide.geojson"
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return slide, geojson


def test_regions_labels_and_ignore_mask(annotated: tuple[Path, Path]) -> None:
    slide, geojson = annotated
    samples = load_annotated_slides([slide], [geojson], CARD)
    assert [(s.name, s.origin, s.labels.shape) for s in samples] == [
        ("slide#0", (100, 100), (200, 200)),
        ("slide#1", (700, 500), (100, 100)),
    ]
    tri, blood = samples[0].labels, samples[1].labels
    assert tri[5, 5] == 2 and tri[195, 195] == IGNORE_INDEX  # inside / outside the triangle
    assert (tri[15:45, 15:45] == 3).all()  # the child square, 220..300 level-0 → 10..50 analysis
    assert 0.45 < (tri == IGNORE_INDEX).mean() < 0.55
    assert (blood == 6).all()
    with Slide.open(slide) as s:
        assert np.array_equal(samples[1].image, s.read_region(700, 500, 100, 100, CARD.mpp))


def test_unknown_class_names_list_the_card_classes(tmp_path: Path) -> None:
    path = tmp_path / "bad.geojson"
    square = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [_feature(square, "Tumor")]}))
    with pytest.raises(AnnotationError, match=r"Tumor.*malignant_epithelium") as err:
        read_annotations(path, CARD)
    assert str(path) in str(err.value)


def test_train_and_evaluate_from_slide_annotations(annotated: tuple[Path, Path], tmp_path: Path) -> None:
    slide, geojson = annotated
    config = TrainConfig(
        run_dir=tmp_path,
        slides=(slide,),
        annotations=(geojson,),
        init="none",
        stage="decoder",
        epochs=1,
        steps_per_epoch=3,
        batch_size=2,
        crop=64,
        progress=False,
    )
    result = train(config)
    assert result.card.trained and result.card.extra["training"]["data"] == ["slide#0", "slide#1"]
    card = load_card(result.card_path)
    samples = load_annotated_slides([slide], [geojson], card)
    metrics = evaluate_model(card.build_model(), card, samples)
    assert metrics["pixels"] == sum(int((s.labels != IGNORE_INDEX).sum()) for s in samples)
    assert metrics["support"]["blood"] == 100 * 100
