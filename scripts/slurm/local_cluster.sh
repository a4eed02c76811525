#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for the `slurm`-marked tests and for trying the
# study tool's `--launcher slurm` without a real cluster. Everything lives in one folder.
#
#   sudo apt-get install -y slurm-wlm munge          # Debian/Ubuntu packages (slurmctld, slurmd, munged)
#   eval "$(scripts/slurm/local_cluster.sh start)"   # prints `export SLURM_CONF=...`; sinfo, sbatch work
#   scripts/slurm/local_cluster.sh stop              # stops the daemons, removes the folder
#
# Environment: S4MC_SLURM_DIR (default /tmp/s4mc_slurm), S4MC_SLURM_CPUS (default: all of this
# machine's CPUs, in one partition `debug`), S4MC_SLURM_PORT (slurmctld's port; slurmd gets the next).
# Runs as root (slurmd must); jobs run as the submitting user. Not a production set-up: no
# accounting, no cgroups (process groups track the tasks), munge with a key of its own.
set -euo pipefail

DIR=${S4MC_SLURM_DIR:-/tmp/s4mc_slurm}
# getconf, not nproc: nproc follows OMP_NUM_THREADS, which the tests set to 1
CPUS=${S4MC_SLURM_CPUS:-$(getconf _NPROCESSORS_ONLN)}
PORT=${S4MC_SLURM_PORT:-6817}
NODE=$(hostname -s)

need() {
    for cmd in "$@"; do
        command -v "$cmd" >/dev/null || { echo "error: $cmd not found (apt-get install -y slurm-wlm munge)" >&2; exit 2; }
    done
}

stop() {
    for daemon in slurmd slurmctld munged; do
        if [[ -f "$DIR/$daemon.pid" ]]; then
            pid=$(cat "$DIR/$daemon.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
    rm -rf "$DIR"
}

start() {
    need munged mungekey slurmctld slurmd sinfo
    if [[ -f "$DIR/slurmctld.pid" ]] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
        echo "export SLURM_CONF=$DIR/slurm.conf"
        return
    fi
    rm -rf "$DIR"
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    chmod 755 "$DIR"
    mungekey --create --keyfile "$DIR/munge.key" --force 2>/dev/null
    chmod 600 "$DIR/munge.key"
    munged --key-file "$DIR/munge.key" --socket "$DIR/munge.socket" --pid-file "$DIR/munged.pid" \
        --log-file "$DIR/log/munged.log" --seed-file "$DIR/munge.seed" --force
    cat >"$DIR/slurm.conf" <<EOF
ClusterName=s4mc-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again this many seconds later (default 120; the tests requeue).
AuthInfo=socket=$DIR/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# A job past its time limit is killed this many seconds after the TERM (the run's save needs them).
KillWait=30
# The tests requeue jobs: let a requeued job start again at once.
SchedulerParameters=bf_interval=1,sched_interval=2,sched_min_interval=100000
MinJobAge=600
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF=$DIR/slurm.conf
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF"
    for _ in $(seq 100); do
        if sinfo -h -o %T 2>/dev/null | grep -qE '^idle'; then
            echo "export SLURM_CONF=$DIR/slurm.conf"
            return
        fi
        sleep 0.2
    done
    echo "error: the node did not come up in 20 s; see $DIR/log/" >&2
    exit 1
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
