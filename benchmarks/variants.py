"""One measured variant per function, each run in its own subprocess by :func:`common.run_variant`.

``python -m benchmarks.variants NAME '{"param": ...}'`` prints one ``BENCHMARK-RESULT {json}``
line. Wall clocks start when the slide is opened and stop when its store is complete; cluster
start-up is reported apart because a cohort pays it once.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import emit
from wsi_espnet.cluster import open_client
from wsi_espnet.config import SegmentSettings, load_settings
from wsi_espnet.outputs import SlideOutput
from wsi_espnet.pipeline import segment_slides
from wsi_espnet.runstate import SlideJob


def _worker_torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _segment(client: Any, slide: Path, outdir: Path, settings: SegmentSettings) -> dict[str, Any]:
    """Segment one slide on ``client``; wall clock from opening the slide to a complete store."""
    start = time.perf_counter()
    (result,) = segment_slides([SlideJob(Path(slide))], Path(outdir), settings, client)
    wall = time.perf_counter() - start
    if result.status != "done":
        raise RuntimeError(f"{slide}: {result.status}: {result.error}")
    run = SlideOutput.for_slide(Path(outdir), Path(slide)).read_run() or {}
    tiles = result.tiles_processed
    return {
        "wall_s": wall,
        "tiles": tiles,
        "tiles_per_s": tiles / wall,
        "output_mpx_per_s": tiles * settings.tile**2 / wall / 1e6,
        "stage_timings_s": run.get("timings", {}),
        "tissue_area_mm2": result.tissue_area_mm2,
    }


def model_only(
    model: str, tile: int, halo: int, batch_size: int, n_batches: int, device: str = "cpu"
) -> dict[str, Any]:
    """Random uint8 windows through the same ``Predictor.predict`` (crop included), after warm-up."""
    from wsi_espnet.models.cards import load_card
    from wsi_espnet.predict import get_predictor

    predictor = get_predictor(load_card(model), device)
    size = tile + 2 * halo
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    predictor.predict(tiles, crop=halo)  # warm-up: allocator pools, oneDNN/cuDNN kernels
    start = time.perf_counter()
    for _ in range(n_batches):
        predictor.predict(tiles, crop=halo)  # returns numpy: synchronises with the device
    wall = time.perf_counter() - start
    return {"tiles": n_batches * batch_size, "wall_s": wall, "tiles_per_s": n_batches * batch_size / wall}


def efficiency(
    model: str, slide: str, warm_slide: str, outdir: str, repeats: int, model_batches: int, **overrides: Any
) -> dict[str, Any]:
    """Interleave model-only, pipeline-only (no exports) and full runs on one warm cluster."""
    import torch

    settings = load_settings(None, model=model, quiet=True, overwrite=True, formats=(), **overrides)
    with_exports = load_settings(None, model=model, quiet=True, overwrite=True, **overrides)
    out = Path(outdir)
    t0 = time.perf_counter()
    with open_client(settings) as client:
        startup = time.perf_counter() - t0
        cold = _segment(client, Path(warm_slide), out / "warm", settings)  # loads the model on the worker
        worker_threads = sorted(set(client.run(_worker_torch_threads).values()))  # as the tasks set them
        # The bare model gets the torch threads the worker's model has: like against like.
        torch.set_num_threads(max(worker_threads))
        rows = []
        for r in range(repeats):
            ref = model_only(
                model, settings.tile, settings.halo, settings.batch_size, model_batches, settings.device
            )
            pure = _segment(client, Path(slide), out / f"pure-{r}", settings)
            full = _segment(client, Path(slide), out / f"full-{r}", with_exports)
            rows.append({"model_only": ref, "pipeline": pure, "with_exports": full})
    return {
        "cluster_startup_s": startup,
        "cold_first_slide": cold,
        "worker_torch_threads": worker_threads,
        "client_torch_threads": torch.get_num_threads(),
        "repeats": rows,
    }


def segment_once(model: str, slide: str, outdir: str, **overrides: Any) -> dict[str, Any]:
    """A fresh cluster segments one slide (used for scale, tissue skipping and the MONAI peer)."""
    settings = load_settings(None, model=model, quiet=True, overwrite=True, **overrides)
    t0 = time.perf_counter()
    with open_client(settings) as client:
        startup = time.perf_counter() - t0
        result = _segment(client, Path(slide), Path(outdir), settings)
        threads = max(client.run(_worker_torch_threads).values())
    return {**result, "cluster_startup_s": startup, "worker_torch_threads": threads}


def seam(model: str, slide: str, outdir: str, tile: int, halos: list[int]) -> dict[str, Any]:
    """Agreement of ``tile``-sized chunks with each halo against one window covering the slide.

    The reference window gets the largest halo of white margin too: without it the slide's
    top and left edges would meet the network's zero padding instead of white context, and
    the reference itself would be wrong there. Reported over the whole image and over
    detected tissue (where a real run keeps labels).
    """
    from wsi_espnet.models.cards import load_card
    from wsi_espnet.slide import Slide
    from wsi_espnet.store import SlideStore
    from wsi_espnet.tissue import TissueSettings, detect_tissue

    base = load_settings(
        None, model=model, quiet=True, overwrite=True, formats=(), tissue_detection=False, workers=0
    )
    mpp = load_card(model).mpp
    with Slide.open(slide) as opened:
        shape = opened.analysis_shape(mpp)
        tissue = detect_tissue(opened, TissueSettings()).region(0, 0, shape[0], shape[1], mpp)
    out = Path(outdir)

    def labels(run: str, **kw: Any) -> tuple[np.ndarray, float]:
        result = _segment(client, Path(slide), out / run, replace(base, **kw).validate())
        store = SlideOutput.for_slide(out / run, Path(slide)).store
        return SlideStore.open(store).labels(0)[:], result["wall_s"]

    whole = 8 * math.ceil(max(shape) / 8)
    with open_client(base) as client:
        reference, ref_wall = labels("whole", tile=whole, halo=max(halos))
        rows = []
        for halo in halos:
            tiled, wall = labels(f"halo-{halo}", tile=tile, halo=halo)
            same = tiled == reference
            rows.append(
                {
                    "halo": halo,
                    "agreement": float(same.mean()),
                    "agreement_on_tissue": float(same[tissue].mean()) if tissue.any() else None,
                    "compute_amplification": (tile + 2 * halo) ** 2 / tile**2,
                    "wall_s": wall,
                }
            )
    return {
        "tile": tile,
        "shape": list(shape),
        "whole_window": whole,
        "whole_wall_s": ref_wall,
        "halos": rows,
    }


def _load_network(model: str, threads: int) -> tuple[Any, Any]:
    import torch

    from wsi_espnet.models.cards import load_card

    torch.set_num_threads(threads)
    card = load_card(model)
    return card, card.build_model().eval()


def _ours(store: str) -> np.ndarray:
    from wsi_espnet.store import SlideStore

    return SlideStore.open(store).labels(0)[:]


def monai_patch(
    model: str, slide: str, outdir: str, tile: int, halo: int, batch_size: int, threads: int, ours_store: str
) -> dict[str, Any]:
    """MONAI PatchInferer + WSISlidingWindowSplitter (OpenSlide) + ZarrAvgMerger, our tissue rule.

    The slide's level 1 is exactly the analysis resolution, so MONAI reads it without resampling.
    MONAI's splitter misplaces patches when given a negative offset (it reads at the padded
    location, then reports the unpadded one), so its grid starts at 0: windows of the same size
    and stride as ours, shifted by ``halo``. A window is kept when its core touches tissue —
    the same rule as :meth:`TileGrid.select` — judged from our tissue mask.
    """
    import torch
    from monai.inferers import PatchInferer, WSISlidingWindowSplitter, ZarrAvgMerger

    from wsi_espnet.slide import Slide
    from wsi_espnet.tissue import TissueSettings, detect_tissue

    card, network = _load_network(model, threads)
    start = time.perf_counter()
    with Slide.open(slide) as opened:
        tissue = detect_tissue(opened, TissueSettings())
        shape = opened.analysis_shape(card.mpp)
        level = opened.best_level(card.mpp)
    kept = []

    def touches_tissue(_patch: Any, location: Any) -> bool:
        y, x = (int(v) + halo for v in location)
        h, w = min(tile, shape[0] - y), min(tile, shape[1] - x)
        keep = h > 0 and w > 0 and bool(tissue.region(y, x, h, w, card.mpp).any())
        if keep:
            kept.append((y, x))
        return keep

    def preprocess(patches: torch.Tensor) -> torch.Tensor:
        return card.normalisation.apply(torch.as_tensor(patches).permute(0, 2, 3, 1))

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    inferer = PatchInferer(
        splitter=WSISlidingWindowSplitter(
            patch_size=tile + 2 * halo,
            overlap=2 * halo,
            filter_fn=touches_tissue,
            reader="OpenSlide",
            level=level,
        ),
        merger_cls=ZarrAvgMerger,
        batch_size=batch_size,
        preprocessing=preprocess,
        postprocessing=lambda logits: torch.softmax(logits, 1),
        store=str(out / "merged.zarr"),
        value_store=str(out / "values.zarr"),
        count_store=str(out / "counts.zarr"),
    )
    with torch.inference_mode():
        merged = inferer(str(slide), network)
    labels = np.zeros(shape, np.uint8)
    step = 512  # argmax by row bands: the merged float array may not fit in memory
    for y in range(0, shape[0], step):
        labels[y : y + step] = np.nan_to_num(np.asarray(merged[0, :, y : y + step, : shape[1]])).argmax(0)
    wall = time.perf_counter() - start
    covered = np.zeros(shape, bool)
    for y, x in kept:
        covered[y : y + tile, x : x + tile] = True
    mask = covered & tissue.region(0, 0, shape[0], shape[1], card.mpp)
    ours = _ours(ours_store)
    return {
        "wall_s": wall,
        "tiles": len(kept),
        "tiles_per_s": len(kept) / wall,
        "agreement_on_tissue": float(np.mean(ours[mask] == labels[mask])) if mask.any() else None,
    }


def monai_sliding_window(
    model: str, slide: str, tile: int, halo: int, batch_size: int, threads: int, ours_store: str
) -> dict[str, Any]:
    """MONAI's in-RAM ``sliding_window_inference`` on the whole level (it must fit in memory)."""
    import torch
    from monai.inferers import sliding_window_inference

    from wsi_espnet.slide import Slide

    card, network = _load_network(model, threads)
    start = time.perf_counter()
    with Slide.open(slide) as opened:
        shape = opened.analysis_shape(card.mpp)
        image = opened.read_region(0, 0, shape[1], shape[0], card.mpp)
    with torch.inference_mode():
        x = card.normalisation.apply(torch.from_numpy(image)[None])
        probs = sliding_window_inference(
            x,
            roi_size=(tile + 2 * halo,) * 2,
            sw_batch_size=batch_size,
            predictor=lambda batch: torch.softmax(network(batch), 1),
            overlap=2 * halo / (tile + 2 * halo),
            mode="constant",
        )
        labels = probs[0].argmax(0).to(torch.uint8).numpy()
    wall = time.perf_counter() - start
    size = tile + 2 * halo
    stride = size - 2 * halo
    windows = math.prod(math.ceil(max(s - size, 0) / stride) + 1 for s in shape)
    return {
        "wall_s": wall,
        "tiles": windows,
        "tiles_per_s": windows / wall,
        "agreement": float(np.mean(_ours(ours_store) == labels)),
    }


VARIANTS = {
    f.__name__: f for f in (model_only, efficiency, segment_once, seam, monai_patch, monai_sliding_window)
}

if __name__ == "__main__":
    name, params = sys.argv[1], json.loads(sys.argv[2])
    emit(VARIANTS[name](**params))
