"""Helpers shared by the benchmark sections: the model card, slides, peak-RSS subprocesses.

Each measured variant (and each whole ``wsi-espnet segment`` command) runs in its own Python
subprocess so that its peak resident memory is its own (imports, caches and allocator pools of
earlier variants do not leak into it).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import tifffile

from wsi_espnet.sample import write_sample_slide

REAL_SLIDE = (
    Path(__file__).resolve().parents[2] / "shared/data/wsi_aperio_cmu1_small_region/CMU-1-Small-Region.svs"
)
RESULT_PREFIX = "BENCHMARK-RESULT "
CMU_CROP = 2220  # CMU-1-Small-Region is 2220 x 2967 px: its top 2220² square is the mosaic's tile


@dataclass(frozen=True)
class Profile:
    """Sizes (level-0 px) and repeats of one benchmark run."""

    name: str
    efficiency_side: int
    warm_side: int
    repeats: int
    model_batches: int
    scale_side: int
    tissue_side: int
    seam_halos: tuple[int, ...]
    gigapixel: tuple[tuple[int, int], tuple[int, int]]  # (width, height) of the slide and its 1/4
    gigapixel_window: int  # side of the no-halo window that measures the network's own rate
    peer_side: int  # side of the CMU-1 mosaic for the MONAI peer (8880: 4 x 4 crops)
    seam_tile: int = 256
    gigapixel_repeats: int = 1  # whole commands per gigapixel slide (interleaved; medians used)
    tissue_fraction: float = 0.3
    settings: dict[str, Any] = field(default_factory=dict)  # overrides of SegmentSettings


@dataclass(frozen=True)
class Bench:
    """What every section gets: the model, a scratch folder, the profile, the slide cache."""

    model: str
    work: Path
    profile: Profile
    data: Path  # generated slides, kept between runs when ``--data`` names a folder


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


def cmu_mosaic(folder: Path, side: int) -> tuple[Path, str]:
    """A ``side``² pyramid tiled from CMU-1-Small-Region's top 2220² square, written at 0.5 µm/px.

    The real slide is 0.499 µm/px; writing 0.5 makes level 1 exactly 1.0 µm/px, so our reader
    and MONAI's OpenSlide reader see the same pixels without resampling. Without the real slide
    (no ``../shared/data``) a generated slide of the same size stands in; the second value says
    which one it is.
    """
    if not REAL_SLIDE.exists():
        return sample_slide(folder, f"peer-synthetic-{side}", side, 0.5, seed=5), "generator (no CMU-1 found)"
    path = folder / f"cmu1-mosaic-{side}.tif"
    if not path.exists():
        crop = tifffile.imread(REAL_SLIDE, key=0)[:CMU_CROP, :CMU_CROP, :3]
        repeats = -(-side // CMU_CROP)
        level = np.tile(crop, (repeats, repeats, 1))[:side, :side]
        _write_pyramid(path, level, mpp=0.5)
    return path, "CMU-1-Small-Region mosaic"


def _write_pyramid(path: Path, level: np.ndarray, mpp: float) -> None:
    """A generic-TIFF pyramid (JPEG tiles, levels halved by 2x2 means) that openslide opens."""
    tmp = path.with_name(f".{path.name}.partial")
    with tifffile.TiffWriter(tmp, bigtiff=level.nbytes > 2**31) as tif:
        down = 1
        while True:
            tif.write(
                level,
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 90},
                resolution=(1e4 / (mpp * down), 1e4 / (mpp * down)),
                resolutionunit="CENTIMETER",
                subfiletype=0 if down == 1 else 1,
                metadata=None,
            )
            if max(level.shape[:2]) < 1000:
                break
            h, w = (s - s % 2 for s in level.shape[:2])
            quads = level[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).astype(np.uint16)
            level = (quads.sum(axis=(1, 3)) + 2) // 4
            level = level.astype(np.uint8)
            down *= 2
    os.replace(tmp, path)


class _TreeRssSampler(threading.Thread):
    """Peak of the summed RSS of a process and all its descendants (Dask workers included),
    sampled every 50 ms: ``ru_maxrss`` alone would give the largest single process only. Also
    the CPU seconds (user + system) of every process of the tree, from each one's last sample:
    whether the cores were busy, and with what (a process that lives under 50 ms is missed)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.cpu: dict[int, float] = {}
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
                    with proc.oneshot():
                        total += proc.memory_info().rss
                        times = proc.cpu_times()
                    self.cpu[proc.pid] = times.user + times.system
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
    run = run_sampled(cmd, env)
    if run.returncode != 0:
        tail = "\n".join(run.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"benchmark variant {name} failed (exit {run.returncode}):\n{tail}")
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    result["peak_rss_mib"] = run.peak_rss_mib
    return result


@dataclass(frozen=True)
class SampledRun:
    """A finished subprocess: exit status, output, wall clock, the tree's sampled peak RSS and
    CPU seconds."""

    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    peak_rss_mib: float
    cpu_s: float


def run_sampled(cmd: list[str], env: dict[str, str] | None = None) -> SampledRun:
    """Run ``cmd`` while sampling the summed RSS of its process tree; wall clock from spawn to exit."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )
    sampler = _TreeRssSampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    sampler.done.set()
    sampler.join()
    peak, cpu = round(sampler.peak / 2**20, 1), round(sum(sampler.cpu.values()), 1)
    return SampledRun(proc.returncode, stdout, stderr, wall, peak, cpu)


def segment_command(slide: Path, outdir: Path, options: dict[str, Any]) -> dict[str, Any]:
    """``python -m wsi_espnet segment SLIDE -o OUTDIR --overwrite [options]`` in a fresh process.

    Returns wall clock, peak RSS and CPU seconds of the whole process tree (client, scheduler,
    workers, export processes), exports included, plus the slide's run.json. ``options`` map
    option names to values (``{"tile": 256}`` → ``--tile 256``; True → a bare flag; False →
    ``--no-<flag>``).
    """
    from wsi_espnet.outputs import SlideOutput

    cmd = [sys.executable, "-m", "wsi_espnet", "segment", str(slide), "-o", str(outdir), "--overwrite"]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif value is False:
            cmd.append(f"--no-{flag[2:]}")
        else:
            cmd += [flag, ",".join(value) if isinstance(value, list | tuple) else str(value)]
    run = run_sampled(cmd)
    if run.returncode != 0:
        tail = "\n".join(run.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {run.returncode}):\n{tail}")
    output = SlideOutput.for_slide(outdir, slide)
    return {
        "command": shlex.join(["python", *cmd[1:]]),
        "wall_s": run.wall_s,
        "peak_rss_mib": run.peak_rss_mib,
        "cpu_s": run.cpu_s,
        "run": output.read_run() or {},
        "output": str(output.root),
    }


def emit(result: dict[str, Any]) -> None:
    """Print a variant's result where :func:`run_variant` finds it, with the kernel's peak RSS."""
    import resource

    peak_kib = max(
        resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    result = {**result, "maxrss_mib": round(peak_kib / 1024, 1)}
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)


def report(result: dict[str, Any], out: Path | None) -> None:
    """Print a stand-alone benchmark's result as JSON, and write it to ``out`` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")
