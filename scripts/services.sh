#!/usr/bin/env bash
# Start, stop or check the local services the test-suite talks to.
#
#   bash scripts/services.sh start [ntp] [mqtt] [postgres] [redis]   (default: all)
#   bash scripts/services.sh status
#   bash scripts/services.sh stop
#
# ntp      a real chronyd serving NTP on 127.0.0.1:<free port>; started with -x, so it never
#          touches the system clock ("local stratum 8": it answers at once, unsynchronised).
# mqtt     mosquitto on 127.0.0.1:<free port>, anonymous, own pid/persistence/log files.
# postgres scripts/postgres.sh start var/run/postgres (storage area): a private PostgreSQL
#          cluster plus a Tiled server on it; skipped if that script does not exist.
# redis    redis-server on 127.0.0.1:<free port> (the queue of bluesky-queueserver), no
#          persistence, own pid/log files.
#
# Everything lives under the runtime directory $SMARTMETER_RUN_DIR (default var/run/, git-ignored).
# The addresses are written to $SMARTMETER_RUN_DIR/services.env as KEY=VALUE lines, which
# tests/conftest.py reads:
#   SMARTMETER_NTP_HOST / SMARTMETER_NTP_PORT     (or SMARTMETER_NTP_MISSING=<debian package>)
#   SMARTMETER_MQTT_HOST / SMARTMETER_MQTT_PORT   (or SMARTMETER_MQTT_MISSING=<debian package>)
#   SMARTMETER_REDIS_HOST / SMARTMETER_REDIS_PORT (or SMARTMETER_REDIS_MISSING=<debian package>)
#   SMARTMETER_POSTGRES_DIR plus postgres.sh's TILED_URI, TILED_API_KEY, TILED_HDF5_DIR,
#   PG_PORT, PG_URI (when postgres was started)
#
# A missing binary is reported but is not an error here (the tests that need it fail or skip
# with the package name); a binary that is present but does not answer is an error (exit 1).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="${SMARTMETER_RUN_DIR:-$ROOT/var/run}"
mkdir -p "$RUN_DIR"
RUN_DIR="$(cd "$RUN_DIR" && pwd)"   # daemons chdir to /, so every path must be absolute
ENV_FILE="$RUN_DIR/services.env"
HOST=127.0.0.1
PATH="$PATH:/usr/sbin:/sbin"         # chronyd and mosquitto live in sbin
PYTHON="$(command -v python3 || command -v python3.11 || true)"
START_TIMEOUT_S=10

say() { printf 'services: %s\n' "$*"; }
die() { printf 'services: ERROR: %s\n' "$*" >&2; exit 1; }

[[ -n "$PYTHON" ]] || die "python3 not found (needed to pick ports and probe the services)"

# ---------------------------------------------------------------------------- helpers

free_port() {  # $1 = tcp|udp; the kernel picks a free port, we release it and reuse the number
  "$PYTHON" - "$1" <<'EOF'
import socket, sys
kind = socket.SOCK_STREAM if sys.argv[1] == "tcp" else socket.SOCK_DGRAM
with socket.socket(socket.AF_INET, kind) as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
EOF
}

probe_ntp() {  # $1 = port; one 48-byte SNTP client request, expects a 48-byte server reply
  "$PYTHON" - "$HOST" "$1" <<'EOF'
import socket, sys
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.settimeout(0.5)
    s.sendto(b"\xe3" + bytes(47), (sys.argv[1], int(sys.argv[2])))
    reply, _ = s.recvfrom(512)
mode = reply[0] & 0x07
sys.exit(0 if len(reply) >= 48 and mode == 4 else 1)
EOF
}

probe_tcp() {  # $1 = port; a TCP connect is enough to know the broker/server listens
  "$PYTHON" - "$HOST" "$1" <<'EOF'
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=0.5).close()
EOF
}

wait_until() {  # $1 = probe function, $2 = port; retries for START_TIMEOUT_S
  local deadline=$((SECONDS + START_TIMEOUT_S))
  until "$1" "$2" 2>/dev/null; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

pid_of() {  # $1 = pid file; prints the pid if that process is alive
  local pid
  [[ -s "$1" ]] || return 1
  pid="$(tr -dc '0-9' <"$1")"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

env_value() {  # $1 = key; prints its value from the env file
  [[ -f "$ENV_FILE" ]] || return 1
  sed -n "s/^$1=//p" "$ENV_FILE" | tail -n 1
}

stop_pidfile() {  # $1 = label, $2 = pid file, $3 = text our process's command line must contain
  local pid
  pid="$(pid_of "$2")" || { rm -f "$2"; return 0; }
  if ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$3"; then
    say "$1: pid $pid is not ours (command line lacks $3); leaving it alone"
    return 0
  fi
  kill "$pid"
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
  rm -f "$2"
  say "$1: stopped (pid $pid)"
}

# ---------------------------------------------------------------------------- chrony (NTP)

CHRONY_DIR="$RUN_DIR/chrony"
CHRONY_CONF="$CHRONY_DIR/chrony.conf"
CHRONY_PID="$CHRONY_DIR/chronyd.pid"

start_ntp() {
  if ! command -v chronyd >/dev/null; then
    say "ntp: chronyd not found (Debian package 'chrony'; scripts/setup.sh installs it)"
    echo "SMARTMETER_NTP_MISSING=chrony" >>"$ENV_FILE.new"
    return 0
  fi
  mkdir -p "$CHRONY_DIR"
  local port user_opt attempt
  if [[ "$(id -u)" == 0 ]]; then user_opt=(-u root); else user_opt=(-U); fi
  for attempt in 1 2 3; do   # the free port can be taken between picking and binding
    port="$(free_port udp)"
    cat >"$CHRONY_CONF" <<EOF
# written by scripts/services.sh -- a private NTP server for the tests
port $port
bindaddress $HOST
allow $HOST
local stratum 8
cmdport 0
bindcmdaddress /
driftfile $CHRONY_DIR/chrony.drift
pidfile $CHRONY_PID
EOF
    rm -f "$CHRONY_PID"
    chronyd -f "$CHRONY_CONF" -x "${user_opt[@]}" -l "$CHRONY_DIR/chronyd.log" \
      </dev/null >>"$CHRONY_DIR/chronyd.log" 2>&1 \
      || die "ntp: chronyd refused to start; see $CHRONY_DIR/chronyd.log"
    if wait_until probe_ntp "$port"; then
      echo "SMARTMETER_NTP_HOST=$HOST" >>"$ENV_FILE.new"
      echo "SMARTMETER_NTP_PORT=$port" >>"$ENV_FILE.new"
      say "ntp: chronyd answers on $HOST:$port (pid $(pid_of "$CHRONY_PID"))"
      return 0
    fi
    stop_pidfile ntp "$CHRONY_PID" "$CHRONY_CONF"
    say "ntp: no SNTP answer on port $port (attempt $attempt)"
  done
  die "ntp: chronyd never answered; see $CHRONY_DIR/chronyd.log"
}

# ---------------------------------------------------------------------------- mosquitto (MQTT)

MQTT_DIR="$RUN_DIR/mosquitto"
MQTT_CONF="$MQTT_DIR/mosquitto.conf"
MQTT_PID="$MQTT_DIR/mosquitto.pid"

start_mqtt() {
  if ! command -v mosquitto >/dev/null; then
    say "mqtt: mosquitto not found (Debian package 'mosquitto'; scripts/setup.sh installs it)"
    echo "SMARTMETER_MQTT_MISSING=mosquitto" >>"$ENV_FILE.new"
    return 0
  fi
  mkdir -p "$MQTT_DIR/data"
  local port attempt user_line=""
  # As root mosquitto would switch to the 'mosquitto' user, which cannot write our files.
  [[ "$(id -u)" == 0 ]] && user_line="user root"
  for attempt in 1 2 3; do
    port="$(free_port tcp)"
    cat >"$MQTT_CONF" <<EOF
# written by scripts/services.sh -- a private MQTT broker for the tests
listener $port $HOST
allow_anonymous true
pid_file $MQTT_PID
persistence true
persistence_location $MQTT_DIR/data/
log_dest file $MQTT_DIR/mosquitto.log
$user_line
EOF
    rm -f "$MQTT_PID"
    # Its own output (e.g. the "should not be run as root" warning) goes next to its log.
    mosquitto -c "$MQTT_CONF" -d </dev/null >>"$MQTT_DIR/mosquitto.out" 2>&1 \
      || die "mqtt: mosquitto refused to start; see $MQTT_DIR/mosquitto.out and mosquitto.log"
    if wait_until probe_tcp "$port"; then
      echo "SMARTMETER_MQTT_HOST=$HOST" >>"$ENV_FILE.new"
      echo "SMARTMETER_MQTT_PORT=$port" >>"$ENV_FILE.new"
      say "mqtt: mosquitto listens on $HOST:$port (pid $(pid_of "$MQTT_PID"))"
      return 0
    fi
    stop_pidfile mqtt "$MQTT_PID" "$MQTT_CONF"
    say "mqtt: no TCP answer on port $port (attempt $attempt)"
  done
  die "mqtt: mosquitto never answered; see $MQTT_DIR/mosquitto.log"
}

# ---------------------------------------------------------------------------- redis (queueserver)

REDIS_DIR="$RUN_DIR/redis"
REDIS_PID="$REDIS_DIR/redis.pid"

start_redis() {
  if ! command -v redis-server >/dev/null; then
    say "redis: redis-server not found (Debian package 'redis-server'; scripts/setup.sh installs it)"
    echo "SMARTMETER_REDIS_MISSING=redis-server" >>"$ENV_FILE.new"
    return 0
  fi
  mkdir -p "$REDIS_DIR"
  local port attempt
  for attempt in 1 2 3; do
    port="$(free_port tcp)"
    rm -f "$REDIS_PID"
    redis-server --bind "$HOST" --port "$port" --dir "$REDIS_DIR" --daemonize yes \
      --pidfile "$REDIS_PID" --logfile "$REDIS_DIR/redis.log" --save "" --appendonly no \
      </dev/null >>"$REDIS_DIR/redis.out" 2>&1 \
      || die "redis: redis-server refused to start; see $REDIS_DIR/redis.log"
    if wait_until probe_tcp "$port"; then
      echo "SMARTMETER_REDIS_HOST=$HOST" >>"$ENV_FILE.new"
      echo "SMARTMETER_REDIS_PORT=$port" >>"$ENV_FILE.new"
      say "redis: redis-server listens on $HOST:$port (pid $(pid_of "$REDIS_PID"))"
      return 0
    fi
    stop_pidfile redis "$REDIS_PID" "redis-server"
    say "redis: no TCP answer on port $port (attempt $attempt)"
  done
  die "redis: redis-server never answered; see $REDIS_DIR/redis.log"
}

# ---------------------------------------------------------------------------- postgres (delegated)

POSTGRES_SCRIPT="$ROOT/scripts/postgres.sh"
POSTGRES_DIR="$RUN_DIR/postgres"

start_postgres() {
  if [[ ! -f "$POSTGRES_SCRIPT" ]]; then
    say "postgres: scripts/postgres.sh not present; skipped"
    return 0
  fi
  # postgres.sh prints its env (with the API key) on stdout: keep it in a log, not on screen.
  bash "$POSTGRES_SCRIPT" start "$POSTGRES_DIR" >"$RUN_DIR/postgres.log" 2>&1 \
    || die "postgres: scripts/postgres.sh start failed; see $RUN_DIR/postgres.log"
  echo "SMARTMETER_POSTGRES_DIR=$POSTGRES_DIR" >>"$ENV_FILE.new"
  cat "$POSTGRES_DIR/tiled.env" >>"$ENV_FILE.new"
  say "postgres: PostgreSQL + Tiled at $(sed -n 's/^TILED_URI=//p' "$POSTGRES_DIR/tiled.env")"
}

# ---------------------------------------------------------------------------- commands

status() {  # one line; exit 0 only if every service listed in the env file answers
  if [[ ! -f "$ENV_FILE" ]]; then say "not running (no $ENV_FILE)"; return 3; fi
  local parts=() ok=0 port pid
  if port="$(env_value SMARTMETER_NTP_PORT)" && [[ -n "$port" ]]; then
    pid="$(pid_of "$CHRONY_PID")" || pid="?"
    if probe_ntp "$port" 2>/dev/null; then parts+=("ntp=$HOST:$port ok (pid $pid)")
    else parts+=("ntp=$HOST:$port DOWN"); ok=1; fi
  elif [[ -n "$(env_value SMARTMETER_NTP_MISSING)" ]]; then parts+=("ntp=missing(chrony)"); fi
  if port="$(env_value SMARTMETER_MQTT_PORT)" && [[ -n "$port" ]]; then
    pid="$(pid_of "$MQTT_PID")" || pid="?"
    if probe_tcp "$port" 2>/dev/null; then parts+=("mqtt=$HOST:$port ok (pid $pid)")
    else parts+=("mqtt=$HOST:$port DOWN"); ok=1; fi
  elif [[ -n "$(env_value SMARTMETER_MQTT_MISSING)" ]]; then parts+=("mqtt=missing(mosquitto)"); fi
  if port="$(env_value SMARTMETER_REDIS_PORT)" && [[ -n "$port" ]]; then
    pid="$(pid_of "$REDIS_PID")" || pid="?"
    if probe_tcp "$port" 2>/dev/null; then parts+=("redis=$HOST:$port ok (pid $pid)")
    else parts+=("redis=$HOST:$port DOWN"); ok=1; fi
  elif [[ -n "$(env_value SMARTMETER_REDIS_MISSING)" ]]; then parts+=("redis=missing(redis-server)"); fi
  if [[ -n "$(env_value SMARTMETER_POSTGRES_DIR)" ]]; then
    local tiled_port pg_port
    tiled_port="$(env_value TILED_URI | sed -n 's/.*:\([0-9]*\)$/\1/p')"
    pg_port="$(env_value PG_PORT)"
    if probe_tcp "$pg_port" 2>/dev/null && probe_tcp "$tiled_port" 2>/dev/null; then
      parts+=("postgres=$HOST:$pg_port ok tiled=$(env_value TILED_URI) ok")
    else parts+=("postgres=$HOST:$pg_port/tiled=$(env_value TILED_URI) DOWN"); ok=1; fi
  fi
  say "${parts[*]:-nothing recorded} [env: $ENV_FILE]"
  return "$ok"
}

all_recorded() {  # $@ = services; true if the env file has an entry for each of them
  local service
  for service in "$@"; do
    case "$service" in
      ntp) [[ -n "$(env_value SMARTMETER_NTP_PORT)$(env_value SMARTMETER_NTP_MISSING)" ]] ;;
      mqtt) [[ -n "$(env_value SMARTMETER_MQTT_PORT)$(env_value SMARTMETER_MQTT_MISSING)" ]] ;;
      postgres) [[ ! -f "$POSTGRES_SCRIPT" || -n "$(env_value SMARTMETER_POSTGRES_DIR)" ]] ;;
      redis) [[ -n "$(env_value SMARTMETER_REDIS_PORT)$(env_value SMARTMETER_REDIS_MISSING)" ]] ;;
      *) false ;;
    esac || return 1
  done
}

start() {
  local wanted=("$@")
  ((${#wanted[@]})) || wanted=(ntp mqtt postgres redis)
  if status >/dev/null 2>&1 && all_recorded "${wanted[@]}"; then
    say "already running"
    status
    return 0
  fi
  stop_all
  : >"$ENV_FILE.new"
  local service
  for service in "${wanted[@]}"; do
    case "$service" in
      ntp) start_ntp ;;
      mqtt) start_mqtt ;;
      postgres) start_postgres ;;
      redis) start_redis ;;
      *) die "unknown service '$service' (expected ntp, mqtt, postgres, redis)" ;;
    esac
  done
  chmod 600 "$ENV_FILE.new"   # it may hold the Tiled API key
  mv "$ENV_FILE.new" "$ENV_FILE"
  status
}

stop_all() {
  # Each daemon needs ~2 s to exit after SIGTERM; stop them side by side.
  stop_pidfile ntp "$CHRONY_PID" "$CHRONY_CONF" &
  stop_pidfile mqtt "$MQTT_PID" "$MQTT_CONF" &
  stop_pidfile redis "$REDIS_PID" "redis-server" &
  wait
  if [[ -f "$POSTGRES_SCRIPT" && -d "$POSTGRES_DIR" ]]; then
    bash "$POSTGRES_SCRIPT" stop "$POSTGRES_DIR" >/dev/null || say "postgres: scripts/postgres.sh stop failed"
  fi
  rm -f "$ENV_FILE" "$ENV_FILE.new"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop_all; say "stopped" ;;
  status) status ;;
  *) echo "usage: $0 start [ntp] [mqtt] [postgres] [redis] | stop | status" >&2; exit 2 ;;
esac
