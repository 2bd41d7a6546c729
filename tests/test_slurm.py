"""Dask workers as real SLURM jobs, through the shipped ``slurm`` profile.

Needs a SLURM controller and an idle node: ``sudo .ci/slurm-setup.sh`` makes a single-node one.
Without it these tests skip, unless ``WSI_ESPNET_REQUIRE_SLURM=1`` (set in CI) turns the skip
into a failure so a broken SLURM setup cannot pass unnoticed.
"""

from __future__ import annotations

import operator
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from wsi_espnet.cluster import ClusterError, load_profile, start_cluster

pytestmark = pytest.mark.slurm

READY_STATES = {"idle", "mixed", "allocated"}


def _slurm_unavailable(reason: str) -> None:
    if os.environ.get("WSI_ESPNET_REQUIRE_SLURM") == "1":
        pytest.fail(f"WSI_ESPNET_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(f"{reason} (run `sudo .ci/slurm-setup.sh` for a single-node SLURM)")


@pytest.fixture(scope="session")
def slurm_available() -> str:
    """The default partition of a SLURM controller that answers and has a node ready for jobs.

    Skips when there is none (fails under ``WSI_ESPNET_REQUIRE_SLURM=1``). Use it in any test
    that submits SLURM jobs, e.g. the end-to-end ``segment`` run on the ``slurm`` profile.
    """
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        _slurm_unavailable("SLURM client commands (sinfo, sbatch) are not installed")
    try:
        answer = subprocess.run(
            ["sinfo", "--noheader", "--format=%P %t"], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        _slurm_unavailable("no SLURM controller answered `sinfo` within 20 s")
    if answer.returncode != 0:
        _slurm_unavailable(f"no SLURM controller answers: {answer.stderr.strip()}")
    rows = [line.split() for line in answer.stdout.splitlines() if line.strip()]
    ready = [
        (partition, state) for partition, state in rows if state.rstrip("*~#") in {"idle", "mix", "alloc"}
    ]
    if not ready:
        _slurm_unavailable(f"no SLURM node is ready for jobs (sinfo: {answer.stdout.strip() or 'empty'})")
    default = next((p for p, _ in ready if p.endswith("*")), ready[0][0])
    return default.rstrip("*")


def _squeue(job_ids: set[str]) -> dict[str, tuple[str, str]]:
    """job id -> (state, job name) for those of ``job_ids`` SLURM still lists."""
    out = subprocess.run(
        ["squeue", "--noheader", "--format=%i %T %j", f"--jobs={','.join(sorted(job_ids))}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return {job: (state, name) for job, state, name in (line.split() for line in out.splitlines())}


def test_slurm_profile_runs_tasks_in_two_slurm_jobs(
    slurm_available: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the profile's log_directory is relative to where we run
    profile = load_profile("slurm")
    with start_cluster(profile, jobs=2) as client:
        client.wait_for_workers(2, timeout=profile.worker_timeout)
        workers = sorted(client.scheduler_info()["workers"])
        # Each task reports the SLURM job it runs in: proof that the work ran inside SLURM jobs.
        seen = {
            client.submit(os.getenv, "SLURM_JOB_ID", workers=[address], pure=False).result()
            for address in workers
        }
        submitted = {job.job_id for job in client.cluster.workers.values()}
        assert len(seen) == 2
        assert seen == submitted
        assert _squeue(seen) == {job: ("RUNNING", "wsi-espnet-worker") for job in seen}
        squares = client.gather(client.map(operator.mul, range(50), range(50)))
        assert sum(squares) == sum(i * i for i in range(50))
    # Leaving the context cancels the jobs.
    deadline = time.monotonic() + 30
    while _squeue(seen) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _squeue(seen) == {}
    assert {p.name for p in (tmp_path / "dask-logs").iterdir()} >= {
        f"wsi-espnet-worker-{job}.err" for job in seen
    }


def test_unusable_partition_fails_with_a_clear_error(slurm_available: str, tmp_path: Path) -> None:
    profile_path = tmp_path / "nowhere.yaml"
    profile_path.write_text(
        "kind: slurm\ncores: 1\nmemory: 1GB\nqueue: no-such-partition\nworker_timeout: 5\n"
        f"log_directory: {tmp_path / 'logs'}\n",
        encoding="utf-8",
    )
    with (
        pytest.raises(ClusterError, match=r"no Dask worker joined within 5s"),
        start_cluster(load_profile(profile_path)),
    ):
        pass


def test_segment_on_slurm_matches_local_and_isolates_a_corrupt_slide(
    slurm_available: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tissue_card: Path
) -> None:
    """Three slides, one corrupt, on two SLURM worker jobs: same labels as a LocalCluster run."""
    import csv
    import json

    import numpy as np
    from click.testing import CliRunner

    from wsi_espnet.cli import main
    from wsi_espnet.sample import write_sample_slide
    from wsi_espnet.store import SlideStore

    monkeypatch.chdir(tmp_path)
    slides = [
        write_sample_slide(tmp_path / f"case-{i}.tif", 1536, 1024, mpp=0.5, tissue_fraction=0.4, seed=i)
        for i in range(2)
    ]
    corrupt = tmp_path / "case-bad.svs"
    corrupt.write_bytes(slides[0].read_bytes()[:4096])
    common = ["--model", str(tissue_card), "--tile", "256", "--halo", "64", "--formats", "geojson", "-q"]
    timings = {}
    for name, extra in {"slurm": ["--cluster", "slurm", "--jobs", "2"], "local": ["--workers", "1"]}.items():
        start = time.perf_counter()
        result = CliRunner().invoke(
            main, ["segment", *map(str, [*slides, corrupt]), "-o", str(tmp_path / name), *common, *extra]
        )
        timings[name] = time.perf_counter() - start
        assert result.exit_code == 1, result.output  # one slide failed
        with open(tmp_path / name / "summary.csv") as fh:
            status = {Path(row["slide"]).name: row for row in csv.DictReader(fh)}
        assert (
            status["case-bad.svs"]["status"] == "failed" and "case-bad.svs" in status["case-bad.svs"]["error"]
        )
        for slide in slides:
            assert status[slide.name]["status"] == "done"
            run = json.loads((tmp_path / name / slide.stem / "run.json").read_text())
            assert run["status"] == "complete"
    for slide in slides:
        slurm = SlideStore.open(tmp_path / "slurm" / slide.stem / f"{slide.stem}.ome.zarr").labels(0)[:]
        local = SlideStore.open(tmp_path / "local" / slide.stem / f"{slide.stem}.ome.zarr").labels(0)[:]
        np.testing.assert_array_equal(slurm, local)
    # Proof that SLURM ran the work: the worker jobs' own logs, named by job id (%j).
    logs = sorted((tmp_path / "dask-logs").glob("*.err"))
    assert len(logs) >= 2, logs
    assert any("Start worker" in log.read_text() for log in logs)
    print(f"3-slide wall time: SLURM {timings['slurm']:.1f} s, LocalCluster {timings['local']:.1f} s")
