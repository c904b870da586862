#!/usr/bin/env bash
# Private PostgreSQL cluster + a Tiled server backed by it (catalog and storage databases),
# for tests and for users without a managed database.  No systemd needed.
#
#   scripts/postgres.sh start DIR [--pg-port P] [--tiled-port T] [--hdf5-dir D] [--api-key K]
#   scripts/postgres.sh stop DIR
#   scripts/postgres.sh status DIR
#
# start: initdb's DIR/pg (run as the "postgres" user when invoked as root, so DIR is chowned
# to it), starts it on 127.0.0.1:P (socket in DIR/pg), creates databases tiled_catalog and
# tiled_storage, runs "tiled catalog init", then starts
#   tiled serve catalog <catalog> -w DIR/zarr -w <storage> -r D --api-key K --port T
# in the background and waits until it answers.  Ports default to free ephemeral ports; the
# API key defaults to a random alphanumeric one (Tiled rejects non-alphanumeric keys); D
# defaults to DIR/hdf5 (meters must write below it, or Tiled fails reads with HTTP 500).
# Everything needed to connect is written to DIR/tiled.env (TILED_URI, TILED_API_KEY, ...)
# and printed.  stop: stops the Tiled server and the cluster started for DIR (by pid).
set -euo pipefail

die() { echo "postgres.sh: $*" >&2; exit 1; }
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
PYTHON="${PYTHON:-$repo/.venv/bin/python}"
TILED="${TILED:-$repo/.venv/bin/tiled}"

find_pg_bin() {
    if [[ -n "${PG_BIN:-}" ]]; then echo "$PG_BIN"; return; fi
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [[ -x "$d/initdb" ]] && { echo "$d"; return; }
    done
    command -v initdb >/dev/null 2>&1 && { dirname "$(command -v initdb)"; return; }
    die "PostgreSQL server binaries (initdb, pg_ctl) not found; apt-get install postgresql or set PG_BIN"
}

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

as_pg() {  # run a command as the cluster owner
    # From /: user postgres may not be able to enter the checkout (e.g. a clone under /root).
    if [[ $EUID -eq 0 ]]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

cmd="${1:-}"; shift || true
dir="${1:-}"; shift || true
[[ -n "$cmd" && -n "$dir" ]] || die "usage: $0 start|stop|status DIR [options]"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
envfile="$dir/tiled.env"

case "$cmd" in
start)
    pg_port="" tiled_port="" hdf5_dir="$dir/hdf5" api_key=""
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --pg-port) pg_port="$2"; shift 2 ;;
            --tiled-port) tiled_port="$2"; shift 2 ;;
            --hdf5-dir) hdf5_dir="$2"; shift 2 ;;
            --api-key) api_key="$2"; shift 2 ;;
            *) die "unknown option $1" ;;
        esac
    done
    [[ -f "$dir/tiled.pid" ]] && kill -0 "$(cat "$dir/tiled.pid")" 2>/dev/null \
        && die "a Tiled server for $dir is already running (pid $(cat "$dir/tiled.pid")); stop it first"
    pg_bin="$(find_pg_bin)"
    [[ -x "$TILED" ]] || die "tiled CLI not found at $TILED (set TILED=)"
    [[ -z "$pg_port" ]] && pg_port="$(free_port)"
    [[ -z "$tiled_port" ]] && tiled_port="$(free_port)"
    [[ -z "$api_key" ]] && api_key="$("$PYTHON" -c 'import secrets; print(secrets.token_hex(16))')"
    [[ "$api_key" =~ ^[A-Za-z0-9]+$ ]] || die "the API key must be alphanumeric (Tiled rejects others)"
    mkdir -p "$hdf5_dir" "$dir/zarr"
    hdf5_dir="$(cd "$hdf5_dir" && pwd)"
    pgdir="$dir/pg"
    mkdir -p "$pgdir"
    if [[ $EUID -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || die "no 'postgres' user to own the cluster"
        chown postgres "$pgdir"
        runuser -u postgres -- test -x "$pgdir" \
            || die "user postgres cannot reach $pgdir (a parent directory is not world-searchable)"
    fi
    if [[ ! -f "$pgdir/data/PG_VERSION" ]]; then
        as_pg "$pg_bin/initdb" -D "$pgdir/data" -U postgres --auth=trust >"$dir/initdb.log" 2>&1 \
            || die "initdb failed, see $dir/initdb.log"
    fi
    as_pg "$pg_bin/pg_ctl" -D "$pgdir/data" -l "$pgdir/server.log" -w -t 60 \
        -o "-p $pg_port -k $pgdir -c listen_addresses=127.0.0.1" start >/dev/null \
        || die "PostgreSQL did not start, see $pgdir/server.log"
    base="postgresql://postgres@127.0.0.1:$pg_port"
    for db in tiled_catalog tiled_storage; do
        if ! "$pg_bin/psql" -h 127.0.0.1 -p "$pg_port" -U postgres -tAc \
                "SELECT 1 FROM pg_database WHERE datname='$db'" | grep -q 1; then
            "$pg_bin/psql" -h 127.0.0.1 -p "$pg_port" -U postgres -qc "CREATE DATABASE $db;" \
                || die "cannot create database $db"
        fi
    done
    "$TILED" catalog init --if-not-exists "$base/tiled_catalog" >"$dir/catalog-init.log" 2>&1 \
        || die "tiled catalog init failed, see $dir/catalog-init.log"
    nohup "$TILED" serve catalog "$base/tiled_catalog" \
        -w "$dir/zarr" -w "$base/tiled_storage" -r "$hdf5_dir" \
        --api-key "$api_key" --host 127.0.0.1 --port "$tiled_port" \
        >"$dir/tiled.log" 2>&1 < /dev/null &
    echo $! >"$dir/tiled.pid"
    uri="http://127.0.0.1:$tiled_port"
    for _ in $(seq 1 120); do
        if "$PYTHON" - "$uri" "$api_key" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
req = urllib.request.Request(sys.argv[1] + "/api/v1/", headers={"Authorization": "Apikey " + sys.argv[2]})
urllib.request.urlopen(req, timeout=2)
EOF
        then
            cat >"$envfile" <<EOF
TILED_URI=$uri
TILED_API_KEY=$api_key
TILED_HDF5_DIR=$hdf5_dir
PG_PORT=$pg_port
PG_URI=$base
EOF
            chmod 600 "$envfile"
            cat "$envfile"
            exit 0
        fi
        kill -0 "$(cat "$dir/tiled.pid")" 2>/dev/null || die "tiled serve exited, see $dir/tiled.log"
        sleep 0.5
    done
    die "Tiled did not answer on $uri within 60 s, see $dir/tiled.log"
    ;;
stop)
    if [[ -f "$dir/tiled.pid" ]]; then
        pid="$(cat "$dir/tiled.pid")"
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        fi
        rm -f "$dir/tiled.pid"
    fi
    if [[ -f "$dir/pg/data/postmaster.pid" ]]; then
        as_pg "$(find_pg_bin)/pg_ctl" -D "$dir/pg/data" -m fast -w stop >/dev/null
    fi
    rm -f "$envfile"
    ;;
status)
    [[ -f "$envfile" ]] && cat "$envfile" || { echo "not running"; exit 1; }
    ;;
*) die "unknown command $cmd (start|stop|status)" ;;
esac
