#!/usr/bin/env bash
# start-local-slurm.sh - a one-node SLURM cluster on localhost, for tests/test_slurm.py and CI: two partitions
# like a user's cluster, `cpu` (default) and `gpu` (with fake GPUs: /dev/null copies as GRES devices), each with a
# time limit; accounting of gres/gpu so that sacct's AllocTRES shows which jobs got a GPU.
# Adapted from a verified recipe (Debian 12 bookworm: SLURM 22.05.8, munge 0.5.15, MariaDB 10.11);
# the project carries its own copy so that nothing outside the checkout is needed at run time.
# Must run as root. Needs neither systemd nor cgroups.
#
# Usage:  scripts/start-local-slurm.sh [start|stop|status|install]      (default: start)
#         `install` only installs the Debian packages (what .ci/run does up front; ~50 s here).
#
# `start` is idempotent: daemons already running are left alone, packages already installed are not
# re-installed, and concurrent invocations serialise on a lock file.
#
# Obstacles it solves (why each step is there):
#   - Debian's maintainer scripts would start the daemons with Debian's default config on a systemd
#     host: a temporary /usr/sbin/policy-rc.d (exit 101) keeps them stopped during apt-get install.
#   - no systemd: the runtime directories systemd would create (/run/munge, /run/mysqld) are made
#     by hand, and every daemon is started directly.
#   - slurmd finds its NodeName by the short hostname, which must resolve: /etc/hosts gets an entry.
#   - snakemake-executor-plugin-slurm polls `sacct`; without accounting `sacct` fails and the plugin
#     waits forever. So slurmdbd + a local MariaDB (bound to 127.0.0.1) run by default.
#   - slurmdbd refuses a world-readable slurmdbd.conf (chmod 600).
#   - without DefMemPerCPU a job that gives no --mem is allocated the whole node's memory.
#   - MinJobAge=600 keeps finished jobs visible to squeue for the plugin's squeue status mode.
#   - no cgroup plugins by default (proctrack/linuxproc, task/none): works in containers without
#     delegated cgroups; time limits are still enforced, memory is not (USE_CGROUP=1 enforces it).
#
# Environment knobs:
#   WITH_SLURMDBD=1   (default) also install slurmdbd + MariaDB so that `sacct` works; that is what
#                     snakemake-executor-plugin-slurm polls by default.
#   WITH_SLURMDBD=0   no accounting (faster, smaller). `sacct` then fails with "Slurm accounting
#                     storage is disabled", so the Snakemake profile MUST set
#                     `slurm-status-command: squeue`.
#   USE_CGROUP=1      use proctrack/cgroup + task/cgroup (cgroup v1 only; needs
#                     /sys/fs/cgroup/{memory,freezer,cpuset} v1 mounts) so that --mem and CPU counts
#                     are enforced (OOM -> job killed). Default 0: no enforcement of memory/CPU.
#   SKIP_INSTALL=1    never run apt-get (default: install only when a needed binary is missing)
#   SMOKE_TEST=1      (default) run one `hostname` job and wait until it is COMPLETED
#   SLURM_CPUS        default: nproc
#   SLURM_MEM_MB      default: 85% of the RAM that `slurmd -C` reports
#   CPU_MAX_TIME      MaxTime of partition cpu in minutes (default 60)
#   GPU_MAX_TIME      MaxTime of partition gpu in minutes (default 120)
#   FAKE_GPUS         GPUs the node advertises (GRES gpu on /dev/null copies: allocated, no device; default 2)
#   SLURM_LOG_DIR     default: /var/log/slurm-local
#   READY_TIMEOUT     seconds to wait for each daemon (default 60)
set -euo pipefail

ACTION="${1:-start}"
WITH_SLURMDBD="${WITH_SLURMDBD:-1}"
SKIP_INSTALL="${SKIP_INSTALL:-0}"
USE_CGROUP="${USE_CGROUP:-0}"
SMOKE_TEST="${SMOKE_TEST:-1}"
CPU_MAX_TIME="${CPU_MAX_TIME:-60}"
GPU_MAX_TIME="${GPU_MAX_TIME:-120}"
FAKE_GPUS="${FAKE_GPUS:-2}"
SLURM_LOG_DIR="${SLURM_LOG_DIR:-/var/log/slurm-local}"
READY_TIMEOUT="${READY_TIMEOUT:-60}"
CLUSTER_NAME="localcluster"
DB_PASS="slurmpw"   # local-only MariaDB account, bound to 127.0.0.1 / socket

log() { echo "[local-slurm $(date +%T)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# wait_for "description" cmd args...  - retry every 0.5 s up to READY_TIMEOUT
wait_for() {
    local what="$1"; shift
    local deadline=$(( $(date +%s) + READY_TIMEOUT ))
    until "$@" >/dev/null 2>&1; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            die "timed out after ${READY_TIMEOUT}s waiting for: $what"
        fi
        sleep 0.5
    done
    log "ready: $what"
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
tcp_open()  { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
node_idle() { sinfo -h -N -n "$NODE" -o %t 2>/dev/null | grep -qx idle; }
ctld_up()   { scontrol ping 2>/dev/null | grep -q 'is UP'; }
cluster_registered() {
    sacctmgr -n -P show cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER_NAME"
}

stop_pidfile() {   # stop_pidfile name pidfile
    local name="$1" pf="$2" pid i
    if pid_alive "$pf"; then
        pid="$(cat "$pf")"
        log "stopping $name (pid $pid)"
        kill "$pid" 2>/dev/null || true
        for i in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -0 "$pid" 2>/dev/null && { log "$name still alive, SIGKILL"; kill -9 "$pid" || true; }
    fi
    return 0
}

do_stop() {
    stop_pidfile slurmd    /run/slurmd.pid
    stop_pidfile slurmctld /run/slurmctld.pid
    stop_pidfile slurmdbd  /run/slurmdbd.pid
    stop_pidfile mariadbd  /run/mysqld/mysqld.pid
    stop_pidfile munged    /run/munge/munged.pid
}

do_status() {
    local f
    for f in /run/munge/munged.pid /run/mysqld/mysqld.pid /run/slurmdbd.pid \
             /run/slurmctld.pid /run/slurmd.pid; do
        if pid_alive "$f"; then echo "running: $f ($(cat "$f"))"; else echo "stopped: $f"; fi
    done
    sinfo 2>/dev/null || true
}

packages_present() {
    local b
    for b in slurmctld slurmd sbatch sacct munged; do
        command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || return 1
    done
    if [ "$WITH_SLURMDBD" = 1 ]; then
        for b in slurmdbd mariadbd; do
            command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || return 1
        done
    fi
    return 0
}

install_packages() {
    export DEBIAN_FRONTEND=noninteractive
    local pkgs=(slurm-wlm munge)
    [ "$WITH_SLURMDBD" = 1 ] && pkgs+=(slurmdbd mariadb-server)
    # Keep maintainer scripts from starting the services (on a systemd host they
    # would otherwise start with Debian's default config); we start them below.
    local own_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    log "apt-get install ${pkgs[*]}"
    local rc=0
    { apt-get update -qq &&
      apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null; } || rc=$?
    [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ "$rc" = 0 ] || die "apt-get failed (rc=$rc)"
    return 0
}

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then   # Debian's postinst normally creates it
        mungekey --create --keyfile=/etc/munge/munge.key --force
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge   # systemd's RuntimeDirectory
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    if ! pid_alive /run/munge/munged.pid; then
        runuser -u munge -- /usr/sbin/munged 9>&-
    fi
    wait_for "munged" sh -c 'munge -n | unmunge'
}

write_slurm_conf() {
    local acct_storage jobacct proctrack
    if [ "$USE_CGROUP" = 1 ]; then
        local c
        for c in memory freezer cpuset; do
            grep -qE "^cgroup /sys/fs/cgroup/$c cgroup" /proc/mounts \
                || die "USE_CGROUP=1 needs a cgroup v1 '$c' hierarchy at /sys/fs/cgroup/$c"
        done
        proctrack="ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup,task/affinity"
        printf '%s\n' 'CgroupPlugin=cgroup/v1' 'ConstrainCores=yes' \
            'ConstrainRAMSpace=yes' > /etc/slurm/cgroup.conf
    else
        # no cgroup plugins: works without systemd / delegated cgroups
        proctrack="ProctrackType=proctrack/linuxproc
TaskPlugin=task/none"
        rm -f /etc/slurm/cgroup.conf
    fi
    if [ "$WITH_SLURMDBD" = 1 ]; then
        acct_storage="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment"
        jobacct="JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
    else
        acct_storage="AccountingStorageType=accounting_storage/none"
        jobacct="JobAcctGatherType=jobacct_gather/none"
    fi
    cat > /etc/slurm/slurm.conf <<EOF
# generated by start-local-slurm.sh
ClusterName=$CLUSTER_NAME
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
$proctrack
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without this a job that gives no --mem is allocated the whole node's memory
DefMemPerCPU=1000
# finished jobs stay visible to squeue/scontrol for 10 min
# (snakemake's squeue status mode needs >= 3 x init-seconds-before-status-checks)
MinJobAge=600
$acct_storage
$jobacct
JobCompType=jobcomp/none
SlurmctldLogFile=$SLURM_LOG_DIR/slurmctld.log
SlurmdLogFile=$SLURM_LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$SLURM_CPUS RealMemory=$SLURM_MEM_MB Gres=gpu:$FAKE_GPUS State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=$CPU_MAX_TIME State=UP
PartitionName=gpu Nodes=$NODE MaxTime=$GPU_MAX_TIME State=UP
EOF
    # fake GPUs: slurmd counts a gpu GRES by its character devices, so copies of /dev/null (1:3) stand in for
    # /dev/nvidia<i>; SLURM allocates, accounts and exports them (CUDA_VISIBLE_DEVICES) like real ones
    install -d -m 0755 /var/lib/slurm-fake-gpus
    local i
    for i in $(seq 0 $((FAKE_GPUS - 1))); do
        [ -c "/var/lib/slurm-fake-gpus/nvidia$i" ] || mknod "/var/lib/slurm-fake-gpus/nvidia$i" c 1 3 \
            || die "mknod failed: this container cannot create the fake GPU devices (FAKE_GPUS=0 to do without)"
    done
    echo "NodeName=$NODE Name=gpu File=/var/lib/slurm-fake-gpus/nvidia[0-$((FAKE_GPUS - 1))]" > /etc/slurm/gres.conf
}

start_mariadb_and_slurmdbd() {
    install -d -o mysql -g root -m 0755 /run/mysqld
    if [ ! -d /var/lib/mysql/mysql ]; then    # normally done by Debian's postinst
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    fi
    if ! mariadb-admin ping >/dev/null 2>&1; then
        setsid /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 \
            --pid-file=/run/mysqld/mysqld.pid \
            --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900 \
            >"$SLURM_LOG_DIR/mariadb.log" 2>&1 </dev/null 9>&- &
    fi
    wait_for "mariadbd" mariadb-admin ping
    mariadb <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
    cat > /etc/slurm/slurmdbd.conf <<EOF
# generated by start-local-slurm.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=$SLURM_LOG_DIR/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    chmod 0600 /etc/slurm/slurmdbd.conf      # slurmdbd refuses a world-readable file
    pid_alive /run/slurmdbd.pid || slurmdbd 9>&-
    wait_for "slurmdbd on :6819" tcp_open 6819
}

do_start() {
    [ "$(id -u)" = 0 ] || die "must run as root"
    if [ "$SKIP_INSTALL" != 1 ] && ! packages_present; then
        install_packages
    fi

    NODE="$(hostname -s)"
    # slurmd finds its NodeName by the short hostname; make sure it resolves.
    if ! getent hosts "$NODE" >/dev/null; then
        log "adding '127.0.0.1 $NODE' to /etc/hosts"
        echo "127.0.0.1 $NODE" >> /etc/hosts
    fi
    SLURM_CPUS="${SLURM_CPUS:-$(nproc)}"
    if [ -z "${SLURM_MEM_MB:-}" ]; then
        local detected
        detected="$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')"
        SLURM_MEM_MB=$(( detected * 85 / 100 ))
    fi
    log "node=$NODE cpus=$SLURM_CPUS mem=${SLURM_MEM_MB}MB slurmdbd=$WITH_SLURMDBD cgroup=$USE_CGROUP"

    install -d -m 0755 "$SLURM_LOG_DIR" /var/spool/slurmctld /var/spool/slurmd /etc/slurm
    write_slurm_conf
    start_munge
    [ "$WITH_SLURMDBD" = 1 ] && start_mariadb_and_slurmdbd

    pid_alive /run/slurmctld.pid || slurmctld 9>&-
    wait_for "slurmctld" ctld_up
    pid_alive /run/slurmd.pid || slurmd 9>&-
    wait_for "node $NODE idle" node_idle
    if [ "$WITH_SLURMDBD" = 1 ]; then
        # slurmctld registers the cluster in slurmdbd by itself on first start
        wait_for "cluster registered in slurmdbd" cluster_registered
    fi

    if [ "$SMOKE_TEST" = 1 ]; then
        local out jobid state=""
        out="$(mktemp -d)"
        jobid="$(sbatch --parsable -o "$out/%j.out" --wrap 'hostname')"
        # (sbatch --wait works too, but it polls only every ~10 s)
        local deadline=$(( $(date +%s) + READY_TIMEOUT ))
        while :; do
            state="$(scontrol show job -o "$jobid" | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')"
            case "$state" in
                COMPLETED) break ;;
                PENDING|CONFIGURING|RUNNING|COMPLETING|"") ;;
                *) die "smoke-test job $jobid ended as $state: $(cat "$out"/*.out 2>/dev/null)" ;;
            esac
            [ "$(date +%s)" -lt "$deadline" ] || die "smoke-test job $jobid stuck in $state"
            sleep 0.5
        done
        log "smoke-test job $jobid ran on: $(cat "$out/$jobid.out")"
        if [ "$WITH_SLURMDBD" = 1 ]; then
            wait_for "job $jobid COMPLETED in sacct" \
                sh -c "sacct -n -X -j $jobid -o State | grep -q COMPLETED"
        fi
        rm -rf "$out"
    fi
    log "SLURM is up: $(sinfo -h -o '%P %a %D %T %N' | tr '\n' ' ')"
}

# one start/stop at a time (two test sessions may try to start the cluster at once). Daemons are started
# with fd 9 closed (`9>&-`): a daemon inheriting it would hold the lock for its whole life.
LOCK_FILE="${SLURM_LOCK_FILE:-/run/neuronatlas-local-slurm.lock}"
if [ "$ACTION" != status ] && command -v flock >/dev/null 2>&1; then
    exec 9>"$LOCK_FILE"
    flock -w 600 9 || die "could not take the lock $LOCK_FILE within 600 s"
fi

case "$ACTION" in
    start)   do_start ;;
    stop)    do_stop ;;
    status)  do_status ;;
    install) [ "$(id -u)" = 0 ] || die "must run as root"
             packages_present && log "packages already installed" || install_packages ;;
    *) die "usage: $0 [start|stop|status|install]" ;;
esac
