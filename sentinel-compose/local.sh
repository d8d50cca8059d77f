#!/usr/bin/env bash
# Start or stop the compose.yaml topology (1 primary, 2 replicas, 3 sentinels)
# from the local redis-server binary, on loopback, reading the same config
# files as compose.yaml plus port/dir overrides on the command line.
#
#   local.sh start DIR [PRIMARY REPLICA1 REPLICA2 SENTINEL1 SENTINEL2 SENTINEL3]
#   local.sh stop  DIR
#   local.sh restart-node DIR PORT   (a killed data node, as a bare instance:
#                                    Sentinel converts it into a replica)
#
# Ports default to 7000 7001 7002 27000 27001 27002. DIR must be absolute
# (redis chdirs to --dir before opening the log file); each node gets
# DIR/<port>/ with its pidfile, log and AOF. `start` returns once every
# sentinel sees 2 replicas and 2 other sentinels and CKQUORUM is OK.
#
# Environment overrides (tests use short timings):
#   MASTER_NAME          (mymaster)
#   DOWN_AFTER_MS        sentinel down-after-milliseconds (from sentinel.conf)
#   FAILOVER_TIMEOUT_MS  sentinel failover-timeout        (from sentinel.conf)
#   MIN_REPLICAS_MAX_LAG min-replicas-max-lag             (from the redis confs)
#   READY_TIMEOUT_S      how long `start` waits for the sentinels (30)
#   REDIS_SERVER         binary (redis-server on PATH)
#
# The secured variant (secure/: TLS only, passwords, an ACL user for Warren)
# when SECURE_DIR is set: a directory holding ca.crt, redis.crt and
# redis.key (secure/make-certs.sh makes them), with
#   DATA_PASSWORD        the data nodes' requirepass and masterauth
#   WARREN_PASSWORD      the password of the data nodes' ACL user `warren`
#   SENTINEL_PASSWORD    the sentinels' requirepass
#
# `stop` signals only the PIDs in DIR's own pidfiles.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REDIS_SERVER=${REDIS_SERVER:-redis-server}
MASTER_NAME=${MASTER_NAME:-mymaster}

SECURE_DIR=${SECURE_DIR:-}
if [ -n "$SECURE_DIR" ]; then
  : "${DATA_PASSWORD:?SECURE_DIR needs DATA_PASSWORD}"
  : "${WARREN_PASSWORD:?SECURE_DIR needs WARREN_PASSWORD}"
  : "${SENTINEL_PASSWORD:?SECURE_DIR needs SENTINEL_PASSWORD}"
  export DATA_PASSWORD WARREN_PASSWORD SENTINEL_PASSWORD
fi

# secure/<file> with its placeholders filled in.
secure_conf() {
  TLS_DIR=$SECURE_DIR MASTER_NAME=$MASTER_NAME sh "$HERE/secure/render.sh" "$1"
}

# redis-cli against a local node: the data nodes' or the sentinels'
# password, over TLS in the secured variant.
cli() { # data|sentinel port args...
  local kind=$1 port=$2; shift 2
  local args=(-p "$port")
  if [ -n "$SECURE_DIR" ]; then
    args+=(--tls --cacert "$SECURE_DIR/ca.crt" --no-auth-warning)
    if [ "$kind" = sentinel ]; then args+=(-a "$SENTINEL_PASSWORD"); else args+=(-a "$DATA_PASSWORD"); fi
  fi
  redis-cli "${args[@]}" "$@"
}

usage() { echo "usage: $0 start|stop DIR [primary r1 r2 s1 s2 s3]" >&2; exit 64; }

[ $# -ge 2 ] || usage
CMD=$1; DIR=$2; shift 2
case "$DIR" in /*) ;; *) echo "DIR must be an absolute path" >&2; exit 64 ;; esac

if [ "$CMD" = restart-node ]; then
  [ $# -eq 1 ] || usage
  RESTART_PORT=$1; shift
fi

if [ $# -eq 6 ]; then
  P=$1; R1=$2; R2=$3; S1=$4; S2=$5; S3=$6
elif [ $# -eq 0 ]; then
  P=7000; R1=7001; R2=7002; S1=27000; S2=27001; S3=27002
else
  usage
fi

data_node() { # port conf [replicaof-port]
  local port=$1 conf=$2
  mkdir -p "$DIR/$port"
  # Sentinel sends CONFIG REWRITE when it reconfigures a node: run from a
  # private copy so the shared file is never rewritten.
  cp "$HERE/$conf" "$DIR/$port/redis.conf"
  local listen=(--port "$port")
  if [ -n "$SECURE_DIR" ]; then
    secure_conf redis.conf >> "$DIR/$port/redis.conf"
    listen=(--port 0 --tls-port "$port")
  fi
  local args=("$DIR/$port/redis.conf"
    "${listen[@]}" --bind 127.0.0.1 --dir "$DIR/$port" --daemonize yes
    --pidfile "$DIR/$port/redis.pid" --logfile "$DIR/$port/redis.log"
    --replica-announce-ip 127.0.0.1)
  [ -n "${MIN_REPLICAS_MAX_LAG:-}" ] && args+=(--min-replicas-max-lag "$MIN_REPLICAS_MAX_LAG")
  [ $# -ge 3 ] && args+=(--replicaof 127.0.0.1 "$3")
  "$REDIS_SERVER" "${args[@]}"
}

sentinel_node() { # port
  local port=$1 conf="$DIR/sentinel-$1.conf"
  # Same template as compose.yaml, with loopback addresses instead of
  # container host names; sentinel rewrites this copy.
  sed -e "s/^sentinel monitor .*/sentinel monitor $MASTER_NAME 127.0.0.1 $P 2/" \
      -e "s/^sentinel resolve-hostnames .*/sentinel resolve-hostnames no/" \
      -e "s/^sentinel announce-hostnames .*/sentinel announce-hostnames no/" \
      -e "s/ mymaster / $MASTER_NAME /" \
      "$HERE/sentinel.conf" > "$conf"
  if [ -n "$SECURE_DIR" ]; then
    secure_conf sentinel.conf >> "$conf"
  fi
  {
    if [ -n "$SECURE_DIR" ]; then echo "port 0"; echo "tls-port $port"; else echo "port $port"; fi
    echo "bind 127.0.0.1"
    echo "daemonize yes"
    echo "pidfile $DIR/sentinel-$port.pid"
    echo "logfile $DIR/sentinel-$port.log"
    echo "dir $DIR"
    [ -n "${DOWN_AFTER_MS:-}" ] && echo "sentinel down-after-milliseconds $MASTER_NAME $DOWN_AFTER_MS"
    [ -n "${FAILOVER_TIMEOUT_MS:-}" ] && echo "sentinel failover-timeout $MASTER_NAME $FAILOVER_TIMEOUT_MS"
    true
  } >> "$conf"
  "$REDIS_SERVER" "$conf" --sentinel
}

sentinels_ready() {
  local s out
  for s in "$S1" "$S2" "$S3"; do
    out=$(cli sentinel "$s" sentinel master "$MASTER_NAME" 2>/dev/null | paste - - |
      awk '$1=="num-slaves"{a=$2} $1=="num-other-sentinels"{b=$2} END{print a"/"b}')
    [ "$out" = "2/2" ] || return 1
  done
  cli sentinel "$S1" sentinel ckquorum "$MASTER_NAME" 2>/dev/null | grep -q '^OK'
}

start() {
  mkdir -p "$DIR"
  data_node "$P" redis-primary.conf
  data_node "$R1" redis-replica.conf "$P"
  data_node "$R2" redis-replica.conf "$P"
  for s in "$S1" "$S2" "$S3"; do sentinel_node "$s"; done
  local deadline=$((SECONDS + ${READY_TIMEOUT_S:-30}))
  until sentinels_ready; do
    if [ $SECONDS -ge $deadline ]; then
      echo "sentinels did not agree within ${READY_TIMEOUT_S:-30}s (logs in $DIR)" >&2
      exit 1
    fi
    sleep 0.1
  done
}

stop() {
  local f pids=()
  shopt -s nullglob
  for f in "$DIR"/*/redis.pid "$DIR"/sentinel-*.pid; do
    pids+=("$(cat "$f")")
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  # A node a test froze with SIGSTOP would ignore SIGTERM until resumed.
  kill -CONT "${pids[@]}" 2>/dev/null || true
  kill "${pids[@]}" 2>/dev/null || true
  local deadline=$((SECONDS + 10)) p alive
  while :; do
    alive=()
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
    [ ${#alive[@]} -eq 0 ] && break
    if [ $SECONDS -ge $deadline ]; then kill -9 "${alive[@]}" 2>/dev/null || true; break; fi
    sleep 0.05
  done
  rm -f "$DIR"/*/redis.pid "$DIR"/sentinel-*.pid
}

case "$CMD" in
  start) start ;;
  restart-node) data_node "$RESTART_PORT" redis-primary.conf ;;
  stop) stop ;;
  *) usage ;;
esac
