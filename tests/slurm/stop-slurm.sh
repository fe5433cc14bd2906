#!/usr/bin/env bash
# Stop the cluster started by tests/slurm/start-slurm.sh, by PID file only (never by process name).
# Order: cancel jobs (else slurmstepd processes outlive slurmd) -> slurmd -> slurmctld -> munged.
#   tests/slurm/stop-slurm.sh [--purge]    # --purge also wipes job state so the next start is fresh
set -uo pipefail
log() { echo "[stop-slurm] $*"; }
PURGE=0; [ "${1:-}" = "--purge" ] && PURGE=1

running() {
    local pf=$1 comm=$2 pid
    [ -s "$pf" ] || return 1
    pid=$(cat "$pf")
    [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$comm" ]
}
stop_pidfile() {  # stop_pidfile PIDFILE COMM
    local pf=$1 comm=$2 pid
    if running "$pf" "$comm"; then
        pid=$(cat "$pf")
        log "stopping $comm (pid $pid)"
        kill -TERM "$pid"
        for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$pid" 2>/dev/null; then log "$comm did not exit, SIGKILL"; kill -KILL "$pid"; fi
    else
        log "$comm not running"
    fi
    rm -f "$pf"
}

if running /run/slurm/slurmctld.pid slurmctld; then
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
        log "cancelling jobs: $(echo $jobs)"
        scancel $jobs || true
        for _ in $(seq 1 30); do
            [ -z "$(squeue -h -t R,CG,PD -o %i 2>/dev/null)" ] && break; sleep 1
        done
    fi
fi
stop_pidfile /run/slurm/slurmd.pid slurmd
stop_pidfile /run/slurm/slurmctld.pid slurmctld
stop_pidfile /run/munge/munged.pid munged
# With the controller gone, every SLURM client call (`scontrol show config`, which snakemake-executor-plugin-slurm
# 2.8.0 runs whenever Snakemake starts, even for a local run) retries for MessageTimeout - 1 seconds: 9 s by
# default, per snakemake process. Our own conf (never anyone else's) gets MessageTimeout=1, so they fail at once;
# start-slurm.sh renders the conf afresh, without it. tests/test_cluster.py -m "not slurm" after a stop: 250 s -> 52 s.
CONF=/etc/slurm/slurm.conf
if [ -f "$CONF" ] && head -n 1 "$CONF" | grep -q "for tunelens' cluster tests" && ! grep -q '^MessageTimeout=1$' "$CONF"; then
    printf '%s\n' "# appended by tests/slurm/stop-slurm.sh: the cluster is stopped, clients fail at once" \
        "MessageTimeout=1" >> "$CONF"
    log "client calls fail at once while stopped (MessageTimeout=1 in $CONF)"
fi
if [ "$PURGE" = 1 ]; then
    log "purging job state"
    rm -rf /var/spool/slurmctld/* /var/spool/slurmd/*
fi
log "done"
