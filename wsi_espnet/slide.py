"""Open a whole-slide image with openslide or tiffslide, resolve its mpp, read regions at any mpp.

Everything downstream works in *analysis* pixels at a model's resolution ``mpp`` (µm/px); this
module is the only place that knows about pyramid levels, backends and vendor quirks.

Backend choice: OME-TIFF goes to tiffslide because openslide 4 reads only the first level of a
SubIFD pyramid; everything else goes to openslide (the reference reader for vendor formats),
falling back to tiffslide for TIFFs openslide rejects. A DICOM WSI is a folder of ``.dcm`` files
(one per level, label, overview): it opens as the folder, or as any one file of the series,
through openslide 4, which finds the series' other files in the same folder itself. Pyramid
levels are always chosen by downsample, never by index: the two backends disagree on level
counts for some formats.

Thread safety: one :class:`Slide` may be shared by the threads of a Dask worker. An openslide
handle "can be used concurrently from multiple threads without locking" (OpenSlide docs);
tiffslide makes no such promise, so its reads are serialised by a per-slide lock.
"""

from __future__ import annotations

import contextlib
import math
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import openslide
import tifffile
import tiffslide
from PIL import Image

from wsi_espnet.dicom import dicom_file
from wsi_espnet.errors import SlideError
from wsi_espnet.outputs import OME_SUFFIXES

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")

# A level counts as "not coarser" than the request if its downsample exceeds the wanted one by
# less than this: generic TIFF pyramids report e.g. 2.0003 for a nominal 2x level.
_LEVEL_TOLERANCE = 1.01
# Outside this range a resolution tag is a software default (72 dpi = 353 µm/px), not a scan.
_PLAUSIBLE_MPP = (0.02, 50.0)
# Largest source block (level pixels per side) that thumbnail() reads at once: keeps memory flat
# for single-level slides, where the thumbnail must be built from level 0.
_THUMBNAIL_BLOCK = 4096
# Vendor properties holding the level-0 pixel size, as (key, factor to µm). openslide normally
# parses these into openslide.mpp-x/y already; they matter when it did not.
_VENDOR_MPP_KEYS = (
    ("aperio.MPP", 1.0),
    ("mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X", 1.0),
    ("philips.DICOM_PIXEL_SPACING", 1000.0),  # "0.000243 0.000243" in mm
)

_BackendSlide = openslide.OpenSlide | tiffslide.TiffSlide


class Slide:
    """A whole-slide image opened for reading at analysis resolution (a context manager)."""

    path: Path
    backend: str
    dimensions: tuple[int, int]
    mpp: float
    mpp_source: str
    vendor: str | None
    objective_power: float | None
    level_downsamples: tuple[float, ...]
    level_dimensions: tuple[tuple[int, int], ...]
    bounds_offset: tuple[int, int]
    properties: dict[str, str]

    def __init__(self, path: Path, handle: _BackendSlide, slide_mpp: float | None) -> None:
        self.path = path
        self._handle = handle
        self.backend = "openslide" if isinstance(handle, openslide.OpenSlide) else "tiffslide"
        self._lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if self.backend == "tiffslide" else contextlib.nullcontext()
        )
        self.properties = {k: str(v) for k, v in handle.properties.items() if v is not None}
        self.dimensions = tuple(int(v) for v in handle.dimensions)  # type: ignore[assignment]
        self.level_downsamples = tuple(float(d) for d in handle.level_downsamples)
        self.level_dimensions = tuple((int(w), int(h)) for w, h in handle.level_dimensions)
        self.vendor = self._prop("vendor")
        power = self._prop("objective-power")
        self.objective_power = float(power) if power else None
        self.bounds_offset = (int(self._prop("bounds-x") or 0), int(self._prop("bounds-y") or 0))
        if self.dimensions[0] <= 0 or self.dimensions[1] <= 0:
            raise SlideError(f"slide has no pixels (dimensions {self.dimensions})", path)
        self.mpp, self.mpp_source = self._resolve_mpp(slide_mpp)

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, slide_mpp: float | None = None) -> Slide:
        """Open ``path``; ``slide_mpp`` (µm/px at level 0), when given, overrides the file's value.

        Raises :class:`SlideError` for a missing, empty, unreadable or truncated file, and for a
        slide without a resolution when no ``slide_mpp`` is given.
        """
        path = Path(path)
        if not path.exists():
            raise SlideError("no such file", path)
        if slide_mpp is not None and not (math.isfinite(slide_mpp) and slide_mpp > 0):
            raise SlideError(f"--slide-mpp must be a positive number of µm per pixel, got {slide_mpp}", path)
        if path.is_dir():
            series = dicom_file(path)
            if series is None:
                raise SlideError("is a folder without DICOM files, not a slide (name its files)", path)
            return cls(path, _open_backend(series), slide_mpp)
        if path.stat().st_size == 0:
            raise SlideError("file is empty (0 bytes)", path)
        _check_tiff_complete(path)
        return cls(path, _open_backend(path), slide_mpp)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, backend={self.backend!r}, mpp={self.mpp:.4g})"

    # -- metadata --------------------------------------------------------------------------

    def _prop(self, name: str) -> str | None:
        """A backend-normalised property (``openslide.<name>`` or ``tiffslide.<name>``)."""
        value = self.properties.get(f"{self.backend}.{name}")
        return value if value not in (None, "", "None") else None

    def _resolve_mpp(self, slide_mpp: float | None) -> tuple[float, str]:
        """Level-0 µm/px and where it came from: override, backend, TIFF tags, vendor property."""
        if slide_mpp is not None:
            return float(slide_mpp), "--slide-mpp"
        mpp_x, mpp_y = self._prop("mpp-x"), self._prop("mpp-y")
        if mpp_x and mpp_y and _plausible(mpp := (float(mpp_x) + float(mpp_y)) / 2):
            return mpp, f"{self.backend}.mpp-x/y"
        tiff_mpp = _tiff_resolution_mpp(self.path)
        if tiff_mpp is not None:
            return tiff_mpp, "tiff resolution tags"
        for key, factor in _VENDOR_MPP_KEYS:
            with contextlib.suppress(KeyError, ValueError, IndexError):
                if _plausible(mpp := float(self.properties[key].split()[0]) * factor):
                    return mpp, key
        raise SlideError("slide has no pixel size (mpp); pass --slide-mpp with its µm per pixel", self.path)

    def analysis_shape(self, mpp: float) -> tuple[int, int]:
        """(height, width) of the whole slide in analysis pixels at ``mpp``."""
        scale = mpp / self.mpp
        width, height = self.dimensions
        return math.ceil(height / scale), math.ceil(width / scale)

    def metadata(self) -> dict[str, Any]:
        """JSON-able description for ``wsi-espnet info`` and run.json."""
        return {
            "path": str(self.path.resolve()),
            "backend": self.backend,
            "vendor": self.vendor,
            "dimensions": list(self.dimensions),
            "level_count": len(self.level_downsamples),
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": list(self.level_downsamples),
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "objective_power": self.objective_power,
            "bounds_offset": list(self.bounds_offset),
        }

    # -- pixels ----------------------------------------------------------------------------

    def best_level(self, mpp: float) -> int:
        """The coarsest level whose resolution is not coarser than ``mpp`` (level 0 if none is)."""
        scale = mpp / self.mpp
        candidates = [i for i, d in enumerate(self.level_downsamples) if d <= scale * _LEVEL_TOLERANCE]
        return max(candidates, key=lambda i: self.level_downsamples[i]) if candidates else 0

    def read_region(self, x: int, y: int, width: int, height: int, mpp: float) -> np.ndarray:
        """RGB uint8 (height, width, 3) of the analysis window at ``mpp`` starting at (x, y).

        The window may extend past any edge; outside the slide is white (255). Pixels are
        area-averaged (PIL ``BOX``) from the best level, over the exact sub-pixel footprint of
        each output pixel, so a pixel's value does not depend on the window it was read in:
        neighbouring and overlapping tiles agree, padding included (exactly with tiffslide;
        with openslide up to a slight blur at levels whose downsample is not an integer, see
        :meth:`_read_level`). BOX is PIL's cheapest antialiased filter and exact for the ~2x
        steps between a level and the analysis grid; upsampling uses BILINEAR.
        """
        level = self.best_level(mpp)
        down = self.level_downsamples[level]
        level_w, level_h = self.level_dimensions[level]
        factor = (mpp / self.mpp) / down  # level pixels per analysis pixel
        sx0, sy0, sx1, sy1 = x * factor, y * factor, (x + width) * factor, (y + height) * factor
        # Level pixels to fetch, with a one-pixel margin: room for openslide's sub-pixel shift.
        ix0, iy0 = math.floor(sx0) - 1, math.floor(sy0) - 1
        ix1, iy1 = math.ceil(sx1) + 1, math.ceil(sy1) + 1
        canvas = Image.new("RGB", (ix1 - ix0, iy1 - iy0), (255, 255, 255))
        cx0, cy0, cx1, cy1 = max(ix0, 0), max(iy0, 0), min(ix1, level_w), min(iy1, level_h)
        shift_x = shift_y = 0.0
        if cx1 > cx0 and cy1 > cy0:
            patch, shift_x, shift_y = self._read_level(level, cx0, cy0, cx1 - cx0, cy1 - cy0)
            canvas.paste(patch, (cx0 - ix0, cy0 - iy0))
        box = (sx0 - ix0 - shift_x, sy0 - iy0 - shift_y, sx1 - ix0 - shift_x, sy1 - iy0 - shift_y)
        resample = Image.Resampling.BOX if factor >= 1 else Image.Resampling.BILINEAR
        return np.asarray(canvas.resize((width, height), resample=resample, box=box))

    def _read_level(self, level: int, lx: int, ly: int, w: int, h: int) -> tuple[Image.Image, float, float]:
        """RGB patch of level pixels [lx, lx + w) x [ly, ly + h), composited on white.

        Backends take the location in level-0 pixels. tiffslide starts at level pixel
        ``int(loc / down)``; openslide starts at the fractional ``loc / down`` and resamples
        (blurring) to get there, so for it the nearest level-0 pixel keeps the offset smallest
        and the returned shift (level pixels, at most 0.5 / down) says where the patch starts.
        """
        down = self.level_downsamples[level]
        if self.backend == "openslide":
            loc_x, loc_y = round(lx * down), round(ly * down)
        else:
            loc_x, loc_y = _tiffslide_location(lx, down), _tiffslide_location(ly, down)
        try:
            with self._lock:
                patch = self._handle.read_region((loc_x, loc_y), level, (w, h))
        except (openslide.OpenSlideError, OSError, RuntimeError, ValueError) as exc:
            raise SlideError(
                f"cannot read level {level} region at ({lx}, {ly}) size {w}x{h}: {exc} "
                "(is the file truncated or corrupt?)",
                self.path,
            ) from exc
        if patch.mode == "RGBA":  # openslide: transparent outside tissue scans; composite on white
            white = Image.new("RGB", patch.size, (255, 255, 255))
            white.paste(patch, mask=patch.getchannel("A"))
            patch = white
        elif patch.mode != "RGB":
            patch = patch.convert("RGB")
        if self.backend == "openslide":
            return patch, loc_x / down - lx, loc_y / down - ly
        return patch, 0.0, 0.0

    def thumbnail(self, mpp: float) -> np.ndarray:
        """RGB uint8 image of the whole slide at ``mpp`` (analysis grid at that mpp).

        Read block by block so a single-level slide never needs its level 0 in memory.
        """
        height, width = self.analysis_shape(mpp)
        factor = (mpp / self.mpp) / self.level_downsamples[self.best_level(mpp)]
        block = max(1, int(_THUMBNAIL_BLOCK / max(factor, 1.0)))
        out = np.empty((height, width, 3), dtype=np.uint8)
        for y in range(0, height, block):
            for x in range(0, width, block):
                h, w = min(block, height - y), min(block, width - x)
                out[y : y + h, x : x + w] = self.read_region(x, y, w, h, mpp)
        return out


open_slide = Slide.open


def _plausible(mpp: float) -> bool:
    return math.isfinite(mpp) and _PLAUSIBLE_MPP[0] <= mpp <= _PLAUSIBLE_MPP[1]


def _tiffslide_location(level_px: int, down: float) -> int:
    """A level-0 coordinate that tiffslide maps (``int(loc / down)``) to level pixel ``level_px``."""
    loc = math.ceil(level_px * down - 1e-6)
    return loc if int(loc / down) == level_px else loc + 1


def _is_ome(path: Path) -> bool:
    return path.name.lower().endswith(OME_SUFFIXES)


def _open_backend(path: Path) -> _BackendSlide:
    """tiffslide for OME-TIFF; otherwise openslide, then tiffslide if openslide cannot read it."""
    errors: list[str] = []
    if not _is_ome(path):
        try:
            return openslide.OpenSlide(path)
        except openslide.OpenSlideError as exc:
            errors.append(f"openslide: {exc}")
    try:
        return tiffslide.TiffSlide(path)
    except (tifffile.TiffFileError, ValueError, OSError, KeyError, NotImplementedError) as exc:
        errors.append(f"tiffslide: {exc}")
    raise SlideError(f"not a readable whole-slide image ({'; '.join(errors)})", path)


def _check_tiff_complete(path: Path) -> None:
    """Raise if a TIFF's image data lies past the end of the file (a truncated copy or download).

    openslide rejects most truncated files, but tiffslide opens them and fails only on the first
    read of a missing tile, deep inside a run; checking tile offsets is cheap and fails early.
    Non-TIFF formats (MIRAX, DICOM, ...) are left to their backend.
    """
    size = path.stat().st_size
    try:
        with tifffile.TiffFile(path) as tif:
            for series in tif.series:
                for level in series.levels:
                    for page in level.pages:
                        if page is None or not page.dataoffsets:
                            continue
                        end = max(o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=True))
                        if end > size:
                            raise SlideError(
                                f"file is truncated or corrupt: image data ends at byte {end} "
                                f"but the file has {size} bytes",
                                path,
                            )
    except (tifffile.TiffFileError, ValueError, OSError):
        return  # not a TIFF (or unparseable by tifffile): the backends decide


def _tiff_resolution_mpp(path: Path) -> float | None:
    """Level-0 µm/px from TIFF X/YResolution with ResolutionUnit cm or inch, if plausible."""
    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            unit = tags.get("ResolutionUnit")
            xres, yres = tags.get("XResolution"), tags.get("YResolution")
            if unit is None or xres is None or yres is None:
                return None
            um_per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
            pixels_per_unit = [num / den for num, den in (xres.value, yres.value) if den and num]
    except (tifffile.TiffFileError, ValueError, OSError, IndexError, TypeError):
        return None
    if um_per_unit is None or len(pixels_per_unit) != 2:
        return None
    mpp = um_per_unit * (1 / pixels_per_unit[0] + 1 / pixels_per_unit[1]) / 2
    return mpp if _plausible(mpp) else None


def find_slides(paths: list[str | Path] | tuple[str | Path, ...]) -> list[Path]:
    """Slides named by ``paths``, each folder expanded (not recursively) into its slides.

    Files named explicitly are kept whatever their extension (the user chose them). A folder
    holding DICOM files is one DICOM WSI; any other folder contributes its files with a known
    slide extension and its subfolders that are DICOM WSIs (an IDC download: one folder per
    slide), sorted. Duplicates are dropped, order kept.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise SlideError("no such file or folder", path)
        if not path.is_dir() or dicom_file(path) is not None:
            found.append(path)
            continue
        inside = sorted(
            p
            for p in path.iterdir()
            if (p.is_file() and p.name.lower().endswith(SLIDE_EXTENSIONS))
            or (p.is_dir() and dicom_file(p) is not None)
        )
        if not inside:
            raise SlideError(f"folder contains no slides ({', '.join(SLIDE_EXTENSIONS)}, DICOM)", path)
        found.extend(inside)
    return list(dict.fromkeys(found))


# Upsampling a slide more than this to reach the analysis resolution invents detail.
MAX_UPSAMPLING = 2.0


def check_resolution(slide: Slide, mpp: float) -> None:
    """Refuse an analysis resolution the slide cannot serve: far finer than it, or so coarse
    that the analysis image would be a few pixels (checked in the client and again on workers)."""
    if mpp * MAX_UPSAMPLING < slide.mpp:
        raise SlideError(
            f"analysis resolution {mpp} µm/px is more than {MAX_UPSAMPLING:g}x finer than the slide's "
            f"{slide.mpp:.3f} µm/px; choose a coarser --mpp",
            slide.path,
        )
    height, width = slide.analysis_shape(mpp)
    if min(height, width) < 8:
        raise SlideError(
            f"--mpp {mpp} is too coarse for this slide: the analysis image would be only {width}x{height} px",
            slide.path,
        )
