"""Cluster profiles: a small YAML file per site that says where Dask workers run.

``open_client`` is the one place that chooses and starts the Dask client of a run (a running
scheduler, a profile's cluster, or workers in this process).

Why YAML profiles: the same ``wsi-espnet segment`` command should run on a laptop, a SLURM GPU
partition or a PBS queue; only the profile changes. Profile keys are the constructor arguments of
``distributed.LocalCluster`` or of the matching dask-jobqueue class (``SLURMCluster``,
``PBSCluster``, ``LSFCluster``, ``SGECluster``) spelled exactly as in the dask-jobqueue 0.9
documentation, so users can look them up there. Our own keys are few: ``kind``, ``description``,
``jobs`` (how many jobs to submit by default) and ``worker_timeout`` (seconds to wait for the first
worker before giving up with a clear error).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
from dask_jobqueue import LSFCluster, PBSCluster, SGECluster, SLURMCluster
from dask_jobqueue.core import Job, JobQueueCluster
from distributed import Client, LocalCluster

from wsi_espnet.config import ClusterSettings, SegmentSettings, check_adapt
from wsi_espnet.errors import ClusterError, ConfigError
from wsi_espnet.resources import find_named, load_yaml, packaged

NANNY_ENVIRON = "distributed.nanny.pre-spawn-environ"
# Workers ask glibc (2.35 and later; older ones and other C libraries ignore it) to back its
# large allocations with transparent huge pages. ESPNet's activations on a 3072² block are
# arrays of 150 MB, each mapped afresh and faulted in 4-KiB pages by the kernel: on 2 cores the
# forward pass spent more time in the kernel than in PyTorch (26 s of 62 s CPU for two
# passes). With 2-MiB pages the network ran 1.4-1.55x faster in one run each, in the main
# thread and in a worker thread, at the same peak memory (see benchmarks/README.md).
WORKER_TUNABLES = "glibc.malloc.hugetlb=1"
_TUNABLE = WORKER_TUNABLES.split("=")[0]

JOBQUEUE_CLASSES: dict[str, type[JobQueueCluster]] = {
    "slurm": SLURMCluster,
    "pbs": PBSCluster,
    "lsf": LSFCluster,
    "sge": SGECluster,
}
KINDS = ("local", *JOBQUEUE_CLASSES)

#: Keys that are ours, not the cluster class's.
OWN_KEYS = frozenset({"kind", "description", "jobs", "worker_timeout"})

#: LocalCluster arguments a profile may set (LocalCluster forwards the rest to workers, so its
#: signature alone cannot list them).
LOCAL_KEYS = frozenset(
    {
        "n_workers",
        "threads_per_worker",
        "processes",
        "memory_limit",
        "resources",
        "host",
        "scheduler_port",
        "interface",
        "protocol",
        "dashboard_address",
        "local_directory",
        "silence_logs",
    }
)

#: JobQueueCluster arguments that configure the scheduler, not the job (``interface`` and
#: ``protocol`` go to both, as in JobQueueCluster itself).
JOBQUEUE_CLUSTER_KEYS = frozenset({"scheduler_options", "shared_temp_directory", "silence_logs"})
SHARED_KEYS = frozenset({"interface", "protocol"})

#: Arguments set by the cluster itself or by dask-jobqueue internals; a profile cannot set them.
_INTERNAL_JOB_ARGS = frozenset({"self", "scheduler", "name", "config_name", "security"})

#: Names dask-jobqueue deprecated in 0.8; we point users at the new name instead of passing them on.
RENAMED = {
    "job_extra": "job_extra_directives",
    "env_extra": "job_script_prologue",
    "extra": "worker_extra_args",
    "header_skip": "job_directives_skip",
    "dashboard_address": "scheduler_options: {dashboard_address: ...}",
    "host": "scheduler_options: {host: ...}",
}

DEFAULT_WORKER_TIMEOUT = {"local": 60.0, "jobqueue": 600.0}


@dataclass(frozen=True)
class ClusterProfile:
    """A validated cluster profile.

    ``options`` holds the constructor arguments exactly as the profile spelled them; ``kind``
    picks the class they go to.
    """

    name: str
    path: Path
    kind: str
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    jobs: int = 1
    worker_timeout: float = DEFAULT_WORKER_TIMEOUT["local"]

    @property
    def is_local(self) -> bool:
        return self.kind == "local"


def list_profiles() -> list[ClusterProfile]:
    """All profiles shipped with the package, sorted by name."""
    return [load_profile(path) for path in packaged("clusters")]


def _allowed_keys(kind: str) -> frozenset[str]:
    """Keys a profile of this kind may set, read from the dask-jobqueue signatures.

    Why from the signatures: the allowed keys then follow the installed dask-jobqueue version.
    """
    if kind == "local":
        return LOCAL_KEYS
    job_cls = JOBQUEUE_CLASSES[kind].job_cls
    job_args = set(inspect.signature(job_cls.__init__).parameters) | set(
        inspect.signature(Job.__init__).parameters
    )
    job_args -= _INTERNAL_JOB_ARGS | set(RENAMED) | {"base_class_kwargs"}
    return frozenset(job_args | JOBQUEUE_CLUSTER_KEYS | SHARED_KEYS)


def _check_key(path: Path, kind: str, key: object, allowed: frozenset[str]) -> None:
    if not isinstance(key, str):
        raise ConfigError(f"key {key!r} is not a string", path)
    if key in allowed or key in OWN_KEYS:
        return
    if key in RENAMED and kind != "local":
        raise ConfigError(f"key {key!r} is not accepted; use {RENAMED[key]}", path)
    close = difflib.get_close_matches(key, sorted(allowed | OWN_KEYS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(sorted(allowed))}"
    raise ConfigError(f"unknown key {key!r} for a {kind} profile{hint}", path)


def load_profile(name_or_path: str | Path) -> ClusterProfile:
    """Load and validate a profile by name (shipped with the package) or by path to a YAML file."""
    path = find_named(name_or_path, "clusters", ConfigError, "cluster profile")
    data = load_yaml(path, ConfigError, "a YAML mapping of keys to values")
    kind = data.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"key 'kind' must be one of {', '.join(KINDS)} (got {kind!r})", path)
    allowed = _allowed_keys(kind)
    for key in data:
        _check_key(path, kind, key, allowed)

    jobs = data.get("jobs", 1)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ConfigError(f"key 'jobs' must be a positive integer (got {jobs!r})", path)
    default_timeout = DEFAULT_WORKER_TIMEOUT["local" if kind == "local" else "jobqueue"]
    timeout = data.get("worker_timeout", default_timeout)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        raise ConfigError(
            f"key 'worker_timeout' must be a positive number of seconds (got {timeout!r})", path
        )
    if "scheduler_options" in data and not isinstance(data["scheduler_options"], dict):
        raise ConfigError("key 'scheduler_options' must be a mapping", path)
    for key in ("job_extra_directives", "job_script_prologue", "worker_extra_args", "job_directives_skip"):
        if key in data and not (isinstance(data[key], list) and all(isinstance(v, str) for v in data[key])):
            raise ConfigError(f"key {key!r} must be a list of strings", path)

    options = {k: v for k, v in data.items() if k not in OWN_KEYS and v is not None}
    return ClusterProfile(
        name=path.stem,
        path=path,
        kind=kind,
        description=str(data.get("description") or ""),
        options=options,
        jobs=jobs,
        worker_timeout=float(timeout),
    )


def _split_jobqueue_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(cluster-only arguments, job arguments); ``interface``/``protocol`` go to both."""
    cluster = {k: v for k, v in options.items() if k in JOBQUEUE_CLUSTER_KEYS | SHARED_KEYS}
    job = {k: v for k, v in options.items() if k not in JOBQUEUE_CLUSTER_KEYS}
    return cluster, job


def job_script(profile: ClusterProfile) -> str:
    """The batch script one worker job would submit (what ``wsi-espnet cluster show`` prints).

    Built from the job class alone, with a placeholder scheduler address, so showing a profile
    starts no scheduler and submits nothing.
    """
    if profile.is_local:
        return (
            f"# profile {profile.name!r} (kind: local) runs a LocalCluster on this machine: "
            "there is no job script.\n"
        )
    _, job_options = _split_jobqueue_options(_jobqueue_options(profile.options))
    job_cls = JOBQUEUE_CLASSES[profile.kind].job_cls
    with _no_new_log_directory(job_options.get("log_directory")):
        try:
            job = job_cls("tcp://<scheduler-address>:8786", name="dask-worker", **job_options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid value for {job_cls.__name__}: {exc}", profile.path) from exc
    return job.job_script()


@contextlib.contextmanager
def _no_new_log_directory(log_directory: str | None) -> Iterator[None]:
    """Remove the ``log_directory`` that dask-jobqueue's ``Job()`` creates, if it was not there.

    The job class makes the folder as soon as it is built, so merely showing a script would
    leave an empty ``dask-logs/`` in the current directory. Only an empty folder this call
    created is removed; a real run creates it again when it submits jobs.
    """
    folder = Path(log_directory) if log_directory else None
    existed = folder is None or folder.exists()
    try:
        yield
    finally:
        if not existed and folder is not None and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def worker_environ() -> dict[str, Any]:
    """What Dask's nanny sets in a local worker's environment: less ``MALLOC_TRIM_THRESHOLD_``,
    plus the allocator tunable of :func:`glibc_tunables`.

    Dask sets that variable (65,536) so that workers hand freed memory back to the OS. Setting
    it also switches off glibc's dynamic mmap threshold, so every array of more than 128 KiB is
    mapped and unmapped, page by page, each time it is made. Measured here, in fresh processes:
    the pyramid of the 40x benchmark slide 15.5 s with it against 8.6 s without, and one ESPNet
    forward pass 13 % slower. This pipeline's memory is bounded by its blocks, not by leaks, so
    workers keep glibc's defaults. ``OMP_NUM_THREADS`` and the others stay (the infer task sets
    PyTorch's threads itself).
    """
    environ = dict(dask.config.get(NANNY_ENVIRON, default={}) or {})
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    environ["GLIBC_TUNABLES"] = glibc_tunables(environ.get("GLIBC_TUNABLES"))
    return environ


def glibc_tunables(current: str | None = None) -> str:
    """``current`` (a ``GLIBC_TUNABLES`` value; this process's when None) with
    :data:`WORKER_TUNABLES` added, unless it already sets that tunable (a user's own setting
    wins). The benchmarks run their network-only variants under it too."""
    current = os.environ.get("GLIBC_TUNABLES") if current is None else current
    if not current:
        return WORKER_TUNABLES
    return current if _TUNABLE in current else f"{current}:{WORKER_TUNABLES}"


def _jobqueue_options(options: dict[str, Any]) -> dict[str, Any]:
    """A job-queue profile's options with the workers' allocator tunable exported in the job
    script (after the profile's own prologue, which may already set one)."""
    line = (
        f'case ":${{GLIBC_TUNABLES:-}}:" in *:{_TUNABLE}=*) ;; '
        f'*) export GLIBC_TUNABLES="${{GLIBC_TUNABLES:+$GLIBC_TUNABLES:}}{WORKER_TUNABLES}" ;; esac'
    )
    return {**options, "job_script_prologue": [*options.get("job_script_prologue", []), line]}


def _make_cluster(
    profile: ClusterProfile, workers: int | None, threads: int | None
) -> LocalCluster | JobQueueCluster:
    if profile.is_local:
        options = dict(profile.options)
        if workers is not None:
            options["n_workers"] = workers
        if threads is not None:
            options["threads_per_worker"] = threads
        with dask.config.set({NANNY_ENVIRON: worker_environ()}):
            return LocalCluster(**options)
    if workers is not None or threads is not None:
        raise ConfigError(
            "workers/threads apply to local profiles; for a job queue use jobs or adapt, "
            "and set cores/processes in the profile",
            profile.path,
        )
    cls = JOBQUEUE_CLASSES[profile.kind]
    submit = cls.job_cls.submit_command
    if shutil.which(submit) is None:
        raise ClusterError(
            f"{submit!r} not found on PATH: run from a {profile.kind} login node, "
            "or start workers yourself and pass the scheduler address",
            profile.path,
        )
    try:
        return cls(**_jobqueue_options(profile.options))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid value for {cls.__name__}: {exc}", profile.path) from exc


@contextlib.contextmanager
def open_client(settings: ClusterSettings | SegmentSettings) -> Iterator[Client]:
    """The Dask client a run uses: a running scheduler, a cluster profile, or a LocalCluster.

    ``workers=0`` runs everything in this process (threads only), which makes a debugger and
    ``print`` work inside tasks. ``workers``/``threads`` override a local profile's.
    """
    if isinstance(settings, SegmentSettings):
        settings = settings.cluster_settings
    if settings.scheduler is not None:
        with connect_scheduler(settings.scheduler) as client:
            yield client
        return
    if settings.cluster is None and settings.workers == 0:
        with (
            LocalCluster(n_workers=1, threads_per_worker=settings.threads, processes=False) as cluster,
            Client(cluster) as client,
        ):
            yield client
        return
    profile = load_profile(settings.cluster or "local")
    local = {"workers": settings.workers, "threads": settings.threads} if profile.is_local else {}
    with start_cluster(profile, jobs=settings.jobs, adapt=settings.adapt, **local) as client:
        yield client


@contextlib.contextmanager
def connect_scheduler(address: str, timeout: float = 30.0) -> Iterator[Client]:
    """A client of the running Dask scheduler at ``address`` (waiting up to ``timeout`` seconds)."""
    try:
        client = Client(address, timeout=timeout)
    except OSError as exc:
        raise ClusterError(f"cannot reach the Dask scheduler at {address}: {exc}") from exc
    with client:
        yield client


@contextlib.contextmanager
def start_cluster(
    profile: ClusterProfile,
    jobs: int | None = None,
    adapt: tuple[int, int] | None = None,
    workers: int | None = None,
    threads: int | None = None,
) -> Iterator[Client]:
    """Start the profile's cluster and yield a client of it.

    * local profiles: a LocalCluster; ``workers``/``threads`` override the profile.
    * job queue profiles: submit ``jobs`` jobs (default: the profile's ``jobs``), or with
      ``adapt=(minimum_jobs, maximum_jobs)`` let Dask submit and cancel jobs as work comes and goes.

    Waits up to the profile's ``worker_timeout`` seconds for a first worker, so a queue that never
    starts our jobs fails with a message instead of hanging. Everything (client, scheduler, jobs)
    is closed on exit.
    """
    if adapt is not None:
        check_adapt(adapt)
    if jobs is not None and jobs < 1:
        raise ConfigError(f"jobs must be at least 1 (got {jobs})")
    if jobs is not None and adapt is not None:
        raise ConfigError("give a fixed number of jobs or adaptive scaling (adapt), not both")
    if profile.is_local and jobs is not None:
        raise ConfigError("jobs apply to job queue profiles; use workers for a local profile", profile.path)
    with contextlib.ExitStack() as stack:
        cluster = _make_cluster(profile, workers, threads)
        stack.callback(_close_cluster, cluster)
        if adapt is not None:
            if profile.is_local:
                cluster.adapt(minimum=adapt[0], maximum=adapt[1])
            else:
                cluster.adapt(minimum_jobs=adapt[0], maximum_jobs=adapt[1])
        elif not profile.is_local:
            cluster.scale(jobs=jobs or profile.jobs)
        client = stack.enter_context(Client(cluster))
        try:
            client.wait_for_workers(1, timeout=profile.worker_timeout)
        except TimeoutError as exc:
            raise ClusterError(_no_worker_message(profile, cluster), profile.path) from exc
        yield client


def _close_cluster(cluster: LocalCluster | JobQueueCluster) -> None:
    """Close the cluster, tolerating the one known close-time failure of a failed job submission.

    When the submit command fails (e.g. an unknown partition), the job object stays in status
    ``created`` and ``SpecCluster.close`` trips over an assertion after it has already closed the
    scheduler (dask/distributed#6183). Ignoring it keeps the user's error (no worker joined, with
    the submission error logged above) instead of an unrelated AssertionError.
    """
    with contextlib.suppress(AssertionError):
        cluster.close()


def _no_worker_message(profile: ClusterProfile, cluster: LocalCluster | JobQueueCluster) -> str:
    if profile.is_local:
        return f"no local Dask worker started within {profile.worker_timeout:g}s"
    logs = profile.options.get("log_directory") or "the job's working directory"
    return (
        f"no Dask worker joined within {profile.worker_timeout:g}s (scheduler {cluster.scheduler_address}); "
        f"see any submission error logged above, check the queue (jobs pending?) and the worker logs in "
        f"{logs}"
    )


def dashboard_link(client: Client) -> str:
    """Where to watch progress: the dashboard URL, or a note that the scheduler serves none.

    The URL's ``/status`` page needs ``bokeh`` in the scheduler's environment (not a dependency).
    """
    if "dashboard" not in client.scheduler_info(n_workers=0).get("services", {}):
        return "no dashboard (the scheduler runs without one)"
    return str(client.dashboard_link)
