"""What artifact QC adds to a ``segment`` run: ``--qc off`` against ``--qc flag`` on the same slide.

Whole commands (``python -m wsi_espnet segment SLIDE -o OUT --overwrite -q --qc MODE``), run in
turn (off, flag, off, flag, ...) after one warm-up of each, so that drift of a shared machine hits
both alike; the figure is the median of the pair-by-pair wall-time ratios. The in-run share is
read from the flag runs' ``run.json``: QC's own seconds (``qc_s``, per block, plus
``qc_reference_s``, the sample tiles read in prepare) over the inference stages' seconds.

    python -m benchmarks.qc_cost --slide ../shared/data/wsi_aperio_cmu1_small_region/CMU-1-Small-Region.svs
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import report

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_SLIDE = SHARED_DATA / "wsi_aperio_cmu1_small_region" / "CMU-1-Small-Region.svs"
STAGES = ("read_s", "inference_s", "tissue_refine_s", "write_s", "qc_s")


def _segment(slide: Path, outdir: Path, mode: str, extra: list[str]) -> tuple[float, dict[str, Any]]:
    """Wall seconds of one whole ``segment`` command, and the slide's run.json timings."""
    command = [sys.executable, "-m", "wsi_espnet", "segment", str(slide), "-o", str(outdir)]
    command += ["--overwrite", "-q", "--qc", mode, *extra]
    t0 = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    run = json.loads(next(outdir.glob("*/run.json")).read_text())
    return wall, run["timings"]


def measure(slide: Path, repeats: int, extra: list[str], workdir: Path) -> dict[str, Any]:
    """Paired off/flag runs; medians of the wall times, their ratio and QC's in-run share."""
    for mode in ("off", "flag"):  # warm-up: page cache, imports, model weights
        _segment(slide, workdir / mode, mode, extra)
    walls: dict[str, list[float]] = {"off": [], "flag": []}
    shares, qc_seconds = [], []
    for _ in range(repeats):
        for mode in ("off", "flag"):
            wall, timings = _segment(slide, workdir / mode, mode, extra)
            walls[mode].append(wall)
            if mode == "flag":
                qc = timings.get("qc_s", 0.0) + timings.get("qc_reference_s", 0.0)
                inference = sum(timings.get(k, 0.0) for k in STAGES) + timings.get("qc_reference_s", 0.0)
                qc_seconds.append(qc)
                shares.append(qc / inference)
    ratios = [f / o for f, o in zip(walls["flag"], walls["off"], strict=True)]
    return {
        "slide": str(slide),
        "repeats": repeats,
        "extra_args": extra,
        "wall_off_s": walls["off"],
        "wall_flag_s": walls["flag"],
        "median_wall_off_s": statistics.median(walls["off"]),
        "median_wall_flag_s": statistics.median(walls["flag"]),
        "median_ratio_flag_over_off": statistics.median(ratios),
        "median_qc_s": statistics.median(qc_seconds),
        "median_qc_share_of_inference_stages": statistics.median(shares),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.qc_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    parser.add_argument("extra", nargs="*", help="more segment options after --, e.g. -- --formats ''")
    args = parser.parse_args(argv)
    if not args.slide.exists():
        parser.error(f"{args.slide}: no such slide")
    with tempfile.TemporaryDirectory(prefix="qc-cost-") as scratch:
        result = measure(args.slide, args.repeats, args.extra, Path(scratch))
    report(result, args.out)
    return result


if __name__ == "__main__":
    main()
