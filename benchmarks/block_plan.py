"""Network input per output pixel with tissue-following blocks, against the halo-union floor.

``python -m benchmarks.block_plan`` prints, for a biopsy-like 40x slide from the generator (and
its quarter-area sibling) and for CMU-1 fragments scattered on glass, the selected chunks, the
floor (union of every tissue chunk's halo window ÷ chunk area) and the amplification (network
input ÷ output chunk pixels) of planned and of fixed grid-aligned blocks, per block size.
``--slide PATH`` adds any slide, with its tissue detected as ``segment`` detects it.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from wsi_espnet.blocks import amplification, fixed_blocks, halo_union_floor, plan_blocks
from wsi_espnet.grid import TileGrid
from wsi_espnet.sample import tissue_layout
from wsi_espnet.slide import Slide
from wsi_espnet.tissue import TissueMask, detect_tissue

CMU1 = Path(__file__).resolve().parents[2] / "shared/data/wsi_aperio_cmu1_small_region/CMU-1-Small-Region.svs"
MASK_MPP = 16.0  # the tissue detector's default thumbnail resolution


def cmu1_fragments(shape_um: tuple[int, int], copies: int, seed: int = 0) -> np.ndarray:
    """CMU-1's detected tissue mask, rotated copies scattered on glass (mask at ``MASK_MPP``)."""
    with Slide.open(CMU1) as slide:
        fragment = detect_tissue(slide).mask
    rng = np.random.default_rng(seed)
    canvas = np.zeros((math.ceil(shape_um[0] / MASK_MPP), math.ceil(shape_um[1] / MASK_MPP)), bool)
    for _ in range(copies):
        piece = np.rot90(fragment, int(rng.integers(4)))
        y = int(rng.integers(0, canvas.shape[0] - piece.shape[0]))
        x = int(rng.integers(0, canvas.shape[1] - piece.shape[1]))
        canvas[y : y + piece.shape[0], x : x + piece.shape[1]] |= piece
    return canvas


def report(name: str, tissue: TissueMask, grid: TileGrid, sizes: list[int]) -> None:
    selected = [c.index for c in grid.select(tissue, 1.0)]
    floor = halo_union_floor(selected, grid)
    print(f"{name}: {len(selected)} of {len(grid.chunks)} chunks need inference; floor {floor:.3f}")
    for k in sizes:
        start = time.perf_counter()
        planned = amplification(plan_blocks(selected, grid, k), grid)
        ms = (time.perf_counter() - start) * 1e3
        fixed = amplification(fixed_blocks(selected, grid, k), grid)
        print(
            f"  {k} chunks a side: planned {planned:.3f} ({planned / floor:.3f}x floor, {ms:.0f} ms), "
            f"fixed grid {fixed:.3f} ({fixed / floor:.3f}x floor)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--halo", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 6, 8])
    parser.add_argument("--slide", type=Path, action="append", default=[])
    args = parser.parse_args()

    def grid(shape: tuple[int, int]) -> TileGrid:
        return TileGrid(shape, args.tile, args.halo)

    for width, height in ((100_000, 40_000), (50_000, 20_000)):
        mask = tissue_layout(width, height, 0.25, 0.12, mask_mpp=MASK_MPP)
        shape = math.ceil(height * 0.25), math.ceil(width * 0.25)  # analysis pixels at 1 µm/px
        tissue = TissueMask(mask, mask.astype(np.int32), MASK_MPP)
        report(f"generator 40x {width}x{height} @0.25 µm/px, 12 % tissue", tissue, grid(shape), args.sizes)
    if CMU1.is_file():
        mask = cmu1_fragments((10_000, 25_000), 16)
        tissue = TissueMask(mask, mask.astype(np.int32), MASK_MPP)
        report("16 CMU-1 fragments on 25 x 10 mm of glass", tissue, grid((10_000, 25_000)), args.sizes)
    for path in args.slide:
        with Slide.open(path) as slide:
            tissue, shape = detect_tissue(slide), slide.analysis_shape(1.0)
        report(str(path), tissue, grid(shape), args.sizes)


if __name__ == "__main__":
    main()
