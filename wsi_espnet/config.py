"""The settings of a segmentation run: defaults < YAML file (``--config``) < command line.

The YAML file uses the command-line option names (``batch-size`` or ``batch_size`` both work), so
a user can move any option from a command into a file without translating it. The user sees one
flat :class:`SegmentSettings`; each part of the run receives only its share of it:
:class:`InferenceSettings` go to the tasks that infer, :class:`OutputSettings` to finalise and
the exporters, :class:`ClusterSettings` to ``cluster.py``. This module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from wsi_espnet.confidence import DEFAULT_LOW_CONFIDENCE
from wsi_espnet.errors import ConfigError
from wsi_espnet.outputs import FORMATS as EXPORT_FORMATS
from wsi_espnet.qc_kinds import MODES as QC_MODES
from wsi_espnet.resources import load_yaml
from wsi_espnet.tissue import TissueSettings


@dataclass(frozen=True)
class InferenceSettings:
    """What an infer task needs besides its slide's plan: which model, where, how many at once."""

    model: str
    device: str
    batch_size: int
    tta: int = 1  # test-time augmentation views (1, 2, 4 or 8)


@dataclass(frozen=True)
class OutputSettings:
    """What finalise writes besides the store and statistics: the exports and their options."""

    formats: tuple[str, ...] = EXPORT_FORMATS
    geojson_per_region: bool = False
    geojson_min_area_um2: float | None = None  # None: the exporter's default (100 µm²)
    include_scores: bool = False
    low_confidence: float = DEFAULT_LOW_CONFIDENCE  # statistics and the GeoJSON Uncertain class
    geojson_uncertain: bool = True  # an "Uncertain" GeoJSON class of low-confidence tissue


@dataclass(frozen=True)
class ClusterSettings:
    """Where the Dask workers run (``cluster.open_client``); None leaves it to the profile."""

    cluster: str | None = None  # profile name or YAML path; None → LocalCluster
    scheduler: str | None = None  # address of a running Dask scheduler
    workers: int | None = 1  # LocalCluster worker processes; 0 = in-process (debugging)
    threads: int | None = 2
    jobs: int | None = None
    adapt: tuple[int, int] | None = None


@dataclass(frozen=True)
class SegmentSettings:
    """Every parameter of ``wsi-espnet segment``; recorded verbatim in each slide's run.json."""

    model: str = "breast-tissue-espnet"
    mpp: float | None = None  # analysis resolution; None → the model card's
    slide_mpp: float | None = None  # override for slides whose files carry no resolution
    tile: int = 512  # output chunk edge at analysis resolution
    halo: int = 256  # context per side: tile 256 vs whole image agree on 99.95 % (README, seams)
    block: int | None = None  # inference block edge in analysis px (a multiple of tile); None → device
    batch_size: int = 4
    device: str = "auto"
    workers: int = 1  # LocalCluster worker processes; 0 = in-process (debugging)
    threads: int = 2  # threads per worker: one reads tiles while another runs the model
    tissue_detection: bool = True
    tissue: TissueSettings = field(default_factory=TissueSettings)
    overwrite: bool = False
    quiet: bool = False
    zarr_format: int = 2
    formats: tuple[str, ...] = EXPORT_FORMATS
    geojson_per_region: bool = False
    geojson_min_area_um2: float | None = None  # None: the exporter's default (100 µm²)
    chunks_per_task: int = 16  # about this many chunks (whole blocks) per Dask task: the unit of retries
    retries: int = 2  # Dask retries of a task whose worker died
    cluster: str | None = None  # cluster profile name or YAML path; None → LocalCluster
    jobs: int | None = None
    adapt: tuple[int, int] | None = None
    scheduler: str | None = None  # address of a running Dask scheduler
    performance_report: Path | None = None
    roi: Path | None = None  # QuPath GeoJSON of the region to segment (a manifest's roi column wins)
    roi_classes: tuple[str, ...] = ()  # keep only ROI annotations of these QuPath classes
    tta: int = 1  # test-time augmentation: average over 1, 2, 4 or 8 dihedral views (wsi_espnet/tta.py)
    low_confidence: float = DEFAULT_LOW_CONFIDENCE  # below it a tissue pixel is "uncertain"
    geojson_uncertain: bool = True  # export low-confidence tissue as a GeoJSON class "Uncertain"
    qc: str = "flag"  # artifact QC: off | flag (layer, areas, warnings) | exclude (also drop from classes)

    def validate(self) -> SegmentSettings:
        """Reject values that would silently produce wrong or seamed results."""
        if self.tile <= 0 or self.tile % 8:
            raise ConfigError(f"--tile must be a positive multiple of 8, got {self.tile}")
        if self.halo < 0 or self.halo % 8:
            # Windows must start on the network's stride-8 grid, or tiles and seams disagree.
            raise ConfigError(f"--halo must be a non-negative multiple of 8, got {self.halo}")
        if self.block is not None and (self.block < self.tile or self.block % self.tile):
            raise ConfigError(
                f"--block must be a positive multiple of --tile ({self.tile}), got {self.block}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.mpp is not None and self.mpp <= 0:
            raise ConfigError(f"--mpp must be positive, got {self.mpp}")
        if self.slide_mpp is not None and self.slide_mpp <= 0:
            raise ConfigError(f"--slide-mpp must be positive, got {self.slide_mpp}")
        if self.zarr_format not in (2, 3):
            raise ConfigError(f"--zarr-format must be 2 or 3, got {self.zarr_format}")
        unknown = set(self.formats) - set(EXPORT_FORMATS)
        if unknown:
            raise ConfigError(
                f"unknown export format(s) {sorted(unknown)}; known: {', '.join(EXPORT_FORMATS)}"
            )
        if self.workers < 0 or self.threads < 1:
            raise ConfigError("--workers must be >= 0 and --threads >= 1")
        if self.adapt is not None:
            check_adapt(self.adapt)
        if any(not name.strip() for name in self.roi_classes):
            raise ConfigError("--roi-class needs a class name, got an empty one")
        check_confidence_settings(self.tta, self.low_confidence)
        if self.qc not in QC_MODES:
            raise ConfigError(f"--qc must be one of {', '.join(QC_MODES)}, got {self.qc!r}")
        return self

    @property
    def inference(self) -> InferenceSettings:
        return InferenceSettings(self.model, self.device, self.batch_size, self.tta)

    @property
    def outputs(self) -> OutputSettings:
        return OutputSettings(
            self.formats,
            self.geojson_per_region,
            self.geojson_min_area_um2,
            low_confidence=self.low_confidence,
            geojson_uncertain=self.geojson_uncertain,
        )

    @property
    def cluster_settings(self) -> ClusterSettings:
        return ClusterSettings(
            self.cluster, self.scheduler, self.workers, self.threads, self.jobs, self.adapt
        )

    def as_record(self) -> dict[str, Any]:
        """JSON-able dict of every parameter (for run.json)."""
        record = asdict(self)
        record["performance_report"] = str(self.performance_report) if self.performance_report else None
        record["formats"] = list(self.formats)
        record["roi"] = str(self.roi) if self.roi else None
        record["roi_classes"] = list(self.roi_classes)
        return record


_FIELDS = {f.name for f in fields(SegmentSettings)}
_ALIASES = {"roi_class": "roi_classes"}  # the YAML key spelt like the repeatable option --roi-class


def _normalise_keys(raw: dict[str, Any], source: Path | str) -> dict[str, Any]:
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        name = _ALIASES.get(name, name)
        if name not in _FIELDS:
            raise ConfigError(f"unknown setting '{key}' (known: {', '.join(sorted(_FIELDS))})", source)
        out[name] = value
    return out


def _coerce(values: dict[str, Any], source: Path | str) -> dict[str, Any]:
    """Turn YAML/CLI scalars into the dataclass's types (tuples, nested tissue settings)."""
    out = dict(values)
    if "tissue" in out and isinstance(out["tissue"], dict):
        try:
            out["tissue"] = TissueSettings(**out["tissue"])
        except TypeError as exc:
            raise ConfigError(f"invalid 'tissue' settings: {exc}", source) from exc
    if "formats" in out and isinstance(out["formats"], str):
        out["formats"] = tuple(f.strip() for f in out["formats"].split(",") if f.strip())
    elif "formats" in out:
        out["formats"] = tuple(out["formats"])
    if "adapt" in out and isinstance(out["adapt"], str):
        out["adapt"] = parse_adapt(out["adapt"])
    if out.get("performance_report") is not None:
        out["performance_report"] = Path(out["performance_report"])
    if out.get("roi") is not None:
        out["roi"] = Path(out["roi"])
    if "roi_classes" in out:
        names = out["roi_classes"]
        out["roi_classes"] = (names,) if isinstance(names, str) else tuple(str(n) for n in names or ())
    return out


def parse_adapt(text: str) -> tuple[int, int]:
    """``"MIN:MAX"`` → (MIN, MAX) jobs for adaptive scaling."""
    try:
        lo, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise ConfigError(f"--adapt expects MIN:MAX (e.g. 1:8), got {text!r}") from None
    return check_adapt((lo, hi))


def check_adapt(adapt: tuple[int, int]) -> tuple[int, int]:
    """Adaptive scaling needs 0 <= MIN <= MAX and MAX >= 1 (0:0 would never start a worker)."""
    lo, hi = adapt
    if not (0 <= lo <= hi and hi >= 1):
        raise ConfigError(f"adapt needs 0 <= minimum <= maximum and maximum >= 1 (got {lo}:{hi})")
    return lo, hi


def check_tta(tta: int) -> int:
    """``--tta`` is 1, 2, 4 or 8: the view groups of ``tta.py`` (which needs torch; this must not)."""
    if tta not in (1, 2, 4, 8):
        raise ConfigError(f"--tta must be 1, 2, 4 or 8, got {tta}")
    return tta


def check_confidence_settings(tta: int, low_confidence: float) -> None:
    """``--tta`` (see :func:`check_tta`) and ``--low-confidence``, a probability."""
    check_tta(tta)
    if not 0.0 <= low_confidence <= 1.0:
        raise ConfigError(f"--low-confidence must be between 0 and 1, got {low_confidence}")


def load_settings(config_file: Path | None = None, **overrides: Any) -> SegmentSettings:
    """Merge defaults, the YAML file and the command line's explicitly given options."""
    values: dict[str, Any] = {}
    if config_file is not None:
        raw = load_yaml(Path(config_file), ConfigError, "a YAML mapping of option: value", empty_ok=True)
        values.update(_coerce(_normalise_keys(raw, config_file), config_file))
    values.update(_coerce({k: v for k, v in overrides.items() if v is not None}, "command line"))
    try:
        return replace(SegmentSettings(), **values).validate()
    except TypeError as exc:
        raise ConfigError(f"invalid settings: {exc}", config_file) from exc
