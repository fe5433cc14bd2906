#!/usr/bin/env bash
# Bring up a one-node SLURM cluster on localhost (Debian 12, root, no systemd, no cgroups) for
# tests/test_cluster.py:   munged -> slurmctld -> slurmd -N localhost
#
#   sudo tests/slurm/start-slurm.sh        # installs munge + slurm from Debian if missing, ~20 s once installed
#   tests/slurm/stop-slurm.sh              # stops every daemon by its PID file
#
# Idempotent: installs missing packages, (re)writes /etc/slurm/slurm.conf and gres.conf, starts only
# daemons that are not running (PID file + /proc/PID/comm), restarts them when the config changed.
# No accounting database: sacct does not work here, the profiles poll with squeue.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ "$(id -u)" = 0 ] || { echo "start-slurm.sh: must run as root (it installs packages and starts daemons)" >&2; exit 1; }
log() { echo "[start-slurm] $*"; }

# ---------------------------------------------------------------- packages
missing=""
for p in munge slurmctld slurmd slurm-client; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
    log "installing:$missing"
    apt-get update -qq
    # postinst scripts try to start services; without systemd invoke-rc.d refuses, which is harmless
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# ---------------------------------------------------------------- helpers
running() {  # running PIDFILE COMM: the PID file names a live process with that command name
    local pf=$1 comm=$2 pid
    [ -s "$pf" ] || return 1
    pid=$(cat "$pf")
    [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$comm" ]
}
wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
    local t=$1 what=$2; shift 2
    for _ in $(seq 1 "$t"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
    echo "start-slurm.sh: timeout after ${t}s waiting for $what" >&2; return 1
}

mkdir -p /run/munge /run/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /var/log/munge /var/lib/munge /etc/slurm
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 755 /run/munge

# ---------------------------------------------------------------- munge
if [ ! -s /etc/munge/munge.key ]; then   # Debian's postinst normally creates it
    log "creating munge key"
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
if ! running /run/munge/munged.pid munged; then
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged --force
fi
wait_for 20 munge bash -c 'munge -n | unmunge'

# ---------------------------------------------------------------- slurm.conf + gres.conf
MEM_MB=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)
REALMEM=$(( MEM_MB * 95 / 100 ))   # a bit under the real memory, else the node is drained
# CPUs/Boards/Sockets/Cores/Threads exactly as slurmd detects them (else "Low socket*core*thread count")
NODE_HW=$(slurmd -C 2>/dev/null | head -1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ *RealMemory=[0-9]*//' -e 's/ *Gres=[^ ]*//')
new_conf=$(sed -e "s#@NODE_HW@#$NODE_HW#" -e "s#@REALMEM@#$REALMEM#" "$HERE/slurm.conf.in")
# Two fake GPUs: character devices aliasing /dev/null (slurmd drops GPUs without device files). With
# TaskPlugin=task/none nothing opens them; SLURM only counts and allocates them (CUDA_VISIBLE_DEVICES).
mkdir -p /run/slurm/fake-gpu
for i in 0 1; do [ -c /run/slurm/fake-gpu/gpu$i ] || mknod /run/slurm/fake-gpu/gpu$i c 1 3; done
new_gres="NodeName=localhost Name=gpu File=/run/slurm/fake-gpu/gpu[0-1]"
changed=0
if [ ! -f /etc/slurm/slurm.conf ] || [ "$new_conf" != "$(cat /etc/slurm/slurm.conf)" ]; then
    log "writing /etc/slurm/slurm.conf"
    printf '%s\n' "$new_conf" > /etc/slurm/slurm.conf
    changed=1
fi
if [ ! -f /etc/slurm/gres.conf ] || [ "$new_gres" != "$(cat /etc/slurm/gres.conf)" ]; then
    printf '%s\n' "$new_gres" > /etc/slurm/gres.conf
    changed=1
fi
if [ "$changed" = 1 ]; then
    for d in slurmd slurmctld; do   # restart what runs with the old config
        if running /run/slurm/$d.pid $d; then
            log "config changed: stopping $d"
            pid=$(cat /run/slurm/$d.pid); kill "$pid"
            for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        fi
    done
fi

# ---------------------------------------------------------------- slurmctld + slurmd
if ! running /run/slurm/slurmctld.pid slurmctld; then
    log "starting slurmctld"
    /usr/sbin/slurmctld
fi
wait_for 30 slurmctld bash -c 'scontrol ping | grep -q UP'
if ! running /run/slurm/slurmd.pid slurmd; then
    log "starting slurmd"
    /usr/sbin/slurmd -N localhost   # -N: the node name is not `hostname`
fi
# the node must register; resume it if an unclean restart left it down or drained
state=""
for _ in $(seq 1 30); do
    state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|drained*) scontrol update NodeName=localhost State=RESUME 2>/dev/null || true ;;
    esac
    sleep 1
done
case "$state" in
    idle|mixed|allocated|completing) ;;
    *) echo "start-slurm.sh: node 'localhost' is '$state' (see /var/log/slurm/slurmd.log)" >&2; exit 1 ;;
esac
log "cluster up:"
sinfo -o '%P %a %l %D %T %N %G'
