"""Segment every slide listed in a cohort manifest, on any cluster profile.

The manifest is a CSV with a ``slide`` column (paths relative to the CSV are fine) and an
optional ``slide_mpp`` column for slides whose files carry no resolution. Copy this file and
change what your study needs (filtering slides, other settings, post-processing the results).

    python workflows/segment_cohort.py cohort.csv results/ --cluster slurm-gpu --jobs 4
    python workflows/segment_cohort.py cohort.csv results/ --cluster local      # this machine

Results go to ``results/<slide>/`` and ``results/summary.csv``; re-running resumes
interrupted slides and skips finished ones.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wsi_espnet.cluster import dashboard_link, load_profile, open_client
from wsi_espnet.config import ClusterSettings, load_settings, parse_adapt
from wsi_espnet.errors import WsiEspnetError
from wsi_espnet.pipeline import segment_slides
from wsi_espnet.runstate import read_manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path, help="CSV with a 'slide' column, optional 'slide_mpp'")
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--cluster", default="local", help="profile name or YAML path [local]")
    parser.add_argument("--jobs", type=int, help="batch jobs to submit (job-queue profiles)")
    parser.add_argument("--adapt", type=parse_adapt, help="MIN:MAX jobs, scaled with the work left")
    parser.add_argument("--config", type=Path, help="segment settings YAML (same keys as the CLI options)")
    args = parser.parse_args(argv)

    try:
        jobs = read_manifest(args.manifest)
        settings = load_settings(args.config)
        profile = load_profile(args.cluster)
        # The profile decides workers and threads; a job count only applies to job queues.
        cluster = ClusterSettings(
            str(profile.path),
            workers=None,
            threads=None,
            jobs=None if profile.is_local else args.jobs,
            adapt=args.adapt,
        )
        with open_client(cluster) as client:
            print(f"{len(jobs)} slides on profile {profile.name!r}; dashboard: {dashboard_link(client)}")
            results = segment_slides(jobs, args.outdir, settings, client)
    except WsiEspnetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failed = [r for r in results if r.status == "failed"]
    for result in failed:
        print(f"failed: {result.error}", file=sys.stderr)
    print(f"{len(results) - len(failed)}/{len(results)} slides done; see {args.outdir / 'summary.csv'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
