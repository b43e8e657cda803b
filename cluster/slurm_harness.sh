#!/usr/bin/env bash
# A real one-node Slurm on loopback, for the tests (cluster/ and tests/test_slurm_*.py).
#
#   bash cluster/slurm_harness.sh start    # install (Debian packages, once), configure, start, wait for an idle node
#   bash cluster/slurm_harness.sh status   # daemons, partitions, queue
#   bash cluster/slurm_harness.sh stop     # cancel every job, stop every daemon this script started
#   bash cluster/slurm_harness.sh env      # prints `export SLURM_CONF=...` for this cluster
#
# Needs root and apt-get. Runs munged, MariaDB, slurmdbd, slurmctld and slurmd by hand (no systemd, no
# cgroups, no `slurm` user), all as root, all listening on loopback only. Configuration, state, logs and
# pid files live in $LAMAMBA_SLURM_DIR (default: <repo>/.cache/slurm, ignored by git). Idempotent: `start`
# on a running cluster checks it and returns; `stop` on a stopped one does nothing.
#
# Two partitions share the node, for preemption drills:
#   low  (default, PriorityTier=1,  PreemptMode=REQUEUE): preemptible; a preempted job gets SIGUSR2 (its
#        --signal) at once, then SIGTERM and, GraceTime + KillWait later, SIGKILL; Slurm requeues it.
#   high (PriorityTier=10, PreemptMode=OFF): jobs here preempt jobs in `low`.
# Settings that matter (see ../shared/ENVIRONMENT.md): preempt_send_user_signal (else Slurm sends SIGTERM
# only), cred_expire=10 and sched_interval=2 (requeued jobs restart in ~12 s instead of minutes), and
# slurmdbd (without it sacct fails and submitit never learns that a job ended).
set -Eeuo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
D="${LAMAMBA_SLURM_DIR:-$ROOT/.cache/slurm}"
CLUSTER=lamamba
CTLD_PORT="${LAMAMBA_SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${LAMAMBA_SLURMD_PORT:-6818}"
DBD_PORT="${LAMAMBA_SLURMDBD_PORT:-6819}"
DB_PORT="${LAMAMBA_SLURM_DB_PORT:-3307}"
DB_PASS=lamamba-harness   # loopback-only test database, not a secret
GRACE_TIME="${LAMAMBA_SLURM_GRACE_TIME:-30}"   # seconds a preempted job gets to save before SIGKILL (+KillWait)
PACKAGES=(slurm-wlm slurmctld slurmd slurmdbd slurm-client munge mariadb-server mariadb-client)

ETC="$D/etc"; RUN="$D/run"; LOG="$D/log"; SPOOL="$D/spool"; DB="$D/mysql"
export SLURM_CONF="$ETC/slurm.conf"
# Slurm 22.05 client tools ignore AuthInfo=socket= on some paths (sacctmgr): use munge's default socket.
MUNGE_SOCKET=/run/munge/munge.socket.2
DB_SOCKET="$RUN/mysqld.sock"

trap 'echo "[slurm-harness] error: command failed (line $LINENO): $BASH_COMMAND; logs in $LOG" >&2' ERR

say() { echo "[slurm-harness] $*"; }
die() { echo "[slurm-harness] error: $*" >&2; exit 1; }

pid_alive() {  # pid_alive PIDFILE -> 0 when the pid in PIDFILE runs
  local f="$1" pid
  [ -f "$f" ] || return 1
  pid="$(cat "$f" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND... : poll COMMAND every 0.5 s
  local secs="$1" what="$2"; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$end" ]; then
      die "$what did not come up within ${secs}s (logs in $LOG)"
    fi
    sleep 0.5
  done
}

need_root() {
  [ "$(id -u)" = 0 ] || die "must run as root (it installs packages and runs the Slurm daemons as root)"
}

# ------------------------------------------------------------------------------------------- install
install_packages() {
  local missing=()
  for b in slurmctld slurmd slurmdbd munged mariadbd mariadb-install-db sbatch sacct; do
    command -v "$b" >/dev/null 2>&1 || missing+=("$b")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "apt-get not found and missing: ${missing[*]}"
  say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d: never let the packages start their own daemons (we run ours by hand).
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created_policy=1; fi
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
  [ "$created_policy" = 1 ] && rm -f "$policy"
  return 0
}

# ------------------------------------------------------------------------------------------- configure
write_configs() {
  mkdir -p "$ETC" "$RUN" "$LOG" "$SPOOL/ctld" "$SPOOL/d" "$D/munge"
  chmod 755 "$D" "$ETC" "$RUN" "$LOG"
  chmod 700 "$D/munge"
  if [ ! -s "$D/munge/munge.key" ]; then
    dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none
  fi
  chmod 600 "$D/munge/munge.key"

  # The node as slurmd sees it, renamed to localhost (we run slurmd -N localhost on 127.0.0.1).
  local hw cpus mem
  hw="$(slurmd -C | head -1)"
  cpus="$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")"
  mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")"
  local node_hw
  node_hw="$(sed -e 's/^NodeName=[^ ]* //' <<<"$hw")"
  [ -n "$cpus" ] || die "could not read the CPU count from 'slurmd -C': $hw"
  # Leave 1 GiB of RealMemory unclaimed so small fluctuations never drain the node.
  node_hw="$(sed -e "s/RealMemory=$mem/RealMemory=$((mem > 2048 ? mem - 1024 : mem))/" <<<"$node_hw")"

  cat >"$ETC/slurm.conf" <<EOF
# Written by cluster/slurm_harness.sh: a one-node test cluster on loopback. Do not use in production.
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may start again 10 s after it ended (default 120 s).
AuthInfo=cred_expire=10
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No systemd/cgroups here: plain process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/backfill
# sched_interval=2: the main scheduler runs every 2 s (default 60 s).
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Accounting through slurmdbd (sacct, and so submitit's job states).
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobCompType=jobcomp/none
# Preemption: jobs in a higher PriorityTier partition requeue jobs in lower ones. The preempted job gets its
# --signal (submitit: USR2) immediately (preempt_send_user_signal), then SIGTERM, and SIGKILL after
# GraceTime + KillWait.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
JobRequeue=1
KillWait=30
MinJobAge=600
SlurmdTimeout=60
InactiveLimit=0
NodeName=localhost NodeAddr=127.0.0.1 $node_hw State=UNKNOWN
PartitionName=low Nodes=localhost Default=YES PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_TIME MaxTime=INFINITE State=UP
PartitionName=high Nodes=localhost Default=NO PriorityTier=10 PreemptMode=OFF MaxTime=INFINITE State=UP
EOF

  cat >"$ETC/slurmdbd.conf" <<EOF
# Written by cluster/slurm_harness.sh (loopback test database).
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$ETC/slurmdbd.conf"
  rm -f "$ETC/cgroup.conf"   # no cgroups here (proctrack/linuxproc, task/none)
  printf 'export SLURM_CONF=%q\n' "$ETC/slurm.conf" >"$ETC/env.sh"

  # Client commands (and submitit's sbatch/sacct/scontrol calls) find the config through /etc/slurm/slurm.conf
  # unless SLURM_CONF is set: link it there when nothing else owns that path.
  if [ ! -e /etc/slurm/slurm.conf ] || is_our_link; then
    mkdir -p /etc/slurm
    ln -sfn "$ETC/slurm.conf" /etc/slurm/slurm.conf
  else
    say "note: /etc/slurm/slurm.conf belongs to someone else; export SLURM_CONF=$ETC/slurm.conf to use this cluster"
  fi
}

is_our_link() {
  [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$ETC/slurm.conf" ]
}

# ------------------------------------------------------------------------------------------- daemons
start_munge() {
  pid_alive "$RUN/munged.pid" && return 0
  if munge -n -S "$MUNGE_SOCKET" >/dev/null 2>&1; then
    die "another munged already serves $MUNGE_SOCKET (not started by this script); stop it first"
  fi
  mkdir -p "$(dirname "$MUNGE_SOCKET")"
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  munged --force --key-file="$D/munge/munge.key" --socket="$MUNGE_SOCKET" --pid-file="$RUN/munged.pid" \
    --log-file="$LOG/munged.log" --seed-file="$D/munge/munged.seed"
  wait_for 15 munged munge -n -S "$MUNGE_SOCKET"
}

db_sql() { mariadb --no-defaults --socket="$DB_SOCKET" -uroot -e "$1"; }

start_mariadb() {
  pid_alive "$RUN/mysqld.pid" && return 0
  if [ ! -d "$DB/mysql" ]; then
    say "initialising the accounting database in $DB"
    mkdir -p "$DB"
    mariadb-install-db --no-defaults --user=root --datadir="$DB" --auth-root-authentication-method=socket \
      --skip-test-db >"$LOG/mariadb-install.log" 2>&1 || die "mariadb-install-db failed, see $LOG/mariadb-install.log"
  fi
  # setsid + nohup: the daemon must outlive this script and its terminal.
  setsid nohup mariadbd --no-defaults --user=root --datadir="$DB" --socket="$DB_SOCKET" \
    --pid-file="$RUN/mysqld.pid" --port="$DB_PORT" --bind-address=127.0.0.1 --log-error="$LOG/mysqld.log" \
    --skip-log-bin --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 --max-connections=100 \
    </dev/null >/dev/null 2>&1 &
  wait_for 60 MariaDB db_sql "SELECT 1"
  db_sql "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
          CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
          FLUSH PRIVILEGES;"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_slurmdbd() {
  pid_alive "$RUN/slurmdbd.pid" && return 0
  slurmdbd   # daemonises; reads slurmdbd.conf next to $SLURM_CONF
  wait_for 60 slurmdbd port_open "$DBD_PORT"
}

cluster_registered() { sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; }

start_slurmctld() {
  pid_alive "$RUN/slurmctld.pid" && return 0
  if ! cluster_registered; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
  slurmctld -f "$SLURM_CONF"
  wait_for 60 slurmctld scontrol ping
  wait_for 60 "slurmctld on the right config" sh -c "scontrol ping | grep -q UP"
}

start_slurmd() {
  pid_alive "$RUN/slurmd.pid" && return 0
  slurmd -f "$SLURM_CONF" -N localhost || die "slurmd failed to start: $(tail -n 3 "$LOG/slurmd.log")"
}

node_state() { sinfo -h -N -n localhost -o %t 2>/dev/null | head -1; }

node_usable() {
  local s
  s="$(node_state)"
  case "$s" in idle|idle\*|mix|alloc|comp) return 0 ;; esac
  return 1
}

wait_node_idle() {
  local end=$((SECONDS + 90)) s
  while :; do
    s="$(node_state)"
    case "$s" in
      idle|mix|alloc) return 0 ;;
      down*|drain*|drng*|fail*|inval*)
        # A node that was down (e.g. after a stop/start) comes back with RESUME.
        scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
    esac
    [ "$SECONDS" -ge "$end" ] && die "node localhost not idle after 90 s (state: '$s'; logs in $LOG)"
    sleep 0.5
  done
}

cmd_start() {
  need_root
  install_packages
  write_configs
  local t0=$SECONDS
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurmctld
  start_slurmd
  wait_node_idle
  say "up in $((SECONDS - t0)) s: $(sinfo -h -o '%P:%t:%c cpus' | tr '\n' ' ')(SLURM_CONF=$SLURM_CONF)"
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE: TERM, wait up to 20 s, then KILL
  local name="$1" f="$2" pid i
  pid_alive "$f" || { rm -f "$f"; return 0; }
  pid="$(cat "$f")"
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 40); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "$name ($pid) ignored SIGTERM, killing it"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
  fi
  rm -f "$f"
}

cancel_all_jobs() {
  # Jobs run under slurmstepd, which outlives slurmd: end them first, while slurmctld and slurmd are up.
  pid_alive "$RUN/slurmctld.pid" || return 0
  local ids
  ids="$(squeue -h -o %A 2>/dev/null || true)"
  [ -z "$ids" ] && return 0
  say "cancelling jobs: $(echo $ids)"
  # shellcheck disable=SC2086
  scancel $ids 2>/dev/null || true
  local end=$((SECONDS + 60))
  while [ -n "$(squeue -h -o %A 2>/dev/null || true)" ] || [ -n "$(scontrol listpids 2>/dev/null | tail -n +2)" ]; do
    [ "$SECONDS" -ge "$end" ] && { say "warning: jobs still present after 60 s"; break; }
    sleep 0.5
  done
}

cmd_stop() {
  [ -d "$RUN" ] || { say "not started (no $RUN)"; return 0; }
  cancel_all_jobs
  stop_pidfile slurmd "$RUN/slurmd.pid"
  stop_pidfile slurmctld "$RUN/slurmctld.pid"
  stop_pidfile slurmdbd "$RUN/slurmdbd.pid"
  stop_pidfile mariadbd "$RUN/mysqld.pid"
  stop_pidfile munged "$RUN/munged.pid"
  if is_our_link; then rm -f /etc/slurm/slurm.conf; fi
  say "stopped"
}

cmd_status() {
  local n rc=0
  for n in munged mysqld slurmdbd slurmctld slurmd; do
    if pid_alive "$RUN/$n.pid"; then echo "$n: running (pid $(cat "$RUN/$n.pid"))"; else echo "$n: stopped"; rc=3; fi
  done
  if [ "$rc" = 0 ]; then
    sinfo -o '%P %a %l %D %t %c %G' || rc=3
    squeue -o '%.8i %.9P %.20j %.8T %.10M %.10l %R' || true
  fi
  return "$rc"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$ETC/slurm.conf" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
