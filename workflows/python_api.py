"""Segment one slide from Python and read the results back.

    python workflows/python_api.py                    # makes a small synthetic slide first
    python workflows/python_api.py my-slide.svs out/  # your own slide

``run_segment`` starts a LocalCluster for the call (``SegmentSettings(workers=0)`` runs in this
process instead, handy in a debugger); to reuse one cluster for many calls, open a client with
``wsi_espnet.cluster.open_client`` and call ``wsi_espnet.pipeline.segment_slides``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wsi_espnet.config import SegmentSettings
from wsi_espnet.outputs import SlideOutput
from wsi_espnet.pipeline import run_segment
from wsi_espnet.runstate import SlideJob
from wsi_espnet.sample import write_sample_slide
from wsi_espnet.store import open_store


def main(slide: Path | None, outdir: Path) -> int:
    if slide is None:  # a clearly synthetic H&E-like slide, so the example needs no download
        outdir.mkdir(parents=True, exist_ok=True)
        slide = write_sample_slide(outdir / "synthetic-sample.tif", 2048, 1536, mpp=0.5, seed=1)

    settings = SegmentSettings(workers=1, threads=2, formats=("geojson",), quiet=True)
    (result,) = run_segment([SlideJob(slide)], outdir, settings)
    if result.status == "failed":
        print(result.error, file=sys.stderr)
        return 1

    # "done", or "skipped" when an earlier run already finished this slide: read its outputs.
    output = SlideOutput.for_slide(outdir, slide)
    labels = open_store(output.store).labels(0)  # class per analysis pixel, read lazily
    stats = output.read_stats()
    print(f"{slide.name}: {result.status}, label map {labels.shape} at {stats['mpp']} µm/px")
    print(f"tissue area {stats['tissue_area_mm2']:.2f} mm²; per class: {output.stats_csv}")
    print(f"open {output.store} in napari, or import the GeoJSON in {output.root} into QuPath")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slide", nargs="?", type=Path, help="a whole-slide image [a synthetic sample]")
    parser.add_argument("outdir", nargs="?", type=Path, default=Path("wsi-espnet-api-example"))
    args = parser.parse_args()
    sys.exit(main(args.slide, args.outdir))
