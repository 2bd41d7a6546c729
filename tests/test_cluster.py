"""Cluster profiles: shipped YAML files, job scripts per scheduler, user errors, a real LocalCluster."""

from __future__ import annotations

import operator
import os
from pathlib import Path

import pytest

from wsi_espnet.cluster import (
    ClusterError,
    connect_scheduler,
    dashboard_link,
    job_script,
    list_profiles,
    load_profile,
    start_cluster,
)
from wsi_espnet.errors import ConfigError
from wsi_espnet.resources import config_dir

SHIPPED = {"local", "slurm", "slurm-gpu", "pbs", "lsf", "sge"}


def write(tmp_path: Path, text: str, name: str = "site.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_config_dir_holds_the_shipped_profiles() -> None:
    assert (config_dir() / "clusters" / "local.yaml").is_file()
    profiles = {p.name: p for p in list_profiles()}
    assert set(profiles) >= SHIPPED
    assert all(p.description for p in profiles.values())
    assert profiles["slurm-gpu"].kind == "slurm"


@pytest.mark.parametrize(
    ("name", "directives"),
    [
        ("slurm", ["#SBATCH -t 00:30:00", "#SBATCH --mem=4G", "#SBATCH --cpus-per-task=1"]),
        ("slurm-gpu", ["#SBATCH --gres=gpu:1", "#SBATCH -p gpu", "export OMP_NUM_THREADS=8"]),
        ("pbs", ["#PBS -l walltime=02:00:00", "#PBS -l select=1:ncpus=8:mem=32GB"]),
        ("lsf", ["#BSUB -W 02:00", "#BSUB -n 8", "#BSUB -M 32000"]),
        ("sge", ["#$ -l h_rt=02:00:00", "#$ -pe smp 8"]),
    ],
)
def test_job_script_has_the_scheduler_directives(name: str, directives: list[str]) -> None:
    script = job_script(load_profile(name))
    for line in directives:
        assert line in script.splitlines(), f"{line!r} missing from the {name} job script"
    assert "-m distributed.cli.dask_worker" in script
    lines = script.splitlines()
    tunables = next(i for i, line in enumerate(lines) if "glibc.malloc.hugetlb=1" in line)
    assert tunables < next(i for i, line in enumerate(lines) if "dask_worker" in line)


def test_job_script_tunable_line_keeps_a_users_setting() -> None:
    """The job script's allocator line adds the tunable, or leaves a user's own value alone."""
    import subprocess

    line = next(ln for ln in job_script(load_profile("slurm")).splitlines() if "GLIBC_TUNABLES" in ln)
    show = f'{line}\nprintf %s "$GLIBC_TUNABLES"'
    for before, after in [
        (None, "glibc.malloc.hugetlb=1"),
        ("glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
        ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=0"),
    ]:
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        env |= {"GLIBC_TUNABLES": before} if before else {}
        out = subprocess.run(["bash", "-c", show], env=env, capture_output=True, text=True, check=True)
        assert out.stdout == after


def test_gpu_profile_workers_advertise_a_gpu_resource() -> None:
    worker_command = next(
        line for line in job_script(load_profile("slurm-gpu")).splitlines() if "dask_worker" in line
    )
    assert "--resources GPU=1" in worker_command
    assert "--lifetime" in worker_command  # leaves before the walltime kills the job


def test_local_profile_has_no_job_script() -> None:
    assert "no job script" in job_script(load_profile("local"))


def test_profile_by_path_and_own_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "kind: slurm\ncores: 2\nmemory: 2GB\njobs: 3\nworker_timeout: 5\nqueue: null\n")
    profile = load_profile(path)
    assert (profile.name, profile.kind, profile.jobs, profile.worker_timeout) == ("site", "slurm", 3, 5.0)
    assert profile.options == {"cores": 2, "memory": "2GB"}  # own keys and nulls are not passed on


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: slurm\ncores: [1\n", "invalid YAML at line"),
        ("- kind: slurm\n", "must be a YAML mapping"),
        ("cores: 1\n", "key 'kind' must be one of"),
        ("kind: kubernetes\n", "key 'kind' must be one of"),
        (
            "kind: slurm\ncores: 1\nmemory: 1GB\ncoers: 2\n",
            "unknown key 'coers' for a slurm profile; did you mean 'cores'",
        ),
        ("kind: local\nqueue: gpu\n", "unknown key 'queue' for a local profile"),
        ("kind: pbs\ncores: 1\nmemory: 1GB\njob_extra: ['-l x']\n", "use job_extra_directives"),
        ("kind: slurm\nhost: 127.0.0.1\n", "use scheduler_options: {host: ...}"),
        (
            "kind: slurm\njob_extra_directives: --gres=gpu:1\n",
            "'job_extra_directives' must be a list of strings",
        ),
        ("kind: slurm\njobs: 0\n", "'jobs' must be a positive integer"),
        ("kind: slurm\nscheduler_options: 127.0.0.1\n", "'scheduler_options' must be a mapping"),
    ],
)
def test_bad_profiles_name_the_file_and_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_missing_file_and_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cluster profile file not found"):
        load_profile(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"unknown cluster profile 'nope' \(known: .*slurm-gpu"):
        load_profile("nope")


def test_bad_value_is_reported_when_the_job_is_built(tmp_path: Path) -> None:
    profile = load_profile(write(tmp_path, "kind: slurm\ncores: 1\n"))  # memory missing
    with pytest.raises(ConfigError, match="You must specify how much cores and memory"):
        job_script(profile)


def test_missing_submit_command_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ClusterError, match="'qsub' not found on PATH"), start_cluster(load_profile("pbs")):
        pass


def test_options_that_do_not_fit_the_profile_kind() -> None:
    with (
        pytest.raises(ConfigError, match="jobs apply to job queue profiles"),
        start_cluster(load_profile("local"), jobs=2),
    ):
        pass
    with (
        pytest.raises(ConfigError, match="workers/threads apply to local profiles"),
        start_cluster(load_profile("slurm"), workers=2),
    ):
        pass
    with pytest.raises(ConfigError, match="adapt needs"), start_cluster(load_profile("local"), adapt=(3, 1)):
        pass
    with (
        pytest.raises(ConfigError, match="not both"),
        start_cluster(load_profile("slurm"), jobs=2, adapt=(1, 2)),
    ):
        pass


def _transparent_huge_pages() -> str:
    """The kernel's THP mode (``always``, ``madvise``, ``never``; empty where unknown)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return ""
    return text.split("[")[1].split("]")[0] if "[" in text else ""


def _huge_page_kib() -> int:
    """KiB of huge pages behind this process's memory while it holds a 256 MB array: more than
    0 only if glibc read the tunable when the process started."""
    import numpy as np

    array = np.ones(2**28, np.uint8)
    rollup = Path("/proc/self/smaps_rollup").read_text().splitlines()
    kib = sum(int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages"))
    del array
    return kib


def test_local_cluster_from_local_yaml_runs_tasks() -> None:
    with start_cluster(load_profile("local"), workers=1, threads=2) as client:
        info = client.scheduler_info()
        assert len(info["workers"]) == 1
        assert next(iter(info["workers"].values()))["nthreads"] == 2
        assert client.submit(operator.mul, 6, 7).result() == 42
        # Workers keep glibc's allocator defaults (Dask's MALLOC_TRIM_THRESHOLD_ made numpy
        # 2x slower there) and Dask's thread caps.
        environ = client.submit(lambda: dict(os.environ), pure=False).result()
        assert "MALLOC_TRIM_THRESHOLD_" not in environ and environ.get("OMP_NUM_THREADS") == "1"
        assert "glibc.malloc.hugetlb=1" in environ["GLIBC_TUNABLES"]
        if _transparent_huge_pages() == "madvise":  # only glibc's madvise can give huge pages
            assert client.submit(_huge_page_kib, pure=False).result() > 0
        assert isinstance(dashboard_link(client), str)
        # A second client attaches to the running scheduler by address (--scheduler-address).
        with connect_scheduler(client.scheduler.address) as attached:
            assert attached.submit(operator.add, 1, 2).result() == 3
    assert client.status == "closed"


def test_unreachable_scheduler_address_is_a_clear_error() -> None:
    with (
        pytest.raises(ClusterError, match=r"cannot reach the Dask scheduler at tcp://127\.0\.0\.1:9"),
        connect_scheduler("tcp://127.0.0.1:9", timeout=1),
    ):
        pass
