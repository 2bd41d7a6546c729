"""``python -m benchmarks.run [--quick | --smoke] [--out FILE.json]``: measure wsi-espnet, print a table.

Sections (see README.md): efficiency against the bare model, seam agreement per halo, MONAI as
a peer, memory and time at 1x and 4x slide area, tissue skipping, and whole ``segment`` commands
on a synthetic 40x slide (``gigapixel``). Slides are generated with
:func:`wsi_espnet.sample.write_sample_slide` (the peer and seam sections use CMU-1-Small-Region
from ``../shared/data`` when it is there), so the run needs no data but the package.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import gigapixel
from benchmarks.common import (
    REAL_SLIDE,
    Bench,
    Profile,
    bench_model,
    cmu_mosaic,
    run_variant,
    sample_slide,
    segment_command,
)
from benchmarks.tables import table
from wsi_espnet.cluster import glibc_tunables
from wsi_espnet.config import SegmentSettings
from wsi_espnet.outputs import SlideOutput
from wsi_espnet.runstate import versions
from wsi_espnet.store import SlideStore

PROFILES = {
    # 8192² px at 30 % tissue: ~50 tiles, so per-slide costs (pyramid, statistics) are amortised
    # as on a real biopsy slide rather than dominating a 15-tile toy. The gigapixel slides are
    # issue 10's 40x biopsy (100,000 x 40,000 px) and its quarter; the peer runs on the 8880²
    # CMU-1 mosaic (4 x 4 crops of 2220²).
    "full": Profile(
        "full",
        *(8192, 1024, 3, 4, 4096, 4096, (32, 64, 96, 128, 192, 224, 256)),
        gigapixel=((100_000, 40_000), (50_000, 20_000)),
        gigapixel_window=2048,
        peer_side=8880,
        # Peak RSS moves by 300-400 MiB between runs of one command (which of the worker's two
        # infer tasks holds its block while the other's forward pass peaks): a ratio of single
        # runs read anywhere from 0.94 to 1.16 on the same commit.
        gigapixel_repeats=2,
    ),
    "quick": Profile(
        "quick",
        *(2048, 1024, 1, 1, 1536, 2048, (32, 96)),
        gigapixel=((20_000, 8_000), (10_000, 4_000)),
        gigapixel_window=2048,
        peer_side=4440,
    ),
    # In-process workers (no worker process to start) and small tiles: checks the harness in CI.
    "smoke": Profile(
        "smoke",
        *(1024, 512, 1, 1, 768, 1024, ()),
        gigapixel=((4096, 2048), (2048, 1024)),
        gigapixel_window=512,
        peer_side=2048,  # the analysis image must hold one 1024² MONAI patch
        settings={"tile": 256, "halo": 32, "workers": 0},
    ),
}


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _efficiency(b: Bench) -> dict[str, Any]:
    model, work, p = b.model, b.work, b.profile
    slide = sample_slide(work, "efficiency", p.efficiency_side, p.tissue_fraction, seed=1)
    warm = sample_slide(work, "warm", p.warm_side, 0.5, seed=2)
    raw = run_variant(
        "efficiency",
        model=model,
        slide=slide,
        warm_slide=warm,
        outdir=work / "out-efficiency",
        repeats=p.repeats,
        model_batches=p.model_batches,
        **p.settings,
    )
    rows = raw["repeats"]
    settings = SegmentSettings(**p.settings)
    return {
        "tile": settings.tile,
        "halo": settings.halo,
        "batch_size": settings.batch_size,
        "halo_compute_amplification": (settings.tile + 2 * settings.halo) ** 2 / settings.tile**2,
        "worker_torch_threads": raw["worker_torch_threads"],
        "model_torch_threads": raw["client_torch_threads"],
        "tiles": rows[0]["pipeline"]["tiles"],
        "model_only_tiles_per_s": _median([r["model_only"]["tiles_per_s"] for r in rows]),
        "pipeline_tiles_per_s": _median([r["pipeline"]["tiles_per_s"] for r in rows]),
        "with_exports_tiles_per_s": _median([r["with_exports"]["tiles_per_s"] for r in rows]),
        "pipeline_output_mpx_per_s": _median([r["pipeline"]["output_mpx_per_s"] for r in rows]),
        "with_exports_output_mpx_per_s": _median([r["with_exports"]["output_mpx_per_s"] for r in rows]),
        "ratio_pipeline": _median(
            [r["pipeline"]["tiles_per_s"] / r["model_only"]["tiles_per_s"] for r in rows]
        ),
        "ratio_with_exports": _median(
            [r["with_exports"]["tiles_per_s"] / r["model_only"]["tiles_per_s"] for r in rows]
        ),
        "raw": raw,
    }


def _seam(b: Bench) -> dict[str, Any]:
    model, work, p = b.model, b.work, b.profile
    if p.name == "smoke":
        return {"skipped": "not in --smoke"}
    if not REAL_SLIDE.exists():
        return {"skipped": f"real slide not found at {REAL_SLIDE}"}
    return run_variant(
        "seam",
        model=model,
        slide=REAL_SLIDE,
        outdir=work / "out-seam",
        tile=p.seam_tile,
        halos=list(p.seam_halos),
    )


def _recommend_halo(seam: dict[str, Any], target: float = 0.999) -> int | None:
    """The smallest halo measured whose agreement reaches ``target`` (None if none does)."""
    good = [row["halo"] for row in seam.get("halos", []) if row["agreement"] >= target]
    return min(good) if good else None


# MONAI's settings in issue 10's targets table: (name, variant, parameters).
MONAI_SETTINGS = (
    (
        "sliding_window_512_0.25_gaussian",
        "monai_sliding_window",
        {"roi": 512, "overlap": 0.25, "mode": "gaussian"},
    ),
    ("patch_inferer_1024_0.5_avg", "monai_patch", {"patch": 1024, "overlap": 0.5}),
    ("patch_inferer_512_0.25_avg", "monai_patch", {"patch": 512, "overlap": 0.25}),
)


def _peer(b: Bench) -> dict[str, Any]:
    """Ours (the whole command) and MONAI's three settings, each over the whole slide at 1 µm/px.

    Every run is scored against one forward pass over the whole image with a white margin of
    our halo (256 px): the labels a seamless method must reproduce.
    """
    slide, source = cmu_mosaic(b.data, b.profile.peer_side)
    settings = SegmentSettings(**b.profile.settings)
    options = {"model": b.model, "tissue_detection": False, "formats": "", **b.profile.settings}
    ours = segment_command(slide, b.work / "out-peer", options)
    reference = b.work / "peer-reference.npy"
    margin = SegmentSettings().halo  # the default halo's worth of white around the image
    ref = run_variant(
        "whole_reference", model=b.model, slide=slide, margin=margin, threads=settings.threads, out=reference
    )
    labels = SlideStore.open(SlideOutput.for_slide(b.work / "out-peer", slide).store).labels(0)[:]
    result: dict[str, Any] = {
        "slide": str(slide),
        "slide_source": source,
        "analysis_shape": list(labels.shape),
        "reference": ref,
        "ours": {
            "command": ours["command"],
            "wall_s": ours["wall_s"],
            "peak_rss_mib": ours["peak_rss_mib"],
            "output_mpx_per_s": labels.size / ours["wall_s"] / 1e6,
            "agreement": float(np.mean(np.load(reference) == labels)),
            "timings_s": ours["run"].get("timings", {}),
        },
    }
    if importlib.util.find_spec("monai") is None:
        result["skipped"] = "monai is not installed (pip install monai --no-deps)"
        return result
    import monai

    result["monai_version"] = monai.__version__
    ours_rate = result["ours"]["output_mpx_per_s"]
    for name, variant, params in MONAI_SETTINGS:
        result[f"monai_{name}"] = _monai(b, (slide, reference), variant, params, ours_rate)
    # MONAI's fastest setting once more, in the allocator set-up of our workers: how much of
    # the gap is that set-up rather than the tiling.
    name, variant, params = MONAI_SETTINGS[0]
    tuned = {"GLIBC_TUNABLES": glibc_tunables()}
    result[f"monai_{name}_hugetlb"] = _monai(b, (slide, reference), variant, params, ours_rate, tuned)
    return result


def _monai(
    b: Bench,
    inputs: tuple[Path, Path],
    variant: str,
    params: dict[str, Any],
    ours_rate: float,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One MONAI setting over the whole slide (``inputs``: slide, reference labels), scored."""
    settings = SegmentSettings(**b.profile.settings)
    slide, reference = inputs
    run = run_variant(
        variant,
        env,
        model=b.model,
        slide=slide,
        batch_size=settings.batch_size,
        threads=settings.threads,
        reference=reference,
        **params,
    )
    speedups = {
        "ours_speedup": ours_rate / run["output_mpx_per_s"],
        "ours_speedup_whole_process": ours_rate / run["process_output_mpx_per_s"],
    }
    return {**params, **run, **speedups}


def _pair(b: Bench, name: str, slides: list[tuple[str, int, float]]) -> dict[str, Any]:
    runs = {}
    for label, side, tissue in slides:
        slide = sample_slide(b.work, f"{name}-{label}", side, tissue, seed=4)
        runs[label] = run_variant(
            "segment_once",
            model=b.model,
            slide=slide,
            outdir=b.work / f"out-{name}-{label}",
            **b.profile.settings,
        )
    return runs


def _scale(b: Bench) -> dict[str, Any]:
    side, fraction = b.profile.scale_side, b.profile.tissue_fraction
    runs = _pair(b, "scale", [("x1", side, fraction), ("x4", 2 * side, fraction)])
    x1, x4 = runs["x1"], runs["x4"]
    return {
        **runs,
        "peak_rss_ratio": x4["peak_rss_mib"] / x1["peak_rss_mib"],
        "tile_ratio": x4["tiles"] / x1["tiles"],
        "wall_ratio": x4["wall_s"] / x1["wall_s"],
        "seconds_per_tile_ratio": (x4["wall_s"] / x4["tiles"]) / (x1["wall_s"] / x1["tiles"]),
    }


def _tissue(b: Bench) -> dict[str, Any]:
    side = b.profile.tissue_side
    runs = _pair(b, "tissue", [("t10", side, 0.1), ("t60", side, 0.6)])
    return {
        **runs,
        "tile_ratio": runs["t60"]["tiles"] / runs["t10"]["tiles"],
        "wall_ratio": runs["t60"]["wall_s"] / runs["t10"]["wall_s"],
    }


SECTIONS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "efficiency": _efficiency,
    "seam": _seam,
    "peer": _peer,
    "scale": _scale,
    "tissue_skipping": _tissue,
    "gigapixel": gigapixel.gigapixel,
}


def machine() -> dict[str, Any]:
    """Where and with what the numbers were measured."""
    found = versions()
    if importlib.util.find_spec("monai") is not None:
        from importlib import metadata

        found["monai"] = metadata.version("monai")
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.run", *sys.argv[1:]]),
        "versions": found,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="small slides, one repeat (~10 min on 2 idle cores)"
    )
    size.add_argument("--smoke", action="store_true", help="tiny slides and tiles: checks the harness (CI)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--workdir", type=Path, help="keep slides and outputs here (default: a temp dir)")
    parser.add_argument(
        "--data", type=Path, help="cache generated slides here, reused by later runs (default: in --workdir)"
    )
    parser.add_argument(
        "--sections", help=f"comma-separated subset of: {', '.join(SECTIONS)} (default: all)", default=""
    )
    args = parser.parse_args(argv)
    profile = PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"]
    with tempfile.TemporaryDirectory(prefix="wsi-espnet-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        bench = Bench(bench_model(work), work, profile, args.data or work / "data")
        bench.data.mkdir(parents=True, exist_ok=True)
        results: dict[str, Any] = {"machine": machine(), "profile": asdict(profile), "model": bench.model}
        chosen = [name.strip() for name in args.sections.split(",") if name.strip()] or list(SECTIONS)
        unknown = set(chosen) - set(SECTIONS)
        if unknown:
            parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
        for name in chosen:
            print(f"... {name}", file=sys.stderr, flush=True)
            results[name] = SECTIONS[name](bench)
        results["recommended_halo"] = _recommend_halo(results.get("seam", {}))
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
