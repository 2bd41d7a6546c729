"""How many chunks a side an inference block may have, from the device's memory (or ``--block``).

A larger block wastes less of the network's work on halos (a k x k block of 512-px chunks with a
256-px halo costs ((k + 1) / k)^2 input pixels per output pixel), and the network's cost per
input pixel varies little with the window size, so the block is as large as memory allows, up to
a cap (lower on a CPU, where large windows run a little slower per pixel; measured below).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import psutil

from wsi_espnet.devices import is_cuda

if TYPE_CHECKING:  # imported where a GPU is measured: segment's client imports this module
    import torch

# Peak resident memory of one ESPNet forward pass (shipped breast-tissue card, CPU, fp32,
# torch.inference_mode, crop=halo, softmax and argmax included) per input pixel. Measured as
# ru_maxrss deltas in fresh processes (2 threads, torch 2.13) after a 64-px warm-up:
# window 1024: +267 MiB, 2048: +795 MiB, 3072: +1788 MiB; the slope between 2048 and 3072 is
# 993 MiB / 5.24 MPx = 199 B/px (and 199 B/px of either window alone). 1024 carries allocator
# and oneDNN start-up overhead. Rounded up for the uint8 window and the prefetched next one.
BYTES_PER_INPUT_PX = 220
# Share of the machine's total RAM that one forward pass may take, on CPU. Total, not available
# now: the choice must not change from run to run on one machine, because block seams decide the
# last bits of the labels and a resumed or repeated run must give identical labels. A worker also
# holds the slide reader, the zarr write buffers and, with several workers, other workers' passes.
CPU_BUDGET_SHARE = 0.25
# Share of free GPU memory for the batch: the rest is cuDNN workspace and allocator slack.
# bf16 activations need about half the CPU figure; the CPU constant is kept as a safe bound
# (not measured on a GPU in this session).
CUDA_BUDGET_SHARE = 0.8
# Largest block core per side in pixels. Beyond 4096 px (8 chunks of 512) the halo share falls
# only from 1.27x to 1.13x at 8192 px, tissue fragments seldom fill such rectangles, and one
# failed block would redo a 21-MPx window; the planner's work also grows as k^2.
MAX_CORE_PX = 4096
# On a CPU the cost per input pixel rises with the window (2 threads, torch 2.13, one run each:
# 1.59, 1.24, 1.19, 1.09 and 1.00 MPx/s at windows 1024, 2048, 2560, 3584 and 4608), so output per
# second on solid tissue peaks at a 2560-3072 px core (0.82 and 0.80 output MPx/s, against 0.79 at
# 4096) while memory keeps growing (1.9 GiB at 3072², 2.9 GiB at 3584², 4.3 GiB at 4608²). A
# 2560-px core (5 chunks) keeps the planner within 1.24x of the halo-union floor on biopsy-like
# tissue (1.22x at 3072; ``python -m benchmarks.block_plan``) for two thirds of the memory.
MAX_CORE_PX_CPU = 2560


def choose_block_chunks(
    device: torch.device | str, batch_size: int, tile: int, halo: int, budget_bytes: int | None = None
) -> int:
    """The largest block edge, in chunks, whose ``batch_size`` windows fit the memory budget.

    ``budget_bytes`` defaults to a share of the machine's total RAM (CPU) or of the GPU's free
    memory (CUDA). Never less than 1 (a lone chunk's window is what ran before blocks existed),
    never more than ``MAX_CORE_PX // tile`` (``MAX_CORE_PX_CPU`` on a CPU).
    """
    cuda = is_cuda(device)
    if budget_bytes is None:
        if cuda:
            import torch

            free, _ = torch.cuda.mem_get_info(torch.device(device))
            budget_bytes = int(free * CUDA_BUDGET_SHARE)
        else:
            budget_bytes = int(psutil.virtual_memory().total * CPU_BUDGET_SHARE)
    per_window_px = budget_bytes / (max(batch_size, 1) * BYTES_PER_INPUT_PX)
    fits = math.floor((math.sqrt(max(per_window_px, 0.0)) - 2 * halo) / tile)
    cap = MAX_CORE_PX if cuda else MAX_CORE_PX_CPU
    return max(1, min(fits, cap // tile))


def blocks_per_pass(device: torch.device | str, batch_size: int) -> int:
    """Blocks per forward pass: ``--batch-size`` on a GPU, one on a CPU.

    On a CPU a batch buys nothing once a block is large (the cost per input pixel is flat from
    1024² up), while four blocks at once would force blocks a quarter the area (more halo).
    """
    return batch_size if is_cuda(device) else 1
