#!/usr/bin/env bash
# A single-node SLURM cluster for testing the `slurm` profile, without systemd.
#
#   tests/slurm/cluster.sh install   apt-get the daemons if they are missing (root)
#   tests/slurm/cluster.sh start     install if needed, write the configs, start
#                                    munged, mariadbd, slurmdbd, slurmctld, slurmd
#   tests/slurm/cluster.sh status    exit 0 when the cluster accepts jobs
#   tests/slurm/cluster.sh stop      stop, by PID, every daemon that `start` started
#   tests/slurm/cluster.sh env       print `export SLURM_CONF=...` for your shell
#
# The cluster: one node `localhost` with two (fake) GPUs, two partitions on it,
# `cpu` (default) and `gpu`, accounting through slurmdbd + MariaDB so that
# `sacct` works. Everything (configs, state, logs, database, PID files) lives in
# $UNETFLOW_SLURM_DIR (default /tmp/unetflow-slurm); nothing is written to
# /etc/slurm. Clients find the cluster through SLURM_CONF=$UNETFLOW_SLURM_DIR/etc/slurm.conf
# or, without SLURM_CONF, through the symlink /run/slurm/conf -> $UNETFLOW_SLURM_DIR/etc.
# Non-default ports (1681x, 3307) keep it apart from any real SLURM or MySQL.
#
# The node advertises more CPUs and memory than the machine has
# (SlurmdParameters=config_overrides) so that the resource requests of the
# real profile fit; nothing is enforced (no cgroups).
set -euo pipefail

DIR=${UNETFLOW_SLURM_DIR:-/tmp/unetflow-slurm}
NODE_CPUS=${UNETFLOW_SLURM_NODE_CPUS:-32}
NODE_MEM_MB=${UNETFLOW_SLURM_NODE_MEM_MB:-128000}
CTLD_PORT=16817
SLURMD_PORT=16818
DBD_PORT=16819
DB_PORT=3307
DB_PASS=unetflow-test
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

ETC=$DIR/etc
RUN=$DIR/run
LOG=$DIR/log
export SLURM_CONF=$ETC/slurm.conf

die() {
    echo "cluster.sh: $*" >&2
    exit 1
}

# Print the last lines of a daemon's log, then fail.
fail_with_log() {
    local what=$1 logfile=$2
    echo "cluster.sh: $what failed to start; last lines of $logfile:" >&2
    tail -n 20 "$logfile" >&2 2>/dev/null || true
    exit 1
}

# wait_for SECONDS COMMAND...: run COMMAND every 0.2 s until it succeeds; fail after SECONDS.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

pid_alive() {
    [[ -s $RUN/$1.pid ]] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null
}

missing_packages() {
    local p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
    done
}

# apt-get install PACKAGES, running `apt-get update` first only when that fails (fresh
# machines have no package lists). Log: $DIR/apt.log.
apt_install() {
    local log=$DIR/apt.log
    apt-get install -y -q --no-install-recommends "$@" >"$log" 2>&1 && return 0
    apt-get update -q >>"$log" 2>&1 \
        && apt-get install -y -q --no-install-recommends "$@" >>"$log" 2>&1
}

cmd_install() {
    local missing
    missing=$(missing_packages)
    [[ -z $missing ]] && return 0
    ((EUID == 0)) || die "need root to install: $missing"
    command -v apt-get >/dev/null || die "apt-get not found; install by hand: $missing"
    mkdir -p "$DIR"
    echo "cluster.sh: installing" $missing >&2
    export DEBIAN_FRONTEND=noninteractive
    # Package scripts would start the daemons through invoke-rc.d: forbid that while we
    # install (we start them ourselves), unless a policy is already in place.
    local policy=/usr/sbin/policy-rc.d own_policy=false status=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=true
    fi
    # shellcheck disable=SC2086 # one word per package
    apt_install $missing || status=$?
    if $own_policy; then rm -f "$policy"; fi
    if ((status != 0)); then
        tail -n 20 "$DIR/apt.log" >&2
        die "apt-get install failed (log: $DIR/apt.log)"
    fi
}

write_configs() {
    mkdir -p "$ETC" "$RUN" "$LOG" "$DIR/state" "$DIR/spool"
    local host
    host=$(hostname -s)
    cat >"$ETC/slurm.conf" <<EOF
# Written by tests/slurm/cluster.sh
ClusterName=unetflow-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$RUN/slurmctld.daemon.pid
SlurmdPidFile=$RUN/slurmd.daemon.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
GresTypes=gpu
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
InactiveLimit=0
KillWait=10
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB Gres=gpu:2 State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost MaxTime=INFINITE State=UP
EOF
    # The GPUs are /dev/null and /dev/zero: jobs that ask for them get CUDA_VISIBLE_DEVICES
    # (0 or 0,1) and no device. Two, so that a train job with train.gpus: 2 can run.
    cat >"$ETC/gres.conf" <<EOF
NodeName=localhost Name=gpu File=/dev/null
NodeName=localhost Name=gpu File=/dev/zero
EOF
    cat >"$ETC/cgroup.conf" <<EOF
# Not used: ProctrackType=proctrack/linuxproc and TaskPlugin=task/none need no cgroups.
CgroupPlugin=autodetect
EOF
    cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.daemon.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$ETC/slurmdbd.conf"
    # Inside a job, snakemake's jobstep plugin calls `srun` with all SLURM_* variables
    # (SLURM_CONF too) removed. Clients without SLURM_CONF read /etc/slurm/slurm.conf,
    # else /run/slurm/conf/slurm.conf (where a configless slurmd caches its config).
    # Point the latter at ours.
    if [[ -e /etc/slurm/slurm.conf ]]; then
        die "/etc/slurm/slurm.conf exists: srun inside jobs would use that cluster, not this one"
    fi
    if [[ -e /run/slurm/conf && ! -L /run/slurm/conf ]]; then
        die "/run/slurm/conf exists and is not our symlink: is a configless slurmd running here?"
    fi
    mkdir -p /run/slurm && ln -sfn "$ETC" /run/slurm/conf
}

start_munged() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0 # a munged is already running (ours or the system's): use it
    fi
    [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    # munged forks itself; its PID lands in /run/munge/munged.pid.
    runuser -u munge -- /usr/sbin/munged --force >"$LOG/munged.out" 2>&1 \
        || fail_with_log munged "$LOG/munged.out"
    wait_for 10 bash -c 'munge -n </dev/null | unmunge' \
        || fail_with_log munged /var/log/munge/munged.log
    cp /run/munge/munged.pid "$RUN/munged.pid"
}

start_mariadbd() {
    pid_alive mariadbd && return 0
    local datadir=$DIR/mysql
    if [[ ! -d $datadir/mysql ]]; then
        mkdir -p "$datadir" && chown mysql:mysql "$datadir"
        mariadb-install-db --user=mysql --datadir="$datadir" --skip-test-db \
            --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 \
            || fail_with_log mariadb-install-db "$LOG/mariadb-install.log"
    fi
    chown mysql:mysql "$RUN" "$LOG"
    setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$datadir" \
        --socket="$RUN/mysqld.sock" --port=$DB_PORT --bind-address=127.0.0.1 \
        --skip-name-resolve --skip-log-bin --innodb-buffer-pool-size=32M \
        --log-error="$LOG/mariadbd.log" --pid-file="$RUN/mariadbd.daemon.pid" \
        </dev/null >/dev/null 2>&1 &
    echo $! >"$RUN/mariadbd.pid"
    wait_for 30 mariadb --no-defaults --socket="$RUN/mysqld.sock" -e 'select 1' \
        || fail_with_log mariadbd "$LOG/mariadbd.log"
    mariadb --no-defaults --socket="$RUN/mysqld.sock" <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
}

start_slurmdbd() {
    pid_alive slurmdbd && return 0
    setsid /usr/sbin/slurmdbd -D </dev/null >"$LOG/slurmdbd.out" 2>&1 &
    echo $! >"$RUN/slurmdbd.pid"
    # slurmdbd creates its tables on the first start; sacctmgr answers once it listens.
    wait_for 60 sacctmgr -n list cluster || fail_with_log slurmdbd "$LOG/slurmdbd.log"
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx unetflow-test; then
        sacctmgr -i add cluster unetflow-test >/dev/null
    fi
}

start_slurmctld() {
    pid_alive slurmctld && return 0
    setsid /usr/sbin/slurmctld -D -i </dev/null >"$LOG/slurmctld.out" 2>&1 &
    echo $! >"$RUN/slurmctld.pid"
    wait_for 30 scontrol ping || fail_with_log slurmctld "$LOG/slurmctld.log"
}

start_slurmd() {
    pid_alive slurmd && return 0
    setsid /usr/sbin/slurmd -D -N localhost </dev/null >"$LOG/slurmd.out" 2>&1 &
    echo $! >"$RUN/slurmd.pid"
}

node_ready() {
    local state
    state=$(sinfo -h -n localhost -o %T 2>/dev/null | head -n 1)
    [[ $state == idle* || $state == mixed* || $state == allocated* ]]
}

cmd_status() {
    pid_alive slurmctld && pid_alive slurmd && pid_alive slurmdbd && scontrol ping >/dev/null 2>&1 \
        && node_ready
}

cmd_start() {
    if cmd_status; then
        echo "cluster.sh: already running (SLURM_CONF=$SLURM_CONF)" >&2
        return 0
    fi
    ((EUID == 0)) || die "must run as root (the daemons run as root, munged as munge)"
    mkdir -p "$DIR"
    cmd_install
    write_configs
    start_munged
    start_mariadbd
    start_slurmdbd
    start_slurmctld
    start_slurmd
    if ! wait_for 30 node_ready; then
        sinfo -N -l >&2 || true
        fail_with_log slurmd "$LOG/slurmd.log"
    fi
    echo "cluster.sh: running; export SLURM_CONF=$SLURM_CONF" >&2
}

any_alive() {
    local pid
    for pid in "$@"; do
        kill -0 "$pid" 2>/dev/null && return 0
    done
    return 1
}

# stop_all NAME...: SIGTERM the PIDs that `start` recorded for NAME..., wait up
# to 10 s for them to exit, then SIGKILL those left.
stop_all() {
    local name pid pids=()
    for name in "$@"; do
        [[ -s $RUN/$name.pid ]] || continue
        pid=$(cat "$RUN/$name.pid")
        rm -f "$RUN/$name.pid"
        kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    done
    for _ in $(seq 50); do
        any_alive "${pids[@]}" || return 0
        sleep 0.2
    done
    for pid in "${pids[@]}"; do
        kill -KILL "$pid" 2>/dev/null && echo "cluster.sh: killed $pid with SIGKILL" >&2
    done
    return 0
}

cmd_stop() {
    # Running jobs would leave slurmstepd processes behind: cancel them first.
    if pid_alive slurmctld; then
        scancel --full --quiet --user root 2>/dev/null || true
    fi
    stop_all slurmd slurmctld slurmdbd
    stop_all mariadbd munged
    if [[ $(readlink /run/slurm/conf 2>/dev/null) == "$ETC" ]]; then
        rm -f /run/slurm/conf
    fi
}

case ${1:-} in
install) cmd_install ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
env) echo "export SLURM_CONF=$SLURM_CONF" ;;
*)
    echo "usage: $0 {install|start|status|stop|env}" >&2
    exit 2
    ;;
esac
