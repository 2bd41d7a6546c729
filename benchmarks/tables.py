"""The terminal table of a benchmark run: a few headline lines per section that was run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks import gigapixel


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _efficiency(e: dict[str, Any], _: dict[str, Any]) -> list[str]:
    f = {key: _fmt(value) for key, value in e.items()}
    return [
        f"[efficiency] tile {f['tile']} halo {f['halo']} batch {f['batch_size']}, {f['tiles']} tiles, "
        f"torch threads: worker {f['worker_torch_threads']}, model-only {f['model_torch_threads']}",
        f"  model-only {f['model_only_tiles_per_s']} tiles/s; pipeline {f['pipeline_tiles_per_s']} "
        f"tiles/s ({f['pipeline_output_mpx_per_s']} MPx/s); ratio {f['ratio_pipeline']}, "
        f"with exports {f['ratio_with_exports']}; halo compute x{f['halo_compute_amplification']}",
    ]


def _seam(seam: dict[str, Any], results: dict[str, Any]) -> list[str]:
    lines = [
        f"[seam] tile {seam['tile']} halo {row['halo']:>3}: agreement {row['agreement']:.5f} "
        f"(on tissue {_fmt(row['agreement_on_tissue'])}), compute x{row['compute_amplification']:.2f}"
        for row in seam["halos"]
    ]
    return [*lines, f"[seam] recommended halo (>= 99.9 %, least compute): {results['recommended_halo']}"]


def _peer(peer: dict[str, Any], _: dict[str, Any]) -> list[str]:
    ours = peer["ours"]
    lines = [
        f"[peer] {peer['slide_source']}, {peer['analysis_shape'][1]}x{peer['analysis_shape'][0]} px "
        f"at 1 µm/px; reference: one whole-image pass ({peer['reference']['wall_s']:.1f} s)",
        f"[peer] ours, whole command: {ours['output_mpx_per_s']:.3g} MPx/s, agreement "
        f"{ours['agreement']:.4f}, peak RSS {ours['peak_rss_mib']:.0f} MiB",
    ]
    for key, run in peer.items():
        if key.startswith("monai_") and isinstance(run, dict):
            lines.append(
                f"[peer] MONAI {key[6:]}: {run['output_mpx_per_s']:.3g} MPx/s, agreement "
                f"{run['agreement']:.4f}, peak RSS {run['peak_rss_mib']:.0f} MiB; "
                f"ours x{run['ours_speedup']:.2f} (x{run['ours_speedup_whole_process']:.2f} against "
                f"its whole process, {run['process_s']:.1f} s)"
            )
    return lines


def _scale(s: dict[str, Any], _: dict[str, Any]) -> list[str]:
    return [
        f"[scale] x4 area: peak RSS x{_fmt(s['peak_rss_ratio'])} ({s['x1']['peak_rss_mib']} -> "
        f"{s['x4']['peak_rss_mib']} MiB), tiles x{_fmt(s['tile_ratio'])}, wall x{_fmt(s['wall_ratio'])}, "
        f"s/tile x{_fmt(s['seconds_per_tile_ratio'])}"
    ]


def _tissue(t: dict[str, Any], _: dict[str, Any]) -> list[str]:
    return [
        f"[tissue] 10 % vs 60 %: {_fmt(t['t10']['wall_s'])} s / {t['t10']['tiles']} tiles vs "
        f"{_fmt(t['t60']['wall_s'])} s / {t['t60']['tiles']} tiles (wall x{_fmt(t['wall_ratio'])})"
    ]


PRINTERS: dict[str, Callable[[dict[str, Any], dict[str, Any]], list[str]]] = {
    "efficiency": _efficiency,
    "seam": _seam,
    "peer": _peer,
    "scale": _scale,
    "tissue_skipping": _tissue,
    "gigapixel": lambda g, _: gigapixel.lines(g),
}


def table(results: dict[str, Any]) -> str:
    """The headline numbers of every section in ``results``, one per line, for the terminal."""
    lines = []
    for name, printer in PRINTERS.items():
        section = results.get(name)
        if section is None:
            continue
        if "skipped" in section and name != "peer":
            lines.append(f"[{name}] skipped: {section['skipped']}")
            continue
        lines += printer(section, results)
        if "skipped" in section:
            lines.append(f"[{name}] skipped: {section['skipped']}")
    return "\n".join(lines)
