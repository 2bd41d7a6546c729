"""Model cards: every shipped card loads; bad weights and bad cards give clear errors."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from wsi_espnet.errors import ModelCardError
from wsi_espnet.models import create_model
from wsi_espnet.models.cards import list_cards, load_card, sha256_file, write_card


def _card_fields(classes: int = 3) -> dict:
    return {
        "name": "tiny",
        "architecture": {"name": "espnet", "classes": classes, "p": 1, "q": 1, "decoder": "wide"},
        "classes": [{"value": i, "name": f"class_{i}", "color": [i * 40, 10, 200]} for i in range(classes)],
        "mpp": 2.0,
        "input": {"channel_order": "RGB", "scale": 255.0, "mean": [0.5] * 3, "std": [0.25] * 3},
        "trained": False,
    }


@pytest.fixture
def tiny_card(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pt"
    torch.save(create_model(**_card_fields()["architecture"]).state_dict(), weights)
    return write_card(_card_fields(), tmp_path / "tiny.yaml", weights)


def test_every_shipped_card_parses_and_builds():
    cards = list_cards()
    assert any(c.name == "breast-tissue-espnet" for c in cards)
    for card in cards:
        # segment's client only checks a shipped card's sha256 (preflight): this is where its
        # architecture is built and its weights are loaded strictly.
        assert card.packaged and card.n_classes == card.architecture["classes"]
        assert card.n_parameters > 100_000
        if card.weights_present:
            model = card.build_model()
            assert not model.training
    assert load_card("breast-tissue-espnet").weights_present


def test_architecture_name_and_parameters_are_checked(tmp_path):
    """An unknown architecture is refused when the card is read (no torch needed); a bad
    parameter when its network is built. Both errors name the card."""
    fields = _card_fields()
    fields["architecture"] = {**fields["architecture"], "name": "unet"}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(fields))
    with pytest.raises(ModelCardError, match=r"a\.yaml.*name must be one of espnet, espnet-c"):
        load_card(tmp_path / "a.yaml")
    fields["architecture"] = {**_card_fields()["architecture"], "depth": 3}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(fields))
    card = load_card(tmp_path / "b.yaml")
    assert not card.packaged
    with pytest.raises(ModelCardError, match=r"b\.yaml.*invalid architecture.*depth"):
        card.build_model(load_weights=False)


def test_breast_card_has_the_eight_tissue_classes():
    card = load_card("breast-tissue-espnet")
    assert [c.name for c in card.classes] == [
        "background",
        "benign_epithelium",
        "malignant_epithelium",
        "normal_stroma",
        "desmoplastic_stroma",
        "secretion",
        "blood",
        "necrosis",
    ]
    assert card.architecture["decoder"] == "wide"


def test_written_card_round_trips_and_verifies_sha(tiny_card):
    assert tiny_card.weights_sha256 == sha256_file(tiny_card.weights_file)
    model = tiny_card.build_model()
    assert model(torch.rand(1, 3, 24, 24)).shape == (1, 3, 24, 24)


def test_wrong_sha256_is_a_clear_error(tiny_card, tmp_path):
    torch.save({"tampered": torch.zeros(1)}, tiny_card.weights_file)
    with pytest.raises(ModelCardError, match=r"tiny\.yaml: sha256 of tiny\.pt is .* card expects"):
        load_card(tiny_card.path).build_model()


def test_missing_weights_is_a_clear_error(tiny_card):
    tiny_card.weights_file.unlink()
    with pytest.raises(ModelCardError, match="weights file not found"):
        load_card(tiny_card.path).build_model()


def test_weights_of_another_architecture_are_refused(tmp_path):
    weights = tmp_path / "other.pt"
    torch.save(create_model(name="espnet", classes=5, p=1, q=1).state_dict(), weights)
    card = write_card(_card_fields(), tmp_path / "tiny.yaml", weights)
    with pytest.raises(ModelCardError, match="do not fit the card's architecture"):
        card.build_model()


def test_wrong_class_count_is_a_clear_error(tmp_path):
    fields = _card_fields()
    fields["classes"] = fields["classes"][:2]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(fields))
    with pytest.raises(ModelCardError, match="wrong class count"):
        load_card(tmp_path / "bad.yaml")


def test_unknown_model_name_lists_shipped_models():
    with pytest.raises(ModelCardError, match=r"unknown model 'nope'.*breast-tissue-espnet"):
        load_card("nope")


def test_card_outside_package_resolves_weights_relative_to_itself(tiny_card, tmp_path):
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copy(tiny_card.path, moved / "tiny.yaml")
    shutil.copy(tiny_card.weights_file, moved / "tiny.pt")
    assert load_card(moved / "tiny.yaml").weights_file == (moved / "tiny.pt").resolve()


def test_weights_are_loaded_without_unpickling_code(tiny_card):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"x": Evil()}, tiny_card.weights_file)
    fields = yaml.safe_load(tiny_card.path.read_text())
    fields["weights"]["sha256"] = sha256_file(tiny_card.weights_file)
    tiny_card.path.write_text(yaml.safe_dump(fields))
    with pytest.raises(ModelCardError, match="cannot load weights"):
        load_card(tiny_card.path).build_model()
