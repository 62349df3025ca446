#!/usr/bin/env bash
# A second libvirt "host" on this machine, for migration tests: its own libvirtd + virtlogd in their
# own mount and UTS namespaces, with their own host UUID, hostname, config, state, logs, sockets and
# pid files under <dir>. The machine's main libvirtd and its files are never touched.
#
#   second-libvirtd.sh start <name> <dir>   start (or find running) and print the URI
#   second-libvirtd.sh uri <dir>            print the URI of a running one
#   second-libvirtd.sh stop <dir>           destroy its guests, stop its daemons, drop runtime state
#   second-libvirtd.sh purge <dir>          stop, then delete <dir>
#   second-libvirtd.sh daemon-stop <dir>    stop only libvirtd (its guests and virtlogd go on)
#   second-libvirtd.sh daemon-start <dir>   start libvirtd again in its namespace (after daemon-stop)
#   second-libvirtd.sh netns-exec <dir> -- cmd...   run cmd in the daemons' network namespace
#
# Inside the namespace private folders from <dir> are bind-mounted over /etc/libvirt,
# /run/libvirt, /var/lib/libvirt/qemu, /var/log/libvirt and /var/cache/libvirt. Everything else
# (notably /var/lib/libvirt/images and /var/lib/libvirt/boot) stays shared, so both hosts see the
# same guest disks at the same paths. The sockets live in <dir>/sock, outside the mounted folders,
# so clients in the main namespace reach them:
#   qemu+unix:///system?socket=<dir>/sock/libvirt-sock
# SECOND_LIBVIRTD_PRIVATE (colon-separated absolute folders, e.g. a console-log folder) gets a
# private copy under <dir>/private<folder> too, mounted over the folder in the namespace: files the
# daemon writes there stay its own, as on a host of its own.
# SECOND_LIBVIRTD_NETNS=1 at start gives the daemons a network namespace of their own too (only
# loopback, brought up): libvirt networks (bridges, dnsmasq) and guests' NICs exist only in there,
# and nothing in it routes anywhere else. Clients still reach the daemon through its unix socket;
# `netns-exec` runs a command (an SSH client, say) with the namespace's network. Without it the
# daemons share the machine's network (migration between two daemons goes over 127.0.0.1).
# Needs root (mount namespaces, QEMU as libvirt-qemu); works without systemd.
set -euo pipefail

usage() {
  echo "usage: $0 start <name> <dir> | uri <dir> | stop <dir> | purge <dir>" \
    "| daemon-stop <dir> | daemon-start <dir> | netns-exec <dir> -- cmd..." >&2
  exit 2
}

START_TIMEOUT=${SECOND_LIBVIRTD_START_TIMEOUT:-60}
STOP_TIMEOUT=${SECOND_LIBVIRTD_STOP_TIMEOUT:-20}
# Ports each daemon hands its guests: VNC displays, VNC websockets and incoming migrations. Every
# libvirtd checks that a port is free and then QEMU binds it, so daemons side by side with the same
# range race for the same port ("Failed to find an available port", seen with VNC on 5900). Each
# daemon here takes a window of its own at random in 20000-48847, clear of the main daemon's
# defaults (5900+, 5700+, 49152-49215); a collision of two windows is a 1 in 600 chance.
PORT_BASE=${SECOND_LIBVIRTD_PORT_BASE:-$((20000 + 48 * (RANDOM % 600)))}

uri_of() { echo "qemu+unix:///system?socket=$1/sock/libvirt-sock"; }

answers() { timeout 10 virsh -q -c "$(uri_of "$1")" version >/dev/null 2>&1; }

# The pid in a pid file if that process is alive and is the named program, else nothing.
live_pid() {
  local file=$1 comm=$2 pid
  [[ -s $file ]] || return 0
  pid=$(tr -dc '0-9' <"$file")
  [[ -n $pid && -d /proc/$pid ]] || return 0
  # A recycled pid must never be killed: check what the process is.
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] && echo "$pid"
  return 0
}

# Wait (up to a deadline) for a process to exit; SIGKILL it if it does not.
stop_pid() {
  local pid=$1 what=$2 deadline
  kill -TERM "$pid" 2>/dev/null || return 0
  deadline=$((SECONDS + STOP_TIMEOUT))
  while [[ -d /proc/$pid ]] && ((SECONDS < deadline)); do sleep 0.1; done
  if [[ -d /proc/$pid ]]; then
    echo "second-libvirtd: $what ($pid) ignored SIGTERM; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
    while [[ -d /proc/$pid ]]; do sleep 0.1; done
  fi
}

write_config() {
  local name=$1 dir=$2 host_uuid
  mkdir -p "$dir"/{etc,run,lib-qemu,log,cache,sock}
  mkdir -p "$dir"/etc/{qemu,qemu/networks,qemu/autostart,storage,storage/autostart,nwfilter,secrets}
  mkdir -p "$dir"/log/qemu "$dir"/cache/qemu
  chmod 0755 "$dir" "$dir"/{run,lib-qemu,log,cache,sock}
  if [[ ! -s $dir/host-uuid ]]; then
    # Kept across restarts: the host's identity must not change under its guests.
    cat /proc/sys/kernel/random/uuid >"$dir/host-uuid"
  fi
  host_uuid=$(cat "$dir/host-uuid")
  echo "$name" >"$dir/name"
  # Only settings this host needs; the main daemon runs on the built-in defaults too.
  cat >"$dir/etc/libvirtd.conf" <<EOF
# Written by scripts/second-libvirtd.sh for host "$name".
host_uuid = "$host_uuid"
unix_sock_dir = "$dir/sock"
unix_sock_group = "root"
unix_sock_ro_perms = "0777"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
  cat >"$dir/etc/qemu.conf" <<EOF
# Written by scripts/second-libvirtd.sh for host "$name".
# Both daemons would name their cgroups machine/qemu-<id>-<name>: keep this one out of cgroups.
cgroup_controllers = [ ]
remote_display_port_min = $PORT_BASE
remote_display_port_max = $((PORT_BASE + 15))
remote_websocket_port_min = $((PORT_BASE + 16))
remote_websocket_port_max = $((PORT_BASE + 31))
migration_port_min = $((PORT_BASE + 32))
migration_port_max = $((PORT_BASE + 47))
EOF
  cat >"$dir/etc/virtlogd.conf" <<EOF
# Written by scripts/second-libvirtd.sh for host "$name".
log_outputs = "3:file:/var/log/libvirt/virtlogd.log"
EOF
}

start() {
  local name=$1 dir=$2 uri deadline
  [[ $EUID -eq 0 ]] || { echo "second-libvirtd: needs root" >&2; exit 1; }
  [[ $name =~ ^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$ ]] || {
    echo "second-libvirtd: name must be a host name: $name" >&2
    exit 2
  }
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd -P)
  uri=$(uri_of "$dir")
  # Socket paths are limited to 107 bytes.
  if ((${#dir} + 20 > 107)); then
    echo "second-libvirtd: $dir is too long for a unix socket path" >&2
    exit 2
  fi
  # A running one is reused only if it has the network namespace asked for (or has none, alike).
  local want_netns=0 has_netns=0
  [[ ${SECOND_LIBVIRTD_NETNS:-0} != 1 ]] || want_netns=1
  [[ ! -e $dir/netns ]] || has_netns=1
  if ((want_netns == has_netns)) && [[ -n $(live_pid "$dir/libvirtd.pid" libvirtd) ]] &&
    answers "$dir"; then
    echo "$uri"
    return 0
  fi
  # Half started or left over: start afresh.
  stop "$dir" >/dev/null
  write_config "$name" "$dir"
  # unshare's default propagation is private: none of these mounts reach the main namespace.
  local private
  SECOND_LIBVIRTD_PRIVATE=${SECOND_LIBVIRTD_PRIVATE:-}
  for private in ${SECOND_LIBVIRTD_PRIVATE//:/ }; do
    [[ $private == /* ]] || { echo "second-libvirtd: not an absolute folder: $private" >&2; exit 2; }
    mkdir -p "$private" "$dir/private$private"
    chmod 0777 "$dir/private$private"
  done
  local netns=()
  rm -f "$dir/netns"
  if ((want_netns)); then
    netns=(--net)
    touch "$dir/netns"
  fi
  unshare --mount --uts "${netns[@]}" --propagation private -- /bin/bash -euc '
    dir=$1 name=$2 privates=$3
    hostname "$name"
    [[ ! -e $dir/netns ]] || ip link set lo up
    for private in ${privates//:/ }; do mount --bind "$dir/private$private" "$private"; done
    mount --bind "$dir/etc" /etc/libvirt
    mount --bind "$dir/run" /run/libvirt
    mount --bind "$dir/lib-qemu" /var/lib/libvirt/qemu
    mount --bind "$dir/log" /var/log/libvirt
    mount --bind "$dir/cache" /var/cache/libvirt
    virtlogd -d -p "$dir/virtlogd.pid"
    libvirtd -d -p "$dir/libvirtd.pid"
  ' second-libvirtd "$dir" "$name" "${SECOND_LIBVIRTD_PRIVATE:-}"
  deadline=$((SECONDS + START_TIMEOUT))
  until answers "$dir"; do
    if ((SECONDS >= deadline)); then
      echo "second-libvirtd: nothing answers at $uri after ${START_TIMEOUT} s" \
        "(see $dir/log/libvirtd.log)" >&2
      stop "$dir" >/dev/null
      exit 1
    fi
    sleep 0.2
  done
  echo "$uri"
}

stop() {
  local dir=$1 libvirtd_pid virtlogd_pid uri dom pidfile pid
  [[ -d $dir ]] || return 0
  dir=$(cd "$dir" && pwd -P)
  uri=$(uri_of "$dir")
  libvirtd_pid=$(live_pid "$dir/libvirtd.pid" libvirtd)
  virtlogd_pid=$(live_pid "$dir/virtlogd.pid" virtlogd)
  # Through libvirt first, so disk ownership and the domain's state files are put back.
  if [[ -n $libvirtd_pid ]] && answers "$dir"; then
    for dom in $(timeout 30 virsh -q -c "$uri" list --uuid 2>/dev/null || true); do
      timeout 30 virsh -q -c "$uri" destroy "$dom" >/dev/null 2>&1 || true
    done
  fi
  # QEMU outlives libvirtd by design; whatever libvirt could not destroy is killed by pid.
  for pidfile in "$dir"/run/qemu/*.pid; do
    [[ -e $pidfile ]] || continue
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid && -d /proc/$pid ]] || continue
    if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == qemu-system-* ]]; then
      stop_pid "$pid" "QEMU"
    fi
  done
  [[ -z $libvirtd_pid ]] || stop_pid "$libvirtd_pid" libvirtd
  [[ -z $virtlogd_pid ]] || stop_pid "$virtlogd_pid" virtlogd
  # The namespace (and its mounts) went with its last process; drop what only a live daemon uses.
  rm -rf "$dir/run" "$dir/sock"
  rm -f "$dir/libvirtd.pid" "$dir/virtlogd.pid" "$dir/netns"
}

# libvirtd alone, as a restart of the daemon on a real host: QEMU guests and virtlogd keep running,
# and virtlogd keeps the mount namespace, so libvirtd can start in it again.
daemon_stop() {
  local dir pid
  dir=$(cd "$1" && pwd -P)
  pid=$(live_pid "$dir/libvirtd.pid" libvirtd)
  [[ -z $pid ]] || stop_pid "$pid" libvirtd
  rm -f "$dir/libvirtd.pid"
}

daemon_start() {
  local dir vpid deadline
  dir=$(cd "$1" && pwd -P)
  if [[ -n $(live_pid "$dir/libvirtd.pid" libvirtd) ]] || answers "$dir"; then return 0; fi
  vpid=$(live_pid "$dir/virtlogd.pid" virtlogd)
  if [[ -z $vpid ]]; then
    echo "second-libvirtd: no virtlogd runs for $dir; use start instead" >&2
    exit 1
  fi
  # --net: the namespace virtlogd has, its own one or the machine's.
  nsenter --target "$vpid" --mount --uts --net -- libvirtd -d -p "$dir/libvirtd.pid"
  deadline=$((SECONDS + START_TIMEOUT))
  until answers "$dir"; do
    if ((SECONDS >= deadline)); then
      echo "second-libvirtd: libvirtd did not answer again at $(uri_of "$dir")" >&2
      exit 1
    fi
    sleep 0.2
  done
}

# Run a command in the network namespace of the daemons of <dir> (started with
# SECOND_LIBVIRTD_NETNS=1); refuses when they share the caller's network, so nothing meant for
# the namespace's private addresses goes out on the machine's.
netns_exec() {
  local dir=$1 pid
  shift
  dir=$(cd "$dir" && pwd -P)
  [[ -e $dir/netns ]] || {
    echo "second-libvirtd: $dir was not started with SECOND_LIBVIRTD_NETNS=1" >&2
    exit 1
  }
  pid=$(live_pid "$dir/libvirtd.pid" libvirtd)
  [[ -n $pid ]] || pid=$(live_pid "$dir/virtlogd.pid" virtlogd)
  [[ -n $pid ]] || { echo "second-libvirtd: no daemon runs for $dir" >&2; exit 1; }
  if [[ $(readlink "/proc/$pid/ns/net") == "$(readlink /proc/self/ns/net)" ]]; then
    echo "second-libvirtd: the daemons of $dir share this network namespace" >&2
    exit 1
  fi
  exec nsenter --net="/proc/$pid/ns/net" -- "$@"
}

case ${1:-} in
  start) (($# == 3)) || usage; start "$2" "$3" ;;
  uri)
    (($# == 2)) || usage
    dir=$(cd "$2" && pwd -P)
    answers "$dir" || { echo "second-libvirtd: nothing answers at $(uri_of "$dir")" >&2; exit 1; }
    uri_of "$dir"
    ;;
  stop) (($# == 2)) || usage; stop "$2" ;;
  daemon-stop) (($# == 2)) || usage; daemon_stop "$2" ;;
  daemon-start) (($# == 2)) || usage; daemon_start "$2" ;;
  netns-exec)
    (($# >= 4)) && [[ $3 == -- ]] || usage
    netns_exec "$2" "${@:4}"
    ;;
  purge)
    (($# == 2)) || usage
    stop "$2"
    rm -rf "$2"
    ;;
  *) usage ;;
esac
