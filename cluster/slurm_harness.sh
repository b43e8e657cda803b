#!/usr/bin/env bash
# A real Slurm for the tests (cluster/ and tests/test_slurm_*.py): one node on loopback, or N nodes on network
# namespaces.
#
#   bash cluster/slurm_harness.sh start    # install (Debian packages, once), configure, start, wait for an idle node
#   bash cluster/slurm_harness.sh start --nodes 2   # N nodes, each a network namespace with its own address
#   bash cluster/slurm_harness.sh status   # daemons, nodes, partitions, queue
#   bash cluster/slurm_harness.sh stop     # cancel every job, stop every daemon this script started
#   bash cluster/slurm_harness.sh env      # prints `export SLURM_CONF=...` for this cluster
#   bash cluster/slurm_harness.sh node-down 2 / node-up 2   # N nodes: kill node 2 without warning / restart it
#
# Needs root and apt-get. Runs munged, MariaDB, slurmdbd, slurmctld and slurmd by hand (no systemd, no
# cgroups, no `slurm` user), all as root, on loopback (N nodes: on a private bridge). Configuration, state, logs
# and pid files live in $LAMAMBA_SLURM_DIR (default: <repo>/.cache/slurm, ignored by git). Idempotent: `start`
# on a running cluster checks it and returns; `stop` on a stopped one does nothing.
#
# N nodes (`--nodes N`, N >= 2): node1..nodeN, each a network namespace (lamamba-node<k>) joined to the host by a
# veth pair on a bridge (lamamba-br0, 10.77.0.1/24; node k is 10.77.0.(10+k)) with its own hostname (a UTS
# namespace), running its own slurmd (`slurmd -N node<k>`). slurmctld, slurmdbd, MariaDB and munged stay on the
# host (slurmctld and slurmdbd reachable at 10.77.0.1); the filesystem is shared, as a cluster's shared storage
# is. The node names resolve through a marked block in /etc/hosts. `stop` removes every daemon, namespace, link
# and hosts entry it made, also after a failed start. The mode of the running cluster is kept in $D/nodes.
#
# Two partitions share the node(s), for preemption drills:
#   low  (default, PriorityTier=1,  PreemptMode=REQUEUE): preemptible; a preempted job gets SIGUSR2 (its
#        --signal) at once, then SIGTERM and, GraceTime + KillWait later, SIGKILL; Slurm requeues it.
#   high (PriorityTier=10, PreemptMode=OFF): jobs here preempt jobs in `low`.
# Settings that matter: preempt_send_user_signal (else Slurm sends SIGTERM
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
BRIDGE=lamamba-br0
NET_PREFIX=10.77.0
HOSTS_MARK="# lamamba slurm harness"
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

  # One node on loopback, or node1..nodeN at their namespaces' addresses (slurmd files per node: %n)
  local what="a one-node test cluster on loopback" ctld_addr=127.0.0.1 nodelist=localhost nodes_conf
  local d_pid="$RUN/slurmd.pid" d_spool="$SPOOL/d" d_log="$LOG/slurmd.log" k state="$SPOOL/ctld" first_job=1
  nodes_conf="NodeName=localhost NodeAddr=127.0.0.1 $node_hw State=UNKNOWN"
  if [ "$NODES" -gt 1 ]; then
    what="a $NODES-node test cluster on network namespaces"
    ctld_addr="$NET_PREFIX.1"; nodelist="node[1-$NODES]"
    d_pid="$RUN/slurmd-%n.pid"; d_spool="$SPOOL/d-%n"; d_log="$LOG/slurmd-%n.log"
    # slurmctld's own state for this layout, and job ids that never repeat the one-node cluster's (the same
    # accounting database: sacct must not mix the two clusters' jobs)
    state="$SPOOL/ctld-$NODES"; first_job=$((NODES * 100000))
    mkdir -p "$state"
    nodes_conf=""
    for k in $(seq 1 "$NODES"); do
      nodes_conf+="NodeName=node$k NodeAddr=$(node_addr "$k") $node_hw State=UNKNOWN"$'\n'
    done
  fi

  cat >"$ETC/slurm.conf" <<EOF
# Written by cluster/slurm_harness.sh: $what. Do not use in production.
ClusterName=$CLUSTER
SlurmctldHost=localhost($ctld_addr)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may start again 10 s after it ended (default 120 s).
AuthInfo=cred_expire=10
StateSaveLocation=$state
FirstJobId=$first_job
SlurmdSpoolDir=$d_spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$d_pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$d_log
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
$nodes_conf
PartitionName=low Nodes=$nodelist Default=YES PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_TIME MaxTime=INFINITE State=UP
PartitionName=high Nodes=$nodelist Default=NO PriorityTier=10 PreemptMode=OFF MaxTime=INFINITE State=UP
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
  # unless SLURM_CONF is set: link it there when nothing else owns that path (or only a stale harness link does).
  if [ ! -e /etc/slurm/slurm.conf ] || is_our_link || is_stale_harness_link; then
    mkdir -p /etc/slurm
    ln -sfn "$ETC/slurm.conf" /etc/slurm/slurm.conf
  else
    say "note: /etc/slurm/slurm.conf belongs to someone else; export SLURM_CONF=$ETC/slurm.conf to use this cluster"
  fi
}

is_stale_harness_link() {
  # A link that another checkout's harness left (its run ended without `stop`): its cluster is not running (its
  # slurmctld's pid file names no live process), so the link names a dead cluster. A live one is left alone: both
  # would use the same ports, and this start fails on them instead.
  local conf
  [ -L /etc/slurm/slurm.conf ] || return 1
  conf="$(readlink /etc/slurm/slurm.conf)"
  head -n 1 "$conf" 2>/dev/null | grep -q '^# Written by cluster/slurm_harness.sh' || return 1
  ! pid_alive "$(sed -n 's/^SlurmctldPidFile=//p' "$conf")"
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
  if [ "$NODES" -gt 1 ]; then
    local k
    for k in $(seq 1 "$NODES"); do start_node_slurmd "$k"; done
    return 0
  fi
  pid_alive "$RUN/slurmd.pid" && return 0
  slurmd -f "$SLURM_CONF" -N localhost || die "slurmd failed to start: $(tail -n 3 "$LOG/slurmd.log")"
}

# ------------------------------------------------------------------------------------------- N nodes
node_addr() { echo "$NET_PREFIX.$((10 + $1))"; }
node_ns() { echo "lamamba-node$1"; }

start_network() {  # the bridge, one namespace + veth pair per node, and the names in /etc/hosts
  command -v ip >/dev/null || die "the 'ip' command (iproute2) is needed for --nodes"
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$NET_PREFIX.1/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  local k ns
  for k in $(seq 1 "$NODES"); do
    ns="$(node_ns "$k")"
    ip netns list | grep -qw "^$ns" || ip netns add "$ns"
    if ! ip link show "lmb-h$k" >/dev/null 2>&1; then
      ip link add "lmb-h$k" type veth peer name "lmb-n$k"
      ip link set "lmb-n$k" netns "$ns"
      ip link set "lmb-h$k" master "$BRIDGE"
      ip netns exec "$ns" ip addr add "$(node_addr "$k")/24" dev "lmb-n$k"
    fi
    ip link set "lmb-h$k" up
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" ip link set "lmb-n$k" up
  done
  hosts_block_remove
  {
    echo "$HOSTS_MARK: begin"
    for k in $(seq 1 "$NODES"); do echo "$(node_addr "$k") node$k"; done
    echo "$HOSTS_MARK: end"
  } >>/etc/hosts
  for k in $(seq 1 "$NODES"); do  # (reachability shows when the node's slurmd registers with slurmctld)
    wait_for 10 "node$k's address" sh -c "ip netns exec $(node_ns "$k") ip -o addr show dev lmb-n$k | grep -q 'inet '"
  done
}

hosts_block_remove() {
  [ -w /etc/hosts ] || return 0
  if grep -q "^$HOSTS_MARK: begin" /etc/hosts; then
    # in place (not a rename: /etc/hosts may be a bind mount)
    local kept
    kept="$(sed "/^$HOSTS_MARK: begin/,/^$HOSTS_MARK: end/d" /etc/hosts)"
    printf '%s\n' "$kept" >/etc/hosts
  fi
}

start_node_slurmd() {  # slurmd of node K inside its namespace, with its own hostname
  local k="$1" ns
  ns="$(node_ns "$k")"
  pid_alive "$RUN/slurmd-node$k.pid" && return 0
  mkdir -p "$SPOOL/d-node$k"
  # nsenter, not `ip netns exec`: that one also remounts /sys for the namespace, and slurmd needs the host's
  # /sys/fs/cgroup
  nsenter --net="/run/netns/$ns" unshare --uts sh -c "hostname node$k && exec slurmd -f '$SLURM_CONF' -N node$k" \
    || die "slurmd of node$k failed to start: $(tail -n 3 "$LOG/slurmd-node$k.log" 2>/dev/null)"
}

stop_network() {  # everything start_network made, whatever state a failed start left
  local ns k
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^lamamba-node' || true); do
    # anything still running in the namespace (a job's tasks after a failure) goes with it
    for pid in $(ip netns pids "$ns" 2>/dev/null || true); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  for k in $(ip -o link show 2>/dev/null | sed -n 's/^[0-9]*: lmb-h\([0-9]*\)[@:].*/\1/p'); do
    ip link del "lmb-h$k" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  hosts_block_remove
}

cmd_node() {  # node-down K | node-up K (N-node mode): fail node K without warning, or bring it back
  local action="$1" k="${2:-}"
  [ "$NODES" -gt 1 ] || die "$action: the cluster in $D is not an N-node one (start --nodes N)"
  [[ "$k" =~ ^[0-9]+$ ]] && [ "$k" -ge 1 ] && [ "$k" -le "$NODES" ] || die "$action: expected a node number 1..$NODES"
  if [ "$action" = node-down ]; then
    # SIGKILL to the node's slurmd and to everything else in its namespace (slurmstepd, the job's tasks): what a
    # node that loses power or network looks like to the rest of the cluster
    local pids
    pids="$(ip netns pids "$(node_ns "$k")" 2>/dev/null | tr '\n' ' ')"
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
    rm -f "$RUN/slurmd-node$k.pid"
    say "node$k down (killed: ${pids:-nothing})"
  else
    start_node_slurmd "$k"
    say "node$k's slurmd started again"
  fi
}

node_names() {
  if [ "$NODES" -gt 1 ]; then seq -f 'node%g' 1 "$NODES"; else echo localhost; fi
}

node_state() { sinfo -h -N -n "${1:-localhost}" -o %t 2>/dev/null | head -1; }

node_usable() {
  local s
  s="$(node_state)"
  case "$s" in idle|idle\*|mix|alloc|comp) return 0 ;; esac
  return 1
}

wait_node_idle() {  # wait_node_idle [NODE]
  local node="${1:-localhost}" end=$((SECONDS + 90)) s
  while :; do
    s="$(node_state "$node")"
    case "$s" in
      idle|mix|alloc) return 0 ;;
      down*|drain*|drng*|fail*|inval*)
        # A node that was down (e.g. after a stop/start) comes back with RESUME.
        scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true ;;
    esac
    [ "$SECONDS" -ge "$end" ] && die "node $node not idle after 90 s (state: '$s'; logs in $LOG)"
    sleep 0.5
  done
}

cmd_start() {
  need_root
  NODES=1
  while [ $# -gt 0 ]; do
    case "$1" in
      --nodes) NODES="${2:-}"; shift 2 || die "--nodes needs a number" ;;
      --nodes=*) NODES="${1#--nodes=}"; shift ;;
      *) die "start: unknown option '$1' (usage: start [--nodes N])" ;;
    esac
  done
  [[ "$NODES" =~ ^[1-9][0-9]?$ ]] || die "--nodes: expected a number from 1 to 99, got '$NODES'"
  if [ -f "$D/nodes" ] && [ "$(cat "$D/nodes")" != "$NODES" ] && pid_alive "$RUN/slurmctld.pid"; then
    die "a $(cat "$D/nodes")-node cluster is running from $D: stop it first"
  fi
  install_packages
  mkdir -p "$D"
  echo "$NODES" >"$D/nodes"
  write_configs
  local t0=$SECONDS node
  [ "$NODES" -gt 1 ] && start_network
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurmctld
  start_slurmd
  for node in $(node_names); do wait_node_idle "$node"; done
  say "up in $((SECONDS - t0)) s: $(sinfo -h -o '%P:%t:%D nodes:%c cpus' | tr '\n' ' ')(SLURM_CONF=$SLURM_CONF)"
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
  [ -d "$RUN" ] || { stop_network; rm -f "$D/nodes"; say "not started (no $RUN)"; return 0; }
  cancel_all_jobs
  stop_pidfile slurmd "$RUN/slurmd.pid"
  local f
  for f in "$RUN"/slurmd-*.pid; do [ -e "$f" ] && stop_pidfile "slurmd $(basename "$f" .pid)" "$f"; done
  stop_pidfile slurmctld "$RUN/slurmctld.pid"
  stop_pidfile slurmdbd "$RUN/slurmdbd.pid"
  stop_pidfile mariadbd "$RUN/mysqld.pid"
  stop_pidfile munged "$RUN/munged.pid"
  if is_our_link; then rm -f /etc/slurm/slurm.conf; fi
  stop_network
  rm -f "$D/nodes"
  say "stopped"
}

cmd_status() {
  local n rc=0 daemons=(munged mysqld slurmdbd slurmctld)
  for n in $(node_names); do
    if [ "$NODES" -gt 1 ]; then daemons+=("slurmd-$n"); else daemons+=(slurmd); fi
  done
  for n in "${daemons[@]}"; do
    if pid_alive "$RUN/$n.pid"; then echo "$n: running (pid $(cat "$RUN/$n.pid"))"; else echo "$n: stopped"; rc=3; fi
  done
  if [ "$rc" = 0 ]; then
    sinfo -o '%P %a %l %D %t %c %G' || rc=3
    [ "$NODES" -gt 1 ] && { sinfo -N -o '%N %t %c %m' || rc=3; }
    squeue -o '%.8i %.9P %.20j %.8T %.10M %.10l %R' || true
  fi
  return "$rc"
}

# the mode of the cluster in $D (status and stop follow it)
NODES="$(cat "$D/nodes" 2>/dev/null || echo 1)"
[[ "$NODES" =~ ^[0-9]+$ ]] || NODES=1

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$ETC/slurm.conf" ;;
  node-down|node-up) cmd_node "$1" "${2:-}" ;;
  *) echo "usage: $0 start [--nodes N]|stop|status|env|node-down K|node-up K" >&2; exit 2 ;;
esac
