#!/usr/bin/env bash
# Segment a cohort from one small "driver" SLURM job; the GPU work runs in worker jobs.
#
#   sbatch workflows/sbatch_segment.sh cohort.csv results/
#   CLUSTER=my-site.yaml ADAPT=2:16 CONFIG=settings.yaml sbatch workflows/sbatch_segment.sh cohort.csv results/
#
# How it works: this job runs the Dask scheduler and the wsi-espnet client (little CPU and memory,
# long walltime). dask-jobqueue, driven by the cluster profile (default configs/clusters/slurm-gpu.yaml),
# submits the GPU worker jobs with sbatch from inside this job; they connect back to the scheduler
# here, and are cancelled when the run ends. With --adapt, jobs are added while slides are waiting
# and released when the queue of work empties. Your site must allow sbatch from compute nodes
# (most do); otherwise run the same wsi-espnet command on a login node inside tmux/screen.
#
# Resuming: if this job hits its walltime, submit the same command again; finished slides are
# skipped and interrupted ones continue from their last finished chunks.
#
#SBATCH --job-name=wsi-espnet-driver
#SBATCH --cpus-per-task=2
#SBATCH --mem=8G
#SBATCH --time=24:00:00
#SBATCH --output=wsi-espnet-driver-%j.out
# Five minutes before the walltime, SIGINT wsi-espnet (B: the batch shell, which exec makes
# wsi-espnet itself): it stops cleanly, leaves every store resumable and cancels its worker jobs.
#SBATCH --signal=B:INT@300
set -euo pipefail

usage="usage: [CLUSTER=profile] [ADAPT=min:max] [CONFIG=settings.yaml] sbatch $0 MANIFEST.csv OUTDIR"
MANIFEST="${1:?$usage}"
OUTDIR="${2:?$usage}"
CLUSTER="${CLUSTER:-slurm-gpu}"   # profile name or YAML path; see `wsi-espnet cluster show $CLUSTER`
ADAPT="${ADAPT:-1:8}"             # between 1 and 8 GPU worker jobs at a time

# Site setup: the worker jobs run the same Python as this job (the profile's `python` key
# defaults to it), so activate the environment that has wsi-espnet installed, e.g.:
# module load python/3.11 cuda/12.4
# source ~/venvs/wsi-espnet/bin/activate

echo "driver job ${SLURM_JOB_ID:-?} on $(hostname): profile ${CLUSTER}, adapt ${ADAPT}"
exec wsi-espnet segment --manifest "$MANIFEST" --output "$OUTDIR" --cluster "$CLUSTER" --adapt "$ADAPT" \
    ${CONFIG:+--config "$CONFIG"}
