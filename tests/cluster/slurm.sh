#!/usr/bin/env bash
# A real one-node SLURM cluster inside this machine/container, without systemd.
#
#   bash tests/cluster/slurm.sh start    # install (apt) if needed, configure, start, smoke-test
#   bash tests/cluster/slurm.sh stop     # stop exactly the daemons `start` started
#   bash tests/cluster/slurm.sh status   # sinfo/squeue, or "not running" (exit 3)
#
# Daemons: munged (as user munge), mariadbd (own datadir, 127.0.0.1:$DB_PORT), slurmdbd,
# slurmctld, slurmd. SlurmUser is root (simplest; this is a throw-away test cluster).
# Everything variable lives in the state folder ($FLOWLAB_SLURM_STATE, default
# /tmp/flowlab-slurm); the only files written outside it are /etc/slurm/slurm.conf and
# /etc/slurm/slurmdbd.conf (where every Slurm client looks for them) and /run/munge.
# See tests/cluster/README.md.
set -euo pipefail
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"
unset SLURM_CONF  # clients must read the same /etc/slurm/slurm.conf as the daemons

STATE=$(realpath -m "${FLOWLAB_SLURM_STATE:-/tmp/flowlab-slurm}")
CLUSTER=${FLOWLAB_SLURM_CLUSTER:-flowlab}
PARTITION=${FLOWLAB_SLURM_PARTITION:-debug}
DB_PORT=${FLOWLAB_SLURM_DB_PORT:-3307}
CONF_DIR=/etc/slurm
MARK="# Written by flowlab tests/cluster/slurm.sh -- rewritten on every start."
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)  # start order; stop is the reverse
PKGS=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)

log() { echo "[slurm.sh] $*"; }
die() { echo "[slurm.sh] ERROR: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------- pid bookkeeping
# $STATE/pids/<name>.pid holds "<pid> <starttime>" (starttime = field 22 of /proc/pid/stat),
# so a recycled pid is never mistaken for one of ours.
# A zombie counts as gone (prints nothing).
starttime() { awk '{ sub(/^.*\) /, ""); if ($1 != "Z" && $1 != "X") print $20 }' "/proc/$1/stat" 2>/dev/null; }

# pid of daemon $1 if it is alive and is the process we started, else fail.
our_pid() {
    local f="$STATE/pids/$1.pid" pid st
    [ -r "$f" ] || return 1
    read -r pid st <"$f" || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [ "$(starttime "$pid")" = "$st" ] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] || return 1
    echo "$pid"
}

# launch NAME CMD...: run CMD in the foreground mode of the daemon, detached into its own
# session (setsid, nohup: survives the calling shell), stdout/stderr to $STATE/log/NAME.out
# (the Slurm daemons also write their own NAME.log).
# The subshell, nohup, setsid and setpriv all exec, so $! is the daemon's own pid.
launch() {
    local name=$1 dir=$STATE; shift
    [ "$name" = slurmd ] && dir=$STATE/slurmd  # see our_stepds
    # 9>&-: the daemon must not inherit (and so hold forever) our lock on $STATE/lock.
    (cd "$dir" && exec nohup setsid "$@" >>"$STATE/log/$name.out" 2>&1 </dev/null 9>&-) &
    local pid=$!
    local st=""
    for _ in 1 2 3 4 5 6 7 8 9 10; do st=$(starttime "$pid") && [ -n "$st" ] && break; sleep 0.1; done
    echo "$pid $st" >"$STATE/pids/$name.pid"
}

# kill_pid PID [TIMEOUT]: SIGTERM, wait up to TIMEOUT s (default 20), then SIGKILL.
kill_pid() {
    local pid=$1 timeout=${2:-20} st i
    st=$(starttime "$pid") || return 0
    [ -n "$st" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < timeout * 10; i++)); do
        [ "$(starttime "$pid")" = "$st" ] || return 0
        sleep 0.1
    done
    log "pid $pid ($(cat "/proc/$pid/comm" 2>/dev/null)) ignored SIGTERM for ${timeout}s; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do [ "$(starttime "$pid")" = "$st" ] || return 0; sleep 0.1; done
}

# "pid ppid comm" for every live process, from /proc (procps may not be installed).
# cat skips processes that vanish meanwhile; comm may contain spaces and parentheses.
proc_table() {
    cat /proc/[0-9]*/stat 2>/dev/null | awk '{
        l = $0
        pid = l; sub(/ .*/, "", pid)
        comm = l; sub(/^[^(]*\(/, "", comm); sub(/\) [^)]*$/, "", comm)
        rest = l; sub(/^.*\) /, "", rest); split(rest, f, " ")
        if (f[1] != "Z" && f[1] != "X") print pid, f[2], comm
    }'
}

# Live pids whose command name is exactly $1.
pids_named() { proc_table | awk -v n="$1" '$3 == n { print $1 }'; }

# All descendants of the given pids, and the pids themselves.
descendants() {
    proc_table | awk -v roots="$*" '
        BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) want[r[i]] = 1 }
        { parent[$1] = $2 }
        END {
            changed = 1
            while (changed) {
                changed = 0
                for (p in parent) if (!(p in want) && (parent[p] in want)) { want[p] = 1; changed = 1 }
            }
            for (p in want) print p
        }'
}

# slurmstepd processes that belong to our slurmd. They double-fork away from slurmd (own
# session, parent 1) and wipe their environment, but keep slurmd's working directory,
# which launch() sets to our spool dir.
our_stepds() {
    local p spool
    spool=$(readlink -f "$STATE/slurmd")
    for p in $(pids_named slurmstepd); do
        [ "$(readlink "/proc/$p/cwd" 2>/dev/null)" = "$spool" ] && echo "$p"
    done
    return 0
}

# ---------------------------------------------------------------- install
have_binaries() {
    local b
    for b in slurmctld slurmd slurmdbd munged munge sinfo sbatch srun sacct sacctmgr \
        mariadbd mariadb-install-db mariadb; do
        command -v "$b" >/dev/null 2>&1 || return 1
    done
}

install_packages() {
    have_binaries && return 0
    command -v apt-get >/dev/null 2>&1 || die "Slurm/munge/MariaDB binaries missing and no apt-get to install them (need: ${PKGS[*]})"
    local t0 added_policy=0
    t0=$(now)
    # Keep the packages' init scripts from starting system-wide daemons during install:
    # we start our own, with our config. (Docker images usually already ship this file.)
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        added_policy=1
        ADDED_POLICY=1  # on_exit removes it if we are interrupted
    fi
    log "installing ${PKGS[*]} with apt-get ..."
    local rc=0
    {
        apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${PKGS[@]}"
    } >"$STATE/log/apt.log" 2>&1 || rc=$?
    if [ "$added_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; ADDED_POLICY=0; fi
    if [ "$rc" != 0 ]; then tail -n 30 "$STATE/log/apt.log" >&2; die "apt-get failed (rc=$rc), see $STATE/log/apt.log"; fi
    have_binaries || die "packages installed but binaries still missing"
    log "TIMING apt install: $(since "$t0")s"
}

# ---------------------------------------------------------------- configuration
node_line() {
    # Take the node definition from the hardware slurmd sees, declare RealMemory ~10%
    # under it (too high -> node "inval", then "drain") and pin NodeAddr to loopback.
    local c host cpus mem
    c=$(slurmd -C 2>/dev/null | grep -m1 '^NodeName=') || die "slurmd -C printed no NodeName line"
    host=$(sed -n 's/^NodeName=\([^ ]*\).*/\1/p' <<<"$c")
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$c")
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$c")
    [ -n "$host" ] && [ -n "$cpus" ] && [ -n "$mem" ] || die "cannot parse slurmd -C: $c"
    mem=$((mem * 9 / 10))
    c=$(sed "s/RealMemory=[0-9]*/RealMemory=$mem/" <<<"$c")
    if [ "$cpus" -lt 2 ]; then
        # Tests need a 2-task job; declare 2 CPUs and let slurmd accept the overcommit.
        c="NodeName=$host CPUs=2 RealMemory=$mem"
        echo "SlurmdParameters=config_overrides"
    fi
    echo "$c NodeAddr=127.0.0.1 State=UNKNOWN"
    echo "PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP"
}

write_configs() {
    local host nodes
    host=$(hostname -s)
    nodes=$(node_line)
    mkdir -p "$CONF_DIR"
    local f
    for f in slurm.conf slurmdbd.conf; do
        # Never silently overwrite a config somebody else wrote: keep one backup.
        if [ -e "$CONF_DIR/$f" ] && ! grep -qF "$MARK" "$CONF_DIR/$f" && [ ! -e "$CONF_DIR/$f.flowlab-orig" ]; then
            cp -p "$CONF_DIR/$f" "$CONF_DIR/$f.flowlab-orig"
            log "kept the existing $CONF_DIR/$f as $CONF_DIR/$f.flowlab-orig"
        fi
    done
    cat >"$CONF_DIR/slurm.conf.tmp" <<EOF
$MARK
# One-node test cluster; state, spool and logs under $STATE.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in a container: track processes by parent pid, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Reject (instead of pending forever) jobs that can never fit.
EnforcePartLimits=ALL
# A node that was DOWN comes back by itself when slurmd registers again.
ReturnToService=2
MailProg=/bin/true
# Accounting through slurmdbd + MariaDB: sacct works, so submitit learns when a job died.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$nodes
EOF
    mv "$CONF_DIR/slurm.conf.tmp" "$CONF_DIR/slurm.conf"
    chmod 644 "$CONF_DIR/slurm.conf"

    (
        umask 077
        cat >"$CONF_DIR/slurmdbd.conf.tmp" <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$STATE/db.pass")
StorageLoc=slurm_acct_db
EOF
    )
    mv "$CONF_DIR/slurmdbd.conf.tmp" "$CONF_DIR/slurmdbd.conf"
    chown root:root "$CONF_DIR/slurmdbd.conf"  # owned by SlurmUser, mode 600, or slurmdbd refuses it
    chmod 600 "$CONF_DIR/slurmdbd.conf"
}

# ---------------------------------------------------------------- waiting
# show_log DAEMON: the end of what the daemon wrote, on stderr.
show_log() {
    local f
    for f in "$STATE/log/$1.out" "$STATE/log/$1.log"; do
        [ -s "$f" ] && { echo "--- tail of $f" >&2; tail -n 25 "$f" >&2; }
    done
    return 0
}

# wait_for DESC TIMEOUT DAEMON CMD...: poll CMD until it succeeds; fail early (with the
# daemon's log) if DAEMON died.
wait_for() {
    local desc=$1 timeout=$2 daemon=$3 i; shift 3
    for ((i = 0; i < timeout * 2; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        if [ -n "$daemon" ] && ! our_pid "$daemon" >/dev/null; then
            show_log "$daemon"
            die "$daemon died while waiting for: $desc (logs: $STATE/log/$daemon.*)"
        fi
        sleep 0.5
    done
    [ -n "$daemon" ] && show_log "$daemon"
    die "timed out after ${timeout}s waiting for: $desc"
}

munge_ok() { munge -n </dev/null | unmunge >/dev/null; }
mysql_sock() { echo "$STATE/run/mysqld.sock"; }
mysql_ok() { mariadb-admin --no-defaults --socket="$(mysql_sock)" -uroot ping; }
dbd_ok() { timeout 15 sacctmgr -n -P list cluster format=cluster; }
ctld_ok() { timeout 15 scontrol ping | grep -q 'is UP'; }
node_state() { timeout 15 sinfo -h -N -n "$(hostname -s)" -o %T 2>/dev/null | head -n1; }
node_idle() { case "$(node_state)" in idle | mixed | allocated) return 0 ;; *) return 1 ;; esac; }

# ---------------------------------------------------------------- daemons
start_munged() {
    if our_pid munged >/dev/null; then return 0; fi
    if munge_ok 2>/dev/null; then
        log "munged already running (not started by this script): using it"
        rm -f "$STATE/pids/munged.pid"
        return 0
    fi
    id munge >/dev/null 2>&1 || die "no user 'munge' (package munge not installed?)"
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    # munged must run as munge (it owns the key) and needs its socket dir /run/munge.
    local d
    for d in /run/munge /var/lib/munge /var/log/munge; do
        mkdir -p "$d"
        chown munge:munge "$d"
    done
    chmod 755 /run/munge  # clients (any user) must reach the socket
    chmod 700 /var/lib/munge /var/log/munge
    # --force: take over a stale socket left by an unclean stop.
    launch munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground --force
    wait_for "munged answers" 20 munged munge_ok
}

start_mariadb() {
    our_pid mariadbd >/dev/null && return 0
    local datadir="$STATE/mysql"
    if [ ! -d "$datadir/mysql" ]; then
        log "initialising MariaDB datadir $datadir"
        rm -rf "$datadir"
        mkdir -p "$datadir"
        mariadb-install-db --no-defaults --datadir="$datadir" --user=root \
            --auth-root-authentication-method=socket --skip-test-db >>"$STATE/log/mariadb-install-db.log" 2>&1 ||
            { tail -n 20 "$STATE/log/mariadb-install-db.log" >&2; die "mariadb-install-db failed"; }
    fi
    rm -f "$(mysql_sock)" "$(mysql_sock).lock" "$STATE/run/mariadb.pid"
    # Runs as root (like SlurmUser), own datadir/socket/port so it never meets a system MariaDB.
    # A small buffer pool: slurmdbd logs "Database settings not recommended values:
    # innodb_buffer_pool_size", which is harmless for a test cluster.
    launch mariadbd mariadbd --no-defaults --user=root --datadir="$datadir" \
        --socket="$(mysql_sock)" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --pid-file="$STATE/run/mariadb.pid" --performance-schema=OFF \
        --innodb-buffer-pool-size=64M --innodb-log-file-size=64M --innodb-lock-wait-timeout=900
    wait_for "MariaDB answers" 60 mariadbd mysql_ok
    local pw
    pw=$(cat "$STATE/db.pass")
    mariadb --no-defaults --socket="$(mysql_sock)" -uroot <<EOF || die "creating the slurm DB user failed"
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pw';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pw';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
}

start_slurmdbd() {
    our_pid slurmdbd >/dev/null && return 0
    launch slurmdbd slurmdbd -D
    wait_for "slurmdbd answers sacctmgr" 90 slurmdbd dbd_ok
    if ! dbd_ok 2>/dev/null | grep -qx "$CLUSTER"; then
        log "registering cluster $CLUSTER in slurmdbd"
        timeout 30 sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
    fi
}

start_slurmctld() {
    our_pid slurmctld >/dev/null && return 0
    launch slurmctld slurmctld -D
    wait_for "slurmctld answers scontrol ping" 60 slurmctld ctld_ok
}

start_slurmd() {
    our_pid slurmd >/dev/null && return 0
    launch slurmd slurmd -D
    local host i st
    host=$(hostname -s)
    for ((i = 0; i < 120; i++)); do
        st=$(node_state)
        case "$st" in
            idle | mixed | allocated) return 0 ;;
            *drain* | *fail*)  # drained by an earlier run (e.g. a killed slurmd): put it back
                log "node $host is '$st' ($(scontrol show node "$host" | sed -n 's/^ *Reason=//p')); resuming it"
                scontrol update NodeName="$host" State=RESUME || true ;;
            *inval*)
                scontrol show node "$host" >&2 || true
                die "node $host is 'inval': slurm.conf asks for more than the hardware has" ;;
        esac
        our_pid slurmd >/dev/null || { show_log slurmd; die "slurmd died"; }
        sleep 0.5
    done
    scontrol show node "$host" >&2 || true
    die "node $host did not become idle within 60s (state: $st)"
}

smoke_test() {
    local t0 t1 t2 out id state i
    t0=$(now)
    # Takes 2 s or 10 s: slurmctld starts batch jobs on a ~3 s tick, and sbatch --wait polls
    # after 2 s, then 8 s later.
    id=$(cd "$STATE" && timeout 90 sbatch -p "$PARTITION" -t 1 --parsable --wait -J flowlab-smoke \
        -o "$STATE/log/smoke-%j.out" --wrap 'hostname') || die "smoke test 'sbatch --wait' failed"
    id=${id%%;*}
    t1=$(now)
    # The job's record reaches the database asynchronously; sacct must see it.
    for ((i = 0; i < 60; i++)); do
        state=$(timeout 15 sacct -n -X -P -j "$id" -o State 2>/dev/null | head -n1) || true
        [ "$state" = COMPLETED ] && break
        sleep 0.5
    done
    [ "$state" = COMPLETED ] || die "sacct -j $id says '$state', expected COMPLETED (accounting broken?)"
    t2=$(now)
    out=$(timeout 60 srun -p "$PARTITION" -N1 -n1 -t 1 hostname) || die "smoke test 'srun hostname' failed"
    [ "$out" = "$(hostname -s)" ] || [ "$out" = "$(hostname)" ] || die "srun hostname printed '$out'"
    log "smoke tests passed in $(since "$t0")s (sbatch --wait job $id: $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')s;" \
        "COMPLETED in sacct after $(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.1f", b - a }')s; srun hostname: $(since "$t2")s)"
}

healthy() {
    local d
    for d in "${DAEMONS[@]}"; do
        [ "$d" = munged ] && { munge_ok 2>/dev/null || return 1; continue; }
        our_pid "$d" >/dev/null || return 1
    done
    ctld_ok && dbd_ok >/dev/null 2>&1 && node_idle
}

any_ours() {
    local d
    for d in "${DAEMONS[@]}"; do our_pid "$d" >/dev/null && return 0; done
    return 1
}

check_foreign() {
    local d p ours
    for d in slurmctld slurmd slurmdbd; do
        ours=$(our_pid "$d" || true)
        for p in $(pids_named "$d"); do
            [ "$p" = "$ours" ] && continue
            [ -n "$(starttime "$p")" ] || continue  # a zombie not yet reaped by pid 1
            die "a $d not started by this script is running (pid $p); stop it first"
        done
    done
}

# ---------------------------------------------------------------- commands
ADDED_POLICY=0
STARTING=0
on_exit() {
    local rc=$?
    [ "$ADDED_POLICY" = 1 ] && rm -f /usr/sbin/policy-rc.d
    if [ "$STARTING" = 1 ] && [ "$rc" != 0 ]; then
        STARTING=0
        log "start failed (logs: $STATE/log/): stopping the daemons it started"
        stop_all || true
    fi
}
trap on_exit EXIT

cmd_start() {
    local t0
    t0=$(now)
    [ "$(id -u)" = 0 ] || die "must run as root (starts munged, slurmd, MariaDB)"
    mkdir -p "$STATE"/{pids,run,log,slurmctld,slurmd}
    chmod 755 "$STATE"
    exec 9>"$STATE/lock"
    flock -w 600 9 || die "another slurm.sh holds $STATE/lock"

    if any_ours; then
        if healthy; then
            log "already running and healthy (state: $STATE)"
            return 0
        fi
        log "a previous start is partly running or unhealthy: stopping it first"
        stop_all
    fi
    rm -f "$STATE"/pids/*.pid "$STATE"/run/*.pid  # stale pid files from an unclean stop
    check_foreign
    STARTING=1

    install_packages
    [ -s "$STATE/db.pass" ] || (umask 077 && head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$STATE/db.pass")
    local t1
    t1=$(now)
    write_configs
    start_munged
    start_mariadb
    start_slurmdbd
    start_slurmctld
    start_slurmd
    log "daemons up in $(since "$t1")s; node $(hostname -s) is $(node_state)"
    smoke_test
    STARTING=0
    log "TIMING start (after install): $(since "$t1")s, total: $(since "$t0")s"
    cmd_status
}

stop_all() {
    local t0 d i pid stepds kids jobs=""
    t0=$(now)
    # Jobs first, so no slurmstepd or job process outlives the cluster.
    if our_pid slurmctld >/dev/null && ctld_ok 2>/dev/null; then
        jobs=$(timeout 15 squeue -h -o %A 2>/dev/null | tr '\n' ' ') || true
        if [ -n "${jobs// /}" ]; then
            log "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            timeout 15 scancel $jobs 2>/dev/null || true
        fi
    fi
    # scancel sends SIGTERM, and SIGKILL only after KillWait (30 s). Give jobs 5 s, then
    # SIGKILL the job processes below our slurmstepds (the slurmstepds then finish the job
    # normally), and 5 s later whatever is still there, slurmstepds included.
    local deadline=$((SECONDS + 5))
    stepds=$(our_stepds)
    while [ -n "$stepds" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; stepds=$(our_stepds); done
    if [ -n "$stepds" ]; then
        # shellcheck disable=SC2086
        kids=$(descendants $stepds | grep -vxF -f <(printf '%s\n' $stepds) | tr '\n' ' ') || true
        log "killing job processes that ignored SIGTERM: $kids"
        # shellcheck disable=SC2086
        [ -z "${kids// /}" ] || kill -KILL $kids 2>/dev/null || true
        deadline=$((SECONDS + 5))
        while [ -n "$stepds" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; stepds=$(our_stepds); done
    fi
    if [ -n "$stepds" ]; then
        # shellcheck disable=SC2086
        kids=$(descendants $stepds | tr '\n' ' ')
        log "killing leftover slurmstepds and their processes: $kids"
        # shellcheck disable=SC2086
        kill -KILL $kids 2>/dev/null || true
    fi
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        d=${DAEMONS[i]}
        if pid=$(our_pid "$d"); then
            # slurmd can wait up to KillWait for steps that we had to kill: don't wait for it.
            kill_pid "$pid" "$([ "$d" = slurmd ] && echo 5 || echo 20)"
            log "stopped $d (pid $pid)"
        fi
        rm -f "$STATE/pids/$d.pid"
    done
    log "TIMING stop: $(since "$t0")s"
}

cmd_stop() {
    [ -d "$STATE" ] || { log "not running (no $STATE)"; return 0; }
    exec 9>"$STATE/lock"
    flock -w 120 9 || die "another slurm.sh holds $STATE/lock"
    if ! any_ours; then
        log "not running"
        rm -f "$STATE"/pids/*.pid
        return 0
    fi
    stop_all
}

cmd_status() {
    local d pid up=0 missing=0
    for d in "${DAEMONS[@]}"; do
        if pid=$(our_pid "$d" 2>/dev/null); then
            echo "$d: running (pid $pid)"
            up=1
        else
            [ "$d" = munged ] && munge_ok 2>/dev/null || missing=1
            echo "$d: not running$([ "$d" = munged ] && munge_ok 2>/dev/null && echo ' (a munged not started by slurm.sh answers)')"
        fi
    done
    if [ "$up" = 0 ]; then
        echo "not running"
        return 3
    fi
    if ctld_ok 2>/dev/null; then
        sinfo
        squeue
        [ "$missing" = 0 ] || { echo "partly running: '$0 start' restarts it"; return 1; }
    else
        echo "slurmctld does not answer"
        return 1
    fi
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status   (state folder: $STATE)" >&2; exit 2 ;;
esac
