"""``python -m benchmarks.run [--quick | --smoke] [--out FILE.json]``: measure wsi-espnet, print a table.

Sections (see README.md): efficiency against the bare model, seam agreement per halo, MONAI as
a peer, memory and time at 1x and 4x slide area, and tissue skipping. Slides are generated
with :func:`wsi_espnet.sample.write_sample_slide`, so the run needs no data but the package.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import REAL_SLIDE, bench_model, run_variant, sample_slide
from wsi_espnet.config import SegmentSettings
from wsi_espnet.runstate import versions


@dataclass(frozen=True)
class Profile:
    """Sizes (level-0 px of square 0.5 µm/px slides) and repeats of one benchmark run."""

    name: str
    efficiency_side: int
    warm_side: int
    repeats: int
    model_batches: int
    scale_side: int
    tissue_side: int
    seam_halos: tuple[int, ...]
    seam_tile: int = 256
    tissue_fraction: float = 0.3
    settings: dict[str, Any] = field(default_factory=dict)  # overrides of SegmentSettings


PROFILES = {
    # 8192² px at 30 % tissue: ~50 tiles, so per-slide costs (pyramid, statistics) are amortised
    # as on a real biopsy slide rather than dominating a 15-tile toy.
    "full": Profile("full", 8192, 1024, 3, 4, 4096, 4096, (32, 64, 96, 128, 192, 224, 256)),
    "quick": Profile("quick", 2048, 1024, 1, 1, 1536, 2048, (32, 96)),
    # In-process workers (no worker process to start) and small tiles: checks the harness in CI.
    "smoke": Profile(
        "smoke", 1024, 512, 1, 1, 768, 1024, (), settings={"tile": 256, "halo": 32, "workers": 0}
    ),
}


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _efficiency(model: str, work: Path, p: Profile, env: dict[str, str] | None = None) -> dict[str, Any]:
    slide = sample_slide(work, "efficiency", p.efficiency_side, p.tissue_fraction, seed=1)
    warm = sample_slide(work, "warm", p.warm_side, 0.5, seed=2)
    raw = run_variant(
        "efficiency",
        env=env,
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


def _seam(model: str, work: Path, p: Profile) -> dict[str, Any]:
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


def _peer(model: str, work: Path, p: Profile) -> dict[str, Any]:
    """Ours and MONAI on the same slide, weights, tile, overlap, tissue rule and torch threads."""
    slide = sample_slide(work, "efficiency", p.efficiency_side, p.tissue_fraction, seed=1)
    settings = SegmentSettings(**p.settings)
    common = {"model": model, "slide": slide, **p.settings}
    ours = run_variant("segment_once", outdir=work / "out-peer", formats=[], **common)
    ours_all = run_variant(
        "segment_once", outdir=work / "out-peer-all", formats=[], tissue_detection=False, **common
    )
    result: dict[str, Any] = {"ours_tissue": ours, "ours_all_tiles": ours_all}
    if importlib.util.find_spec("monai") is None:
        result["skipped"] = "monai is not installed (pip install monai --no-deps)"
        return result
    import monai

    store = lambda out: str(work / out / "efficiency" / "efficiency.ome.zarr")  # noqa: E731
    geometry = {"tile": settings.tile, "halo": settings.halo, "batch_size": settings.batch_size}
    # MONAI runs in one process: give torch what our worker has (Dask pins it to one thread).
    threads = ours.get("worker_torch_threads", 1)
    patch = run_variant(
        "monai_patch",
        model=model,
        slide=slide,
        outdir=work / "out-monai",
        threads=threads,
        ours_store=store("out-peer"),
        **geometry,
    )
    window = run_variant(
        "monai_sliding_window",
        model=model,
        slide=slide,
        threads=threads,
        ours_store=store("out-peer-all"),
        **geometry,
    )
    return {
        **result,
        "monai_version": monai.__version__,
        "torch_threads": threads,
        "monai_patch_inferer": patch,
        "monai_sliding_window": window,
        "wall_ratio_patch_inferer": patch["wall_s"] / ours["wall_s"],
        "rss_ratio_patch_inferer": patch["peak_rss_mib"] / ours["peak_rss_mib"],
        "wall_ratio_sliding_window": window["wall_s"] / ours_all["wall_s"],
        "rss_ratio_sliding_window": window["peak_rss_mib"] / ours_all["peak_rss_mib"],
    }


def _pair(
    model: str, work: Path, p: Profile, name: str, slides: list[tuple[str, int, float]]
) -> dict[str, Any]:
    runs = {}
    for label, side, tissue in slides:
        slide = sample_slide(work, f"{name}-{label}", side, tissue, seed=4)
        runs[label] = run_variant(
            "segment_once", model=model, slide=slide, outdir=work / f"out-{name}-{label}", **p.settings
        )
    return runs


def _scale(model: str, work: Path, p: Profile) -> dict[str, Any]:
    side = p.scale_side
    runs = _pair(
        model, work, p, "scale", [("x1", side, p.tissue_fraction), ("x4", 2 * side, p.tissue_fraction)]
    )
    x1, x4 = runs["x1"], runs["x4"]
    return {
        **runs,
        "peak_rss_ratio": x4["peak_rss_mib"] / x1["peak_rss_mib"],
        "tile_ratio": x4["tiles"] / x1["tiles"],
        "wall_ratio": x4["wall_s"] / x1["wall_s"],
        "seconds_per_tile_ratio": (x4["wall_s"] / x4["tiles"]) / (x1["wall_s"] / x1["tiles"]),
    }


def _tissue(model: str, work: Path, p: Profile) -> dict[str, Any]:
    side = p.tissue_side
    runs = _pair(model, work, p, "tissue", [("t10", side, 0.1), ("t60", side, 0.6)])
    return {
        **runs,
        "tile_ratio": runs["t60"]["tiles"] / runs["t10"]["tiles"],
        "wall_ratio": runs["t60"]["wall_s"] / runs["t10"]["wall_s"],
    }


SECTIONS: dict[str, Callable[[str, Path, Profile], dict[str, Any]]] = {
    "efficiency": _efficiency,
    "seam": _seam,
    "peer": _peer,
    "scale": _scale,
    "tissue_skipping": _tissue,
}


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def table(results: dict[str, Any]) -> str:
    """The headline numbers, one per line, for the terminal."""
    lines = []
    for title in ("efficiency",):
        e = results[title]
        if "skipped" in e:
            lines.append(f"[{title}] skipped: {e['skipped']}")
            continue
        f = {key: _fmt(value) for key, value in e.items()}
        lines += [
            f"[{title}] tile {f['tile']} halo {f['halo']} batch {f['batch_size']}, {f['tiles']} tiles, "
            f"torch threads: worker {f['worker_torch_threads']}, model-only {f['model_torch_threads']}",
            f"  model-only {f['model_only_tiles_per_s']} tiles/s; pipeline {f['pipeline_tiles_per_s']} "
            f"tiles/s ({f['pipeline_output_mpx_per_s']} MPx/s); ratio {f['ratio_pipeline']}, "
            f"with exports {f['ratio_with_exports']}; halo compute x{f['halo_compute_amplification']}",
        ]
    seam = results["seam"]
    if "skipped" in seam:
        lines.append(f"[seam] skipped: {seam['skipped']}")
    else:
        for row in seam["halos"]:
            lines.append(
                f"[seam] tile {seam['tile']} halo {row['halo']:>3}: agreement {row['agreement']:.5f} "
                f"(on tissue {_fmt(row['agreement_on_tissue'])}), compute x{row['compute_amplification']:.2f}"
            )
        lines.append(f"[seam] recommended halo (>= 99.9 %, least compute): {results['recommended_halo']}")
    peer = results["peer"]
    if "skipped" in peer:
        lines.append(f"[peer] skipped: {peer['skipped']}")
    else:
        for key, ours in (("patch_inferer", "ours_tissue"), ("sliding_window", "ours_all_tiles")):
            m = peer[f"monai_{key}"]
            agree = m.get("agreement_on_tissue", m.get("agreement"))
            lines.append(
                f"[peer] MONAI {key}: {_fmt(m['wall_s'])} s vs ours {_fmt(peer[ours]['wall_s'])} s "
                f"(x{_fmt(peer[f'wall_ratio_{key}'])}); peak RSS {m['peak_rss_mib']} vs "
                f"{peer[ours]['peak_rss_mib']} MiB (x{_fmt(peer[f'rss_ratio_{key}'])}); "
                f"agreement {_fmt(agree)}"
            )
    s = results["scale"]
    lines.append(
        f"[scale] x4 area: peak RSS x{_fmt(s['peak_rss_ratio'])} ({s['x1']['peak_rss_mib']} -> "
        f"{s['x4']['peak_rss_mib']} MiB), tiles x{_fmt(s['tile_ratio'])}, wall x{_fmt(s['wall_ratio'])}, "
        f"s/tile x{_fmt(s['seconds_per_tile_ratio'])}"
    )
    t = results["tissue_skipping"]
    lines.append(
        f"[tissue] 10 % vs 60 %: {_fmt(t['t10']['wall_s'])} s / {t['t10']['tiles']} tiles vs "
        f"{_fmt(t['t60']['wall_s'])} s / {t['t60']['tiles']} tiles (wall x{_fmt(t['wall_ratio'])})"
    )
    return "\n".join(lines)


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
    size.add_argument("--quick", action="store_true", help="small slides, one repeat (~3 min on 2 cores)")
    size.add_argument("--smoke", action="store_true", help="tiny slides and tiles: checks the harness (CI)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--workdir", type=Path, help="keep slides and outputs here (default: a temp dir)")
    parser.add_argument(
        "--sections", help=f"comma-separated subset of: {', '.join(SECTIONS)} (default: all)", default=""
    )
    args = parser.parse_args(argv)
    profile = PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"]
    with tempfile.TemporaryDirectory(prefix="wsi-espnet-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = bench_model(work)
        results: dict[str, Any] = {"machine": machine(), "profile": asdict(profile), "model": model}
        chosen = [name.strip() for name in args.sections.split(",") if name.strip()] or list(SECTIONS)
        unknown = set(chosen) - set(SECTIONS)
        if unknown:
            parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
        for name in chosen:
            section = SECTIONS[name]
            print(f"... {name}", file=sys.stderr, flush=True)
            results[name] = section(model, work, profile)
        results["recommended_halo"] = _recommend_halo(results.get("seam", {}))
    if set(chosen) == set(SECTIONS):
        print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
