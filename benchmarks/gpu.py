"""``python -m benchmarks.gpu [--out FILE.json]``: model speed on CUDA and the end-to-end ratio.

Tiles/s of the model card's network for batch sizes 8-128 in fp32, bf16 autocast, bf16 +
channels_last and bf16 + channels_last + ``torch.compile``, then one pipeline run at the best
batch size against ``Predictor.predict`` at that batch size. A deadline keeps the whole script
under ~8 minutes; skipped measurements say so. Without CUDA it prints a skip and exits 0.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEADLINE_S = 7 * 60  # measurements start only while there is time left for them
BATCH_SIZES = (8, 16, 32, 64, 128)
COMPILE_BATCH_SIZES = (32, 128)  # torch.compile recompiles per shape; two sizes keep it short
SECONDS_PER_POINT = 2.0


def _tiles_per_s(step: Callable[[], None], batch: int) -> float:
    """Run ``step`` until ``SECONDS_PER_POINT`` pass (after two warm-ups); tiles per second."""
    import torch

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < SECONDS_PER_POINT:
        step()
        n += 1
    torch.cuda.synchronize()
    return n * batch / (time.perf_counter() - start)


def model_speeds(model: str, size: int, started: float) -> list[dict[str, Any]]:
    """Tiles/s per (variant, batch size) for ``size`` x ``size`` inputs."""
    import torch

    from wsi_espnet.models.cards import load_card

    card = load_card(model)
    base = card.build_model().cuda().eval()
    variants: dict[str, tuple[torch.nn.Module, bool, bool]] = {
        "fp32": (base, False, False),
        "bf16": (base, True, False),
        "bf16+channels_last": (base, True, True),
    }
    rows = []
    for name, (net, bf16, channels_last) in variants.items():
        for batch in BATCH_SIZES:
            rows.append(_point(net, name, batch, size, bf16, channels_last, started))
    compiled = torch.compile(base.to(memory_format=torch.channels_last))
    for batch in COMPILE_BATCH_SIZES:
        rows.append(_point(compiled, "bf16+channels_last+compile", batch, size, True, True, started))
    return rows


def _point(
    net: Any, name: str, batch: int, size: int, bf16: bool, channels_last: bool, started: float
) -> dict[str, Any]:
    import torch

    row: dict[str, Any] = {"variant": name, "batch_size": batch}
    if time.perf_counter() - started > DEADLINE_S:
        return {**row, "skipped": "deadline"}
    x = torch.randn(batch, 3, size, size, device="cuda")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            net(x)

    try:
        row["tiles_per_s"] = _tiles_per_s(step, batch)
    except torch.OutOfMemoryError:
        row["skipped"] = "out of memory"
    torch.cuda.empty_cache()
    return row


def end_to_end(model: str, batch_size: int, work: Path) -> dict[str, Any]:
    """The pipeline on a generated slide against ``Predictor.predict`` at the same batch size."""
    from benchmarks.common import run_variant, sample_slide

    slide = sample_slide(work, "gpu", 12288, 0.3, seed=1)
    warm = sample_slide(work, "warm", 1024, 0.5, seed=2)
    raw = run_variant(
        "efficiency",
        model=model,
        slide=slide,
        warm_slide=warm,
        outdir=work / "out-gpu",
        repeats=1,
        model_batches=max(4, 256 // batch_size),
        batch_size=batch_size,
        device="cuda",
    )
    row = raw["repeats"][0]
    return {
        "batch_size": batch_size,
        "model_only_tiles_per_s": row["model_only"]["tiles_per_s"],
        "pipeline_tiles_per_s": row["pipeline"]["tiles_per_s"],
        "ratio_pipeline": row["pipeline"]["tiles_per_s"] / row["model_only"]["tiles_per_s"],
        "ratio_with_exports": row["with_exports"]["tiles_per_s"] / row["model_only"]["tiles_per_s"],
        "raw": raw,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("benchmarks.gpu: skipped (CUDA is not available on this machine)")
        return {"skipped": "CUDA is not available"}
    from benchmarks.common import bench_model
    from benchmarks.run import machine
    from wsi_espnet.config import SegmentSettings

    started = time.perf_counter()
    settings = SegmentSettings()
    size = settings.tile + 2 * settings.halo
    with tempfile.TemporaryDirectory(prefix="wsi-espnet-gpu-") as tmp:
        model = bench_model(Path(tmp))
        speeds = model_speeds(model, size, started)
        for row in speeds:
            speed = row.get("tiles_per_s", row.get("skipped"))
            print(f"{row['variant']:>28} batch {row['batch_size']:>3}: {speed} tiles/s")
        # The pipeline's Predictor uses bf16 + channels_last (no compile): pick its best batch.
        ours = [r for r in speeds if r["variant"] == "bf16+channels_last" and "tiles_per_s" in r]
        best = max(ours, key=lambda r: r["tiles_per_s"])["batch_size"] if ours else 32
        e2e = end_to_end(model, best, Path(tmp))
    ratios = f"ratio {e2e['ratio_pipeline']:.3f} (with exports {e2e['ratio_with_exports']:.3f})"
    print(f"end-to-end at batch {best}: {ratios}")
    results = {
        "machine": machine() | {"gpu": torch.cuda.get_device_name()},
        "input_size": size,
        "model_speeds": speeds,
        "end_to_end": e2e,
        "seconds": time.perf_counter() - started,
    }
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
