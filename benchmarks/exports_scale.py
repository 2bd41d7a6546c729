"""How the exports scale with the label map: time and peak RSS at 1x and 4x the area (and 1 GPx).

``python -m benchmarks.exports_scale [--side 4096] [--gpx] [--out DIR]`` builds synthetic slide
stores by tiling one procedurally generated label map (tissue fragments on glass, four classes
with ragged borders and model-like specks), written chunk by chunk with the store code that the
pipeline uses (``SlideStore.create`` + ``write_chunk`` + ``build_pyramid``; chunks without tissue
are not written, as in a run). Each exporter then runs on each store in a fresh subprocess, whose
kernel-reported peak RSS (``ru_maxrss`` from ``wait4``) is exact for that exporter alone.

The targets (issue 10): 4x the label-map area costs at most 4.5x the export time and at most
1.15x the peak RSS. The 4x store is the 1x store tiled 2 x 2, so it is twice as wide: exporters
that hold a band of full width show it here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from wsi_espnet.models.cards import load_card

BASE_SIDE = 2048  # px of the generated map that is tiled; a multiple of the chunk
CHUNK = 512
MPP = 1.0
SLIDE_MPP = 0.5
# The shipped card's class table (the map below uses values 0-4 of it).
CLASSES = [
    {"value": c.value, "name": c.name, "color": list(c.color)}
    for c in load_card("breast-tissue-espnet").classes
]
EXPORTERS = ("geojson", "ometiff", "png", "html")
SPARSE_COPIES = 4


def fragment_labels(side: int = BASE_SIDE, seed: int = 0) -> np.ndarray:
    """A biopsy-like label map: smooth tissue fragments (~35 % of the area), four classes, specks."""
    rng = np.random.default_rng(seed)
    coarse = ndimage.gaussian_filter(rng.normal(size=(side // 8, side // 8)), 5)
    tissue = ndimage.zoom(coarse, 8, order=1) > np.quantile(coarse, 0.65)
    kind = ndimage.zoom(ndimage.gaussian_filter(rng.normal(size=(side // 4, side // 4)), 4), 4, order=1)
    kind += 0.15 * ndimage.gaussian_filter(rng.normal(size=(side, side)), 1.5)  # ragged class borders
    bins = np.quantile(kind, [0.25, 0.5, 0.75])
    labels = (np.digitize(kind, bins) + 1).astype(np.uint8) * tissue
    specks = rng.random((side, side)) < 0.0005  # isolated pixels of another class, as models make
    labels[specks & tissue] = rng.integers(1, 5, int((specks & tissue).sum()), dtype=np.uint8)
    return labels


def build_store(folder: Path, base: np.ndarray, repeat: int, sparse: bool = False) -> Path:
    """``folder/<stem>.ome.zarr``: ``base`` tiled ``repeat x repeat``, written chunk by chunk.

    ``sparse`` writes only ``SPARSE_COPIES`` copies of ``base`` on a diagonal of the same map and
    leaves the rest glass, as on a biopsy slide (a 16x16 map: 4 of 256 base areas, 1.6 % of chunks).
    """
    from wsi_espnet.grid import TileGrid
    from wsi_espnet.store import SlideStore

    side = base.shape[0] * repeat
    stem = f"sparse{repeat}x{repeat}" if sparse else f"tiled{repeat}x{repeat}"
    copies = {(k * repeat // SPARSE_COPIES, k * repeat // SPARSE_COPIES) for k in range(SPARSE_COPIES)}
    store_path = folder / stem / f"{stem}.ome.zarr"
    slide = {"path": "", "mpp": SLIDE_MPP, "dimensions": [2 * side, 2 * side], "bounds_offset": [0, 0]}
    attrs = {"model": {"name": "synthetic", "sha256": ""}, "slide": slide}
    if store_path.exists():
        shutil.rmtree(store_path)
    store = SlideStore.create(store_path, TileGrid((side, side), CHUNK, 0), MPP, CLASSES, attrs=attrs)
    per_base = base.shape[0] // CHUNK
    for iy in range(side // CHUNK):
        for ix in range(side // CHUNK):
            by, bx = (iy % per_base) * CHUNK, (ix % per_base) * CHUNK
            labels = base[by : by + CHUNK, bx : bx + CHUNK]
            if sparse and (iy // per_base, ix // per_base) not in copies:
                continue
            if not labels.any():
                continue  # glass: never written, reads as background
            scores = np.stack([(labels == c["value"]).astype(np.uint8) * 255 for c in CLASSES])
            store.write_chunk((iy, ix), scores, labels)
    store.build_pyramid()
    store.set_status("complete")
    return store_path


def run_exporter(name: str, store: Path) -> dict[str, float]:
    """Run one exporter on ``store`` in a fresh process; its wall time and exact peak RSS."""
    cmd = [sys.executable, "-m", "benchmarks.exports_scale", "--export", name, str(store)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    output = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"exporter {name} failed on {store} (exit {proc.returncode})")
    result = json.loads(output.strip().splitlines()[-1])
    result["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 2)  # steadier than wall on a shared machine
    result["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)  # Linux: KiB
    return result


def _export_here(name: str, store: Path) -> None:
    """The child process: import, then time one exporter alone, print a JSON line."""
    from wsi_espnet.export.geojson import read_summary, write_geojson
    from wsi_espnet.export.ometiff import write_ome_tiff
    from wsi_espnet.export.overlay import write_overlay
    from wsi_espnet.export.report import write_report

    base = store.parent / store.name[: -len(".ome.zarr")]
    start = time.perf_counter()
    extra: dict = {}
    if name == "geojson":
        path = write_geojson(store, f"{base}.geojson")
        summary = read_summary(path) or {}
        extra["features"] = sum(c["features"] for c in summary.get("classes", []))
        extra["max_vertices_per_feature"] = max(
            (c["max_feature_vertices"] for c in summary.get("classes", [])), default=0
        )
        extra["mib"] = round(path.stat().st_size / 2**20, 1)
    elif name == "ometiff":
        write_ome_tiff(store, f"{base}.labels.ome.tif")
    elif name == "png":
        write_overlay(store, f"{base}.overlay.png")
    else:
        write_report(store, f"{base}.report.html")
    print(json.dumps({"seconds": round(time.perf_counter() - start, 2), **extra}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=2 * BASE_SIDE, help="side of the 1x map (px) [4096]")
    parser.add_argument("--exporters", default=",".join(EXPORTERS), help="at 1x and 4x [all four]")
    parser.add_argument(
        "--gpx",
        action="store_true",
        help="also a 32768² (1.07 GPx) map, for the exporters in --gpx-exporters",
    )
    parser.add_argument("--gpx-exporters", default="ometiff,png,html", help="[ometiff,png,html]")
    parser.add_argument(
        "--sparse",
        action="store_true",
        help="also a 16x16-base map with only 4 copies of the base on glass (a biopsy's sparsity)",
    )
    parser.add_argument("--out", type=Path, default=None, help="keep the stores here [a temp folder]")
    parser.add_argument("--export", nargs=2, metavar=("NAME", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.export:
        _export_here(args.export[0], Path(args.export[1]))
        return
    base = fragment_labels()
    chosen = tuple(args.exporters.split(","))
    points = [(args.side // BASE_SIDE, chosen), (2 * args.side // BASE_SIDE, chosen)]
    if args.gpx:
        points.append((32768 // BASE_SIDE, tuple(args.gpx_exporters.split(","))))
    sparse = [(16, chosen)] if args.sparse else []
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.out or Path(scratch)
        rows = []
        for (repeat, exporters), is_sparse in [*((p, False) for p in points), *((p, True) for p in sparse)]:
            start = time.perf_counter()
            store = build_store(folder, base, repeat, is_sparse)
            built = time.perf_counter() - start
            mpx = (BASE_SIDE * repeat) ** 2 / 1e6
            for name in exporters:
                result = run_exporter(name, store)
                row = {"exporter": name, "mpx": round(mpx, 1), "store_build_s": round(built, 1), **result}
                rows.append({**row, "sparse": is_sparse})
                print(json.dumps(rows[-1]), flush=True)
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    """Ratios to each exporter's 1x row: wall time, CPU time and peak RSS."""
    first = {r["exporter"]: r for r in reversed(rows)}  # the first (1x) row of each exporter
    print("\nexporter     MPx   wall s  x-wall   cpu s  x-cpu  peak RSS MiB  x-RSS")
    for row in rows:
        ref = first[row["exporter"]]
        ratios = [row[k] / ref[k] if ref[k] else float("nan") for k in ("seconds", "cpu_s", "peak_rss_mib")]
        print(
            f"{row['exporter']:<9} {row['mpx']:>7.1f} {row['seconds']:>8.2f} {ratios[0]:>7.2f}"
            f" {row['cpu_s']:>7.2f} {ratios[1]:>6.2f} {row['peak_rss_mib']:>13.1f} {ratios[2]:>6.2f}"
        )


if __name__ == "__main__":
    main()
