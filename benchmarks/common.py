"""Helpers shared by the benchmark variants: the model card, sample slides, peak-RSS subprocesses.

Each measured variant runs in its own Python subprocess so that its peak resident memory is its
own (imports, caches and allocator pools of earlier variants do not leak into it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from wsi_espnet.sample import write_sample_slide

REAL_SLIDE = (
    Path(__file__).resolve().parents[2] / "shared/data/wsi_aperio_cmu1_small_region/CMU-1-Small-Region.svs"
)
RESULT_PREFIX = "BENCHMARK-RESULT "


def bench_model(workdir: Path) -> str:
    """The shipped card when its trained weights exist, else a seeded random card of the same
    architecture (speed does not depend on the weights' values). Returns a name or YAML path."""
    from wsi_espnet.models.cards import load_card, random_card

    shipped = load_card("breast-tissue-espnet")
    if shipped.weights_present:
        return shipped.name
    return str(random_card(shipped, workdir, "bench-random-espnet").path)


def sample_slide(folder: Path, name: str, side: int, tissue: float, seed: int = 0) -> Path:
    """A square synthetic slide at 0.5 µm/px (its 2x level is exactly the model's 1.0 µm/px)."""
    path = folder / f"{name}.tif"
    if not path.exists():
        write_sample_slide(path, side, side, mpp=0.5, tissue_fraction=tissue, seed=seed)
    return path


class _TreeRssSampler(threading.Thread):
    """Peak of the summed RSS of a process and all its descendants (Dask workers included),
    sampled every 50 ms: ``ru_maxrss`` alone would give the largest single process only."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.done.is_set():
            total = 0
            try:
                for proc in [root, *root.children(recursive=True)]:
                    total += proc.memory_info().rss
            except psutil.Error:
                pass
            self.peak = max(self.peak, total)
            time.sleep(0.05)


def run_variant(name: str, env: dict[str, str] | None = None, **params: Any) -> dict[str, Any]:
    """Run ``benchmarks.variants.<name>(**params)`` in a fresh subprocess; add its peak RSS (MiB).

    ``peak_rss_mib`` is the sampled peak of the whole process tree; ``maxrss_mib`` the kernel's
    exact peak of the largest single process (the variant's own or a reaped Dask worker's).
    """
    cmd = [sys.executable, "-m", "benchmarks.variants", name, json.dumps(params, default=str)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )
    sampler = _TreeRssSampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.done.set()
    sampler.join()
    if proc.returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"benchmark variant {name} failed (exit {proc.returncode}):\n{tail}")
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    result["peak_rss_mib"] = round(sampler.peak / 2**20, 1)
    return result


def emit(result: dict[str, Any]) -> None:
    """Print a variant's result where :func:`run_variant` finds it, with the kernel's peak RSS."""
    import resource

    peak_kib = max(
        resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    result = {**result, "maxrss_mib": round(peak_kib / 1024, 1)}
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)
