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
import psutil

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


def network_rate(model: str, window: int, threads: int, repeats: int = 2) -> dict[str, Any]:
    """The network's own rate: one ``window``² input without halo, after a warm-up pass.

    This is the rate the union-of-halo-windows limit is priced at (cost per input pixel is flat
    from 1024² to 3072² windows, issue 10), so it is what no tiling can beat.
    """
    import torch

    from wsi_espnet.models.cards import load_card
    from wsi_espnet.predict import get_predictor

    torch.set_num_threads(threads)
    predictor = get_predictor(load_card(model), "auto")
    image = np.random.default_rng(0).integers(0, 256, (1, window, window, 3), dtype=np.uint8)
    predictor.predict(image)
    start = time.perf_counter()
    for _ in range(repeats):
        predictor.predict(image)
    wall = time.perf_counter() - start
    return {
        "window": window,
        "threads": threads,
        "repeats": repeats,
        "wall_s": wall,
        "input_mpx_per_s": repeats * window**2 / wall / 1e6,
    }


def whole_reference(model: str, slide: str, margin: int, threads: int, out: str) -> dict[str, Any]:
    """Labels of one forward pass over the whole analysis image plus ``margin`` px of white.

    Without the white margin the reference itself is wrong where the network's zero padding
    meets tissue at the image's edges (see the seam section). Saved as ``out`` (.npy).
    """
    import torch

    from wsi_espnet.models.cards import load_card
    from wsi_espnet.predict import get_predictor
    from wsi_espnet.slide import Slide

    torch.set_num_threads(threads)
    card = load_card(model)
    start = time.perf_counter()
    with Slide.open(slide) as opened:
        h, w = opened.analysis_shape(card.mpp)
        image = opened.read_region(-margin, -margin, w + 2 * margin, h + 2 * margin, card.mpp)
    labels = get_predictor(card, "auto").predict(image[None], crop=margin).labels[0]
    np.save(out, labels)
    return {"wall_s": time.perf_counter() - start, "shape": [h, w], "margin": margin}


def _load_network(model: str, threads: int) -> tuple[Any, Any]:
    import torch

    from wsi_espnet.models.cards import load_card

    torch.set_num_threads(threads)
    card = load_card(model)
    return card, card.build_model().eval()


def _scored(labels: np.ndarray, reference: str, wall: float, windows: int) -> dict[str, Any]:
    """Whole-run figures of a MONAI setting: output MPx/s and agreement with the reference.

    ``wall_s`` times the slide's inference alone (model built, imports done); ``process_s``
    the whole process up to the labels, as ``segment``'s wall time includes its start-up.
    """
    process = time.time() - psutil.Process().create_time()
    ref = np.load(reference)
    return {
        "wall_s": wall,
        "process_s": process,
        "windows": windows,
        "output_mpx_per_s": labels.size / wall / 1e6,
        "process_output_mpx_per_s": labels.size / process / 1e6,
        "agreement": float(np.mean(ref == labels)),
    }


def monai_patch(
    model: str, slide: str, patch: int, overlap: float, batch_size: int, threads: int, reference: str
) -> dict[str, Any]:
    """MONAI ``PatchInferer`` + ``WSISlidingWindowSplitter`` (OpenSlide) + ``AvgMerger``, whole slide.

    The slide's level 1 is exactly the analysis resolution, so MONAI reads it without
    resampling. ``AvgMerger`` averages softmax scores in RAM, giving a patch's edge the same
    weight as its centre, and the OpenSlide reader pads past the slide with black.
    """
    import torch
    from monai.inferers import AvgMerger, PatchInferer, WSISlidingWindowSplitter

    from wsi_espnet.slide import Slide

    card, network = _load_network(model, threads)
    start = time.perf_counter()
    with Slide.open(slide) as opened:
        shape = opened.analysis_shape(card.mpp)
        level = opened.best_level(card.mpp)
    windows = 0

    def preprocess(patches: torch.Tensor) -> torch.Tensor:
        nonlocal windows
        windows += patches.shape[0]
        return card.normalisation.apply(torch.as_tensor(patches).permute(0, 2, 3, 1))

    inferer = PatchInferer(
        splitter=WSISlidingWindowSplitter(patch_size=patch, overlap=overlap, reader="OpenSlide", level=level),
        merger_cls=AvgMerger,
        batch_size=batch_size,
        preprocessing=preprocess,
        postprocessing=lambda logits: torch.softmax(logits, 1),
    )
    with torch.inference_mode():
        merged = inferer(str(slide), network)
        labels = merged[0].argmax(0).to(torch.uint8).numpy()[: shape[0], : shape[1]]
    return _scored(labels, reference, time.perf_counter() - start, windows)


def monai_sliding_window(
    model: str, slide: str, roi: int, overlap: float, mode: str, batch_size: int, threads: int, reference: str
) -> dict[str, Any]:
    """MONAI's in-RAM ``sliding_window_inference`` on the whole analysis image (it must fit in RAM)."""
    import torch
    from monai.inferers import sliding_window_inference

    from wsi_espnet.slide import Slide

    card, network = _load_network(model, threads)
    start = time.perf_counter()
    with Slide.open(slide) as opened:
        shape = opened.analysis_shape(card.mpp)
        image = opened.read_region(0, 0, shape[1], shape[0], card.mpp)
    windows = 0

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        nonlocal windows
        windows += batch.shape[0]
        return torch.softmax(network(batch), 1)

    with torch.inference_mode():
        x = card.normalisation.apply(torch.from_numpy(image)[None])
        probs = sliding_window_inference(
            x, roi_size=(roi, roi), sw_batch_size=batch_size, predictor=predictor, overlap=overlap, mode=mode
        )
        labels = probs[0].argmax(0).to(torch.uint8).numpy()
    return _scored(labels, reference, time.perf_counter() - start, windows)


VARIANTS = {
    f.__name__: f
    for f in (
        model_only,
        efficiency,
        segment_once,
        seam,
        network_rate,
        whole_reference,
        monai_patch,
        monai_sliding_window,
    )
}

if __name__ == "__main__":
    name, params = sys.argv[1], json.loads(sys.argv[2])
    emit(VARIANTS[name](**params))
