"""GeoJSON export: QuPath's import rules, round trip to the label map, seams, specks, empty stores."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio.features
import shapely
import shapely.geometry
import zarr
from affine import Affine
from export_stores import CLASSES, blob_labels, write_store
from qupath_rules import check_feature_collection, check_geometry, check_path_class
from scipy import ndimage

from wsi_espnet.errors import OutputError
from wsi_espnet.export import geojson_file
from wsi_espnet.export.geojson import Frame, read_summary, write_geojson

ROUND_TRIP_AGREEMENT = 0.97  # fraction of tissue pixels (labelled in either map) that agree


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _rasterise(collection: dict, shape: tuple[int, int], scale: float, offset=(0, 0)) -> np.ndarray:
    """Burn the features back into the analysis grid (level-0 coordinates -> analysis pixels)."""
    values = {c["name"]: c["value"] for c in CLASSES}
    shapes = [
        (f["geometry"], values[f["properties"]["classification"]["name"]]) for f in collection["features"]
    ]
    if not shapes:
        return np.zeros(shape, np.uint8)
    transform = Affine(scale, 0, -offset[0], 0, scale, -offset[1])
    return rasterio.features.rasterize(shapes, out_shape=shape, transform=transform, dtype=np.uint8)


# --- the checker itself, on QuPath's own fixtures and on broken input -------------------------


def test_checker_accepts_qupath_fixtures(shared_data: Path) -> None:
    folder = shared_data / "qupath_json"
    assert check_geometry(_load(folder / "polygon.geojson")) == []
    assert check_path_class(_load(folder / "derived-class.json")) == []
    assert check_path_class(_load(folder / "derived-class-legacy.json")) == []


GOOD_FEATURE = {
    "type": "Feature",
    "geometry": {
        "type": "MultiPolygon",
        "coordinates": [
            [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]], [[2, 2], [2, 4], [4, 4], [4, 2], [2, 2]]]
        ],
    },
    "properties": {
        "objectType": "annotation",
        "classification": {"name": "Tumor", "color": [200, 0, 0]},
        "isLocked": True,
        "measurements": {"Area µm^2": 96.0},
    },
}


def _broken(path: tuple, value) -> dict:
    feature = copy.deepcopy(GOOD_FEATURE)
    target = feature
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return {"type": "FeatureCollection", "features": [feature]}


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("properties", "classification", "color"), [200, 0, 0, 255], "three ints"),
        (("properties", "classification", "color"), [256, 0, 0], "three ints"),
        (("properties", "classification", "color"), [1.5, 0, 0], "three ints"),
        (("properties", "classification", "name"), KeyError, "no 'name'"),
        (("properties", "classification"), {"name": "Tumor", "colorRGB": "red"}, "packed 32-bit"),
        (("properties", "classification"), {"name": "Tumor"}, "no 'color'"),
        (("properties", "measurements"), {"Area": float("nan")}, "finite"),
        (("properties", "measurements"), {"Area": {"nested": 1}}, "finite"),
        (("properties", "objectType"), KeyError, "objectType"),
        (("properties", "isLocked"), "yes", "isLocked"),
        (("geometry", "type"), "Circle", "geometry type"),
        (("geometry", "coordinates"), [[[[0, 0], [10, 0], [10, 10], [0, 10]]]], "not closed"),
        (("geometry", "coordinates"), [[[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]], "invalid geometry"),
        (("geometry", "coordinates"), [[[[0, 0], [10, 0], [0, 0]]]], "fewer than 4"),
        (("geometry", "coordinates"), [[[[0, "a"], [10, 0], [10, 10], [0, 0]]]], "finite"),
    ],
)
def test_checker_rejects_broken_features(path: tuple, value, expected: str) -> None:
    assert check_feature_collection({"type": "FeatureCollection", "features": [GOOD_FEATURE]}) == []
    problems = check_feature_collection(_broken(path, value))
    assert any(expected in p for p in problems), problems


def test_checker_rejects_wrong_structure() -> None:
    assert check_feature_collection([GOOD_FEATURE]) == ["top level is not a FeatureCollection"]
    top_level_type = copy.deepcopy(GOOD_FEATURE)
    top_level_type["objectType"] = top_level_type["properties"].pop("objectType")
    problems = check_feature_collection({"type": "FeatureCollection", "features": [top_level_type]})
    assert any("inside 'properties'" in p for p in problems)
    legacy = {"name": "Tumor", "colorRGB": -3670016, "parentClass": {"name": "Tissue", "colorRGB": 2**40}}
    assert check_path_class(legacy) == ["parentClass: colorRGB 1099511627776 is not a packed 32-bit int"]


# --- the exporter -------------------------------------------------------------------------------


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_geojson_passes_qupath_rules_and_round_trips(tmp_path: Path, zarr_format: int) -> None:
    labels = blob_labels((600, 700), seed=1)
    offset = (1000, 3000)
    store = write_store(tmp_path, labels, zarr_format=zarr_format, bounds_offset=offset)
    collection = _load(write_geojson(store, tmp_path / "out.geojson"))

    assert check_feature_collection(collection) == []
    names = [f["properties"]["classification"]["name"] for f in collection["features"]]
    assert names == ["benign_epithelium", "malignant_epithelium", "normal_stroma"]  # background never
    colors = {c["name"]: c["color"] for c in CLASSES}
    for feature in collection["features"]:
        properties = feature["properties"]
        assert feature["geometry"]["type"] == "MultiPolygon"
        assert properties["classification"]["color"] == colors[properties["classification"]["name"]]
        assert properties["isLocked"] is True
        assert properties["measurements"]["Area mm^2"] == pytest.approx(
            properties["measurements"]["Area µm^2"] / 1e6
        )
    # holes survive (stroma surrounds epithelium in this map)
    assert any(len(polygon) > 1 for f in collection["features"] for polygon in f["geometry"]["coordinates"])
    # classes do not overlap: coverage simplification keeps one shared boundary
    geoms = [shapely.geometry.shape(f["geometry"]) for f in collection["features"]]
    for i in range(len(geoms)):
        for j in range(i + 1, len(geoms)):
            assert geoms[i].intersection(geoms[j]).area < 1e-6
    # fractions of tissue add up (no specks lost beyond the minimum area)
    fractions = sum(f["properties"]["measurements"]["Fraction of tissue"] for f in collection["features"])
    assert fractions == pytest.approx(1.0, abs=0.01)

    back = _rasterise(collection, labels.shape, scale=4.0, offset=offset)
    tissue = (labels != 0) | (back != 0)
    agreement = (back[tissue] == labels[tissue]).mean()
    assert agreement >= ROUND_TRIP_AGREEMENT, agreement


def test_bounds_offset_is_subtracted_only_when_asked(tmp_path: Path) -> None:
    labels = np.zeros((64, 64), np.uint8)
    labels[8:24, 16:40] = 2
    store = write_store(tmp_path, labels, tile=32, n_levels=1, bounds_offset=(100, 50))
    cropped = _load(write_geojson(store, tmp_path / "a.geojson", simplify_px=0))
    full = _load(
        write_geojson(store, tmp_path / "b.geojson", simplify_px=0, frame=Frame(subtract_bounds=False))
    )
    assert shapely.geometry.shape(full["features"][0]["geometry"]).bounds == (64.0, 32.0, 160.0, 96.0)
    assert shapely.geometry.shape(cropped["features"][0]["geometry"]).bounds == (-36.0, -18.0, 60.0, 46.0)


def test_chunk_seams_dissolve_and_specks_are_dropped(tmp_path: Path) -> None:
    labels = np.zeros((128, 128), np.uint8)
    labels[20:100, 10:110] = 1  # spans four 64-px chunks
    labels[40:60, 40:60] = 3  # a hole in class 1, filled by class 3
    labels[120:122, 120:122] = 2  # 4 px = 16 µm² at 2 µm/px: below the minimum area
    store = write_store(tmp_path, labels, tile=64, n_levels=2)
    collection = _load(write_geojson(store, tmp_path / "out.geojson", min_area_um2=50, simplify_px=0))
    assert check_feature_collection(collection) == []
    by_name = {f["properties"]["classification"]["name"]: f for f in collection["features"]}
    assert sorted(by_name) == ["benign_epithelium", "normal_stroma"]
    epithelium = by_name["benign_epithelium"]["geometry"]["coordinates"]
    assert len(epithelium) == 1 and len(epithelium[0]) == 2  # one polygon, one hole: seams gone
    # pixel edges (simplify 0) give exact areas: (80*100 - 20*20) px * 4 µm²/px
    assert by_name["benign_epithelium"]["properties"]["measurements"]["Area µm^2"] == pytest.approx(7600 * 4)


def test_per_region_gives_one_feature_per_connected_region(tmp_path: Path) -> None:
    labels = blob_labels((300, 300), seed=3)
    store = write_store(tmp_path, labels, tile=128, n_levels=1)
    collection = _load(write_geojson(store, tmp_path / "out.geojson", per_region=True, min_area_um2=400))
    assert check_feature_collection(collection) == []
    assert {f["geometry"]["type"] for f in collection["features"]} == {"Polygon"}
    for value in (1, 2, 3):
        name = CLASSES[value]["name"]
        regions, count = ndimage.label(labels == value)
        big_enough = int((np.bincount(regions.ravel())[1:] * 4 >= 400 * 1.2).sum())
        features = [f for f in collection["features"] if f["properties"]["classification"]["name"] == name]
        assert big_enough <= len(features) <= count
        names = [f["properties"]["name"] for f in features]
        assert names == [f"{name} {i}" for i in range(1, len(features) + 1)]  # numbered as they close


def test_coarser_level_gives_the_same_picture(tmp_path: Path) -> None:
    labels = blob_labels((400, 400), seed=5)
    store = write_store(tmp_path, labels, tile=128, n_levels=3)
    fine = _load(write_geojson(store, tmp_path / "fine.geojson"))
    coarse = _load(write_geojson(store, tmp_path / "coarse.geojson", frame=Frame(level=1)))
    assert check_feature_collection(coarse) == []
    area = lambda fc: [f["properties"]["measurements"]["Area µm^2"] for f in fc["features"]]  # noqa: E731
    assert area(coarse) == pytest.approx(area(fine), rel=0.05)
    with pytest.raises(OutputError, match="no pyramid level 3"):
        write_geojson(store, tmp_path / "x.geojson", frame=Frame(level=3))


def test_store_without_tissue_gives_empty_collection(tmp_path: Path) -> None:
    store = write_store(tmp_path, np.zeros((100, 150), np.uint8), stats=False)
    collection = _load(write_geojson(tmp_path / "slide", tmp_path / "out.geojson"))
    assert collection["type"] == "FeatureCollection" and collection["features"] == []
    assert collection["wsi_espnet"]["classes"] == []
    assert check_feature_collection(collection) == []
    assert store.is_dir()


def test_user_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"no \.ome\.zarr store found"):
        write_geojson(tmp_path / "missing", tmp_path / "out.geojson")
    zarr.open_group(tmp_path / "other.ome.zarr", mode="w")
    with pytest.raises(OutputError, match="not a wsi-espnet store"):
        write_geojson(tmp_path / "other.ome.zarr", tmp_path / "out.geojson")
    write_store(tmp_path, np.ones((32, 32), np.uint8), stem="b", tile=32, n_levels=1)
    with pytest.raises(OutputError, match="several slide stores"):
        write_geojson(tmp_path, tmp_path / "out.geojson")
    with pytest.raises(OutputError, match="cannot write GeoJSON"):
        write_geojson(tmp_path / "b", tmp_path / "no" / "such" / "dir.geojson")


# --- band processing, streaming, specks, feature parts ---------------------------------------


def _class_geometries(collection: dict) -> dict[str, shapely.Geometry]:
    parts: dict[str, list] = {}
    for feature in collection["features"]:
        name = feature["properties"]["classification"]["name"]
        parts.setdefault(name, []).append(shapely.geometry.shape(feature["geometry"]))
    return {name: shapely.union_all(geoms) for name, geoms in parts.items()}


def test_bands_give_the_same_geometry_as_the_whole_map(tmp_path: Path) -> None:
    """Bands of 32 rows (many seams to merge across) and one band of the whole map agree."""
    labels = blob_labels((256, 300), seed=11)
    for tile in (32, 512):
        (tmp_path / str(tile)).mkdir()
        write_store(tmp_path / str(tile), labels, tile=tile, n_levels=1)
    for simplify in (0.0, 1.0):
        banded = _load(write_geojson(tmp_path / "32" / "slide", tmp_path / "a.geojson", simplify_px=simplify))
        whole = _load(write_geojson(tmp_path / "512" / "slide", tmp_path / "b.geojson", simplify_px=simplify))
        assert check_feature_collection(banded) == []
        a, b = _class_geometries(banded), _class_geometries(whole)
        assert sorted(a) == sorted(b)
        for name in a:
            difference = shapely.symmetric_difference(a[name], b[name]).area
            if simplify == 0:
                assert difference == 0.0, name  # pixel edges: identical regions
            else:  # the seams pin one vertex per crossing: a sliver of at most ~1 px per crossing
                assert difference < 0.01 * a[name].area, (name, difference)
        regions = lambda fc: {c["name"]: c["regions"] for c in fc["wsi_espnet"]["classes"]}  # noqa: E731
        assert regions(banded) == regions(whole)
        banded_geoms = list(a.values())
        for i in range(len(banded_geoms)):
            for j in range(i + 1, len(banded_geoms)):
                assert banded_geoms[i].intersection(banded_geoms[j]).area < 1e-6


def test_tiled_map_areas_scale_exactly(tmp_path: Path) -> None:
    labels = blob_labels((128, 192), seed=12)
    (tmp_path / "one").mkdir()
    (tmp_path / "four").mkdir()
    write_store(tmp_path / "one", labels, tile=64, n_levels=1)
    write_store(tmp_path / "four", np.tile(labels, (2, 2)), tile=64, n_levels=1)
    options = {"min_area_um2": 0, "simplify_px": 0}
    one = _load(write_geojson(tmp_path / "one" / "slide", tmp_path / "one.geojson", **options))
    four = _load(write_geojson(tmp_path / "four" / "slide", tmp_path / "four.geojson", **options))
    area = lambda fc: {c["name"]: c["area_mm2"] for c in fc["wsi_espnet"]["classes"]}  # noqa: E731
    assert area(four) == pytest.approx({name: 4 * a for name, a in area(one).items()}, rel=1e-9)
    for value in (1, 2, 3):  # and the exact pixel area: 4 µm² per analysis pixel
        name = CLASSES[value]["name"]
        assert area(one)[name] == pytest.approx(int((labels == value).sum()) * 4e-6, rel=1e-9)


def test_specks_are_stated_per_class(tmp_path: Path) -> None:
    labels = blob_labels((300, 300), seed=13)
    labels[5:7, 5:7] = 2  # 16 µm²: a speck at 2 µm/px
    store = write_store(tmp_path, labels, tile=64, n_levels=1)
    path = write_geojson(store, tmp_path / "out.geojson", min_area_um2=200, simplify_px=0)
    collection = _load(path)
    summary = collection["wsi_espnet"]
    assert read_summary(path) == summary  # the first line alone holds it
    assert summary["min_area_um2"] == 200 and "200 µm²" in summary["note"]
    for row in summary["classes"]:
        pixels = int((labels == row["value"]).sum())
        # without simplification, what is kept plus what is dropped is exactly the class's pixel area
        assert row["area_mm2"] + row["specks_dropped_mm2"] == pytest.approx(pixels * 4e-6, rel=1e-9)
    malignant = next(r for r in summary["classes"] if r["value"] == 2)
    assert malignant["specks_dropped"] >= 1 and malignant["specks_dropped_mm2"] >= 16e-6
    for feature in collection["features"]:
        measurements = feature["properties"]["measurements"]
        row = next(r for r in summary["classes"] if r["name"] == feature["properties"]["name"])
        assert measurements["Specks dropped mm^2"] == row["specks_dropped_mm2"]
        assert measurements["Min region area µm^2"] == 200
    assert sorted(p.name for p in tmp_path.iterdir() if "geojson" in p.name) == [
        "out.geojson"
    ]  # no temp left


def test_large_classes_are_split_into_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = blob_labels((300, 300), seed=14)
    store = write_store(tmp_path, labels, tile=64, n_levels=1)
    whole = _load(write_geojson(store, tmp_path / "whole.geojson"))
    monkeypatch.setattr(geojson_file, "MAX_FEATURE_VERTICES", 200)
    split = _load(write_geojson(store, tmp_path / "split.geojson"))
    assert check_feature_collection(split) == []
    assert len(split["features"]) > len(whole["features"])
    for row in split["wsi_espnet"]["classes"]:
        features = [f for f in split["features"] if f["properties"]["classification"]["name"] == row["name"]]
        assert len(features) == row["features"]
        if len(features) > 1:
            assert features[0]["properties"]["name"] == f"{row['name']} (part 1 of {len(features)})"
        for feature in features:  # a part holds one polygon larger than the cap, else stays within it
            polygons = feature["geometry"]["coordinates"]
            vertices = sum(len(ring) for polygon in polygons for ring in polygon)
            assert vertices <= 200 or len(polygons) == 1
    a, b = _class_geometries(whole), _class_geometries(split)
    assert all(shapely.symmetric_difference(a[n], b[n]).area < 1e-6 for n in a)


def test_specks_are_counted_whole_across_seams(tmp_path: Path) -> None:
    """In-chunk specks are pruned before vectorising; a region split by a seam is judged whole."""
    labels = np.zeros((128, 128), np.uint8)
    labels[10:13, 10:13] = 1  # 9 px inside one chunk: a speck
    labels[30:33, 62:66] = 2  # 12 px across the x seam at 64 (6 px each side): a speck
    labels[80:84, 60:68] = 3  # 32 px across the seam, 16 px each side: kept (>= 20 px)
    labels[100:104, 100:105] = 3  # 20 px inside one chunk: kept, exactly at the threshold
    store = write_store(tmp_path, labels, tile=64, n_levels=1)
    path = write_geojson(store, tmp_path / "out.geojson", min_area_um2=20 * 4, simplify_px=0)
    collection = _load(path)
    rows = {row["value"]: row for row in collection["wsi_espnet"]["classes"]}
    assert rows[1]["specks_dropped"] == 1 and rows[1]["specks_dropped_mm2"] == pytest.approx(9 * 4e-6)
    assert rows[2]["specks_dropped"] == 1 and rows[2]["specks_dropped_mm2"] == pytest.approx(12 * 4e-6)
    assert rows[3]["specks_dropped"] == 0 and rows[3]["regions"] == 2
    (feature,) = collection["features"]
    assert feature["properties"]["measurements"]["Area µm^2"] == pytest.approx((32 + 20) * 4)


def test_export_in_its_own_process_matches_and_reports_user_errors(tmp_path: Path) -> None:
    """finalise runs the GeoJSON in a child process (a worker's GIL is shared): same file, and a
    user problem comes back as one OutputError line."""
    from wsi_espnet.config import OutputSettings
    from wsi_espnet.export import export_all
    from wsi_espnet.export.isolated import export_in_process

    store = write_store(tmp_path, blob_labels((300, 300), seed=21), tile=64, n_levels=2)
    settings = OutputSettings(formats=("geojson",), geojson_min_area_um2=50.0)
    (path,) = export_all(store, settings=settings)["geojson"]
    in_process = path.read_bytes()
    path.unlink()
    export_in_process(Path(store), "geojson", settings)
    assert path.read_bytes() == in_process
    with pytest.raises(OutputError, match=r"nowhere: no \.ome\.zarr store found"):
        export_in_process(tmp_path / "nowhere", "geojson", settings)


def test_vectoriser_processes_and_threads_agree(tmp_path: Path) -> None:
    """Large maps vectorise in spawned processes (export.isolated allows it): same regions."""
    from wsi_espnet.export.bands import BandVectoriser

    store = write_store(tmp_path, blob_labels((300, 300), seed=22), tile=64, n_levels=1)
    labels = zarr.open_array(f"{store}/labels/tissue/0", mode="r")

    def regions(processes: bool) -> tuple[list[tuple[int, int, float, bytes]], dict]:
        vectoriser = BandVectoriser([labels, labels], 1.0, 30.0, processes=processes)
        found = [(i, r.value, r.pixels, shapely.to_wkb(r.geometry())) for i, r in vectoriser]
        return found, vectoriser.specks

    threaded, processed = regions(False), regions(True)
    assert threaded[0] and threaded == processed
