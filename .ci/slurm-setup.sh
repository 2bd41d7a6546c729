#!/usr/bin/env bash
# Single-node SLURM for CI and laptops: controller, compute daemon and munge on this host.
#
# Why: tests/test_slurm.py proves that configs/clusters/slurm.yaml really submits Dask workers as
# SLURM jobs. Debian's slurm-wlm is enough; no slurmdbd is needed because finished jobs are
# logged by jobcomp/filetxt (JOBCOMP_LOG below) and stay visible to `scontrol show job` for
# MinJobAge seconds.
#
# Idempotent: safe to run again; daemons already running with an unchanged config are left alone.
# Run as root (containers without systemd are fine: the daemons are started directly).
# Usage: sudo .ci/slurm-setup.sh      (env SLURM_WAIT_S=60 bounds the wait for an idle node)
set -euo pipefail

WAIT_S="${SLURM_WAIT_S:-60}"
CONF=/etc/slurm/slurm.conf
JOBCOMP_LOG=/var/log/slurm/jobcomp.log

die() { echo "slurm-setup: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and starts system daemons)"

# --- packages --------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# --- munge: authentication between the slurm daemons and the client commands -----------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! munge -n >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 1 20); do munge -n >/dev/null 2>&1 && break; sleep 0.5; done
    munge -n >/dev/null 2>&1 || die "munged did not start (see /var/log/munge/munged.log)"
fi

# --- slurm.conf for this host -----------------------------------------------------------------
HOST="$(hostname -s)"
CPUS="$(nproc)"
MEM_MB="$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)"
install -d -m 0755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm

NEW_CONF="$(mktemp)"
trap 'rm -f "$NEW_CONF"' EXIT
cat >"$NEW_CONF" <<EOF
# Written by .ci/slurm-setup.sh: a single-node cluster on ${HOST}.
ClusterName=wsi-espnet-ci
# The address makes the controller reachable even where the host name does not resolve.
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Plain process tracking: no cgroups, so it also runs inside containers.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# No slurmdbd: finished jobs go to a job-completion log, and stay in scontrol for MinJobAge s.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=${JOBCOMP_LOG}
MinJobAge=600
ReturnToService=2
SchedulerType=sched/backfill
MpiDefault=none
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
EOF

CHANGED=0
if ! cmp -s "$NEW_CONF" "$CONF"; then
    install -m 0644 "$NEW_CONF" "$CONF"
    CHANGED=1
fi

# --- daemons ----------------------------------------------------------------------------------
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop() {  # stop the daemon recorded in pid file $1 (only that process), wait until it is gone
    if running "$1"; then
        kill "$(cat "$1")"
        for _ in $(seq 1 20); do running "$1" || break; sleep 0.5; done
    fi
}
if [ "$CHANGED" -eq 1 ]; then
    stop /run/slurm/slurmd.pid
    stop /run/slurm/slurmctld.pid
fi
running /run/slurm/slurmctld.pid || slurmctld
running /run/slurm/slurmd.pid || slurmd

# --- wait until the node accepts jobs ---------------------------------------------------------
deadline=$((SECONDS + WAIT_S))
state=""
while [ "$SECONDS" -lt "$deadline" ]; do
    state="$(sinfo --noheader --nodes="$HOST" --format=%T 2>/dev/null | head -n1 || true)"
    case "$state" in
        idle | mixed | allocated) echo "slurm-setup: node ${HOST} is ${state} (${CPUS} CPUs, ${MEM_MB} MB)"; exit 0 ;;
        down* | drain*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1
done
die "node ${HOST} not idle after ${WAIT_S}s (state: '${state:-no answer}'); see /var/log/slurm/slurmctld.log and slurmd.log"
