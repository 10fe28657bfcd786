#!/usr/bin/env bash
# A local Prefect server with this project's deployments and one process worker per pool.
#
#   scripts/prefect_server.sh up       start server, create pools cpu/gpu, deploy prefect.yaml, start workers
#   scripts/prefect_server.sh run ...  prefect deployment run 'pipeline/full' --watch ... (extra args forwarded)
#   scripts/prefect_server.sh status   what is running
#   scripts/prefect_server.sh down     stop workers (and their flow runs), then the server
#
# `up` also writes one line, PREFECT_API_URL=..., into the .env of the repository root (Prefect reads
# ./.env), so that `prefect ...` typed in any shell at the root talks to this server; `down` removes
# that line again (and the file, if `up` created it). A PREFECT_API_URL line of your own is left alone.
#
# Every command is idempotent. Environment:
#   PORT            API port (default 4200); `up` records it, later commands reuse it
#   PREFECT_SERVER_API_HOST  bind address (default 127.0.0.1)
#   PREFECT_HOME    database, results, logs (default <repo>/.prefect); pids and logs in $PREFECT_HOME/run
#   GPU_SLOTS       concurrency limit of the gpu pool (default 1: one training at a time)
#   STARTUP_TIMEOUT seconds to wait for the server (default 120)
#   PREFECT_WORKER_QUERY_SECONDS  worker poll interval (Prefect default 10)
#   DOTENV          the .env file `up` writes PREFECT_API_URL into (default <repo>/.env; empty: none)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$ROOT" # prefect.yaml and prefect.toml are read from the current directory

export DO_NOT_TRACK=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_CLI_PROMPT=false
# `prefect deployment run --watch` prints the run's events and its logs; the logs come over a
# websocket that a Prefect 3.9 server only serves with these two on (both off by default).
export PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED=${PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED:-true}
export PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED=${PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED:-true}
# Absolute, so that every child agrees whatever its working directory (prefect.toml says ".prefect").
PREFECT_HOME=${PREFECT_HOME:-$ROOT/.prefect}
mkdir -p "$PREFECT_HOME"
PREFECT_HOME=$(cd "$PREFECT_HOME" && pwd -P)
export PREFECT_HOME
RUN_DIR=$PREFECT_HOME/run
POOLS=(cpu gpu)
GPU_SLOTS=${GPU_SLOTS:-1}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-120}
HOST=${PREFECT_SERVER_API_HOST:-127.0.0.1}
if [[ -z ${PORT:-} && -f $RUN_DIR/port ]]; then
    PORT=$(<"$RUN_DIR/port")
fi
PORT=${PORT:-4200}
export PREFECT_API_URL="http://$HOST:$PORT/api"
DOTENV=${DOTENV-$ROOT/.env}

say() { printf '[prefect_server] %s\n' "$*"; }
die() {
    printf '[prefect_server] error: %s\n' "$*" >&2
    exit 1
}

pid_of() { # pid recorded for $1 (server, worker-cpu, ...) if that process is alive
    local f=$RUN_DIR/$1.pid pid
    [[ -f $f ]] || return 1
    pid=$(<"$f")
    # alive, and still ours (not a recycled pid after a reboot)
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null &&
        ps -o args= -p "$pid" 2>/dev/null | grep -q prefect && echo "$pid"
}

healthy() {
    if command -v curl >/dev/null; then
        curl -sf -m 3 "$PREFECT_API_URL/health" >/dev/null 2>&1
    else
        "${PYTHON:-python3}" - "$PREFECT_API_URL/health" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=3)
EOF
    fi
}

descendants() { # all descendants of pid $1 (flow runs start in their own session, so not in the group)
    local children c
    children=$(ps -e -o pid=,ppid= | awk -v p="$1" '$2 == p {print $1}')
    for c in $children; do
        echo "$c"
        descendants "$c"
    done
}

alive_any() { # any of the given pids alive?
    local p
    for p in "$@"; do kill -0 "$p" 2>/dev/null && return 0; done
    return 1
}

start_bg() { # start_bg NAME CMD... : own process group (set -m), pid to RUN_DIR/NAME.pid
    local name=$1
    shift
    set -m # a job-control child gets its own process group and default SIGTERM/SIGINT handling
    nohup "$@" >"$RUN_DIR/$name.log" 2>&1 </dev/null &
    echo $! >"$RUN_DIR/$name.pid"
    set +m
}

wait_gone() { # wait_gone SECONDS PID...: true once none of the pids is alive
    local t=$1 i
    shift
    for ((i = 0; i < t * 10; i++)); do
        alive_any "$@" || return 0
        sleep 0.1
    done
    ! alive_any "$@"
}

stop() { # stop NAME: its flow runs first (so the worker reports them Crashed), then its process group
    local name=$1 pid pids runs p g
    if ! pid=$(pid_of "$name"); then
        [[ -f $RUN_DIR/$name.pid ]] && say "$name: not running (stale pid file removed)"
        rm -f "$RUN_DIR/$name.pid"
        return 0
    fi
    mapfile -t pids < <(echo "$pid" && descendants "$pid")
    # Flow runs start in their own session (process group): signal each such group while the
    # worker is still alive, so that it sees the exit and marks the run Crashed on the server.
    runs=()
    for p in "${pids[@]}"; do
        g=$(ps -o pgid= -p "$p" 2>/dev/null | tr -d ' ') || continue
        [[ -n $g && $g != "$pid" && $g == "$p" ]] && runs+=("$p")
    done
    if ((${#runs[@]})); then
        say "$name: terminating ${#runs[@]} flow run process group(s): ${runs[*]}"
        for g in "${runs[@]}"; do kill -TERM -- "-$g" 2>/dev/null || true; done
        wait_gone 30 "${pids[@]:1}" || say "$name: flow runs still alive after 30 s"
        sleep 2 # let the worker report the crash before it goes
    fi
    say "$name: stopping pid $pid (${#pids[@]} processes)"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone 30 "$pid"; then
        say "$name: still alive after 30 s, sending KILL"
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    # anything left over from the tree (a run that ignored TERM, a stray pool process)
    if alive_any "${pids[@]}"; then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        wait_gone 10 "${pids[@]}" || kill -KILL "${pids[@]}" 2>/dev/null || true
    fi
    rm -f "$RUN_DIR/$name.pid"
    say "$name: stopped"
}

dotenv() { # dotenv set|unset|show: our PREFECT_API_URL line in $DOTENV (state in $RUN_DIR/dotenv)
    # The line names the PREFECT_HOME whose server it points at, so that `down` removes only its own
    # line (a test's server on another port never touches the line of yours) and `up` replaces a
    # line whose server is gone. Prefect (python-dotenv) ends an unquoted value at " #".
    "${PYTHON:-python3}" - "$1" "$DOTENV" "$PREFECT_API_URL" "$PREFECT_HOME" "$RUN_DIR/dotenv" <<'EOF'
import json, os, re, sys, tempfile, urllib.request
from pathlib import Path

action, default_path, url, home, state_path = sys.argv[1:]
state_file = Path(state_path)
state = json.loads(state_file.read_text()) if state_file.is_file() else {}
path = Path(state.get("path") or default_path) if action == "unset" else Path(default_path)
MARK = re.compile(r"PREFECT_API_URL=(\S*) +# scripts/prefect_server\.sh up \(PREFECT_HOME=(.*)\); `down` removes this line")
ANY = re.compile(r"\s*(?:export\s+)?PREFECT_API_URL\s*=\s*(.*)")
line = f"PREFECT_API_URL={url}  # scripts/prefect_server.sh up (PREFECT_HOME={home}); `down` removes this line\n"


def say(msg):
    print(f"[prefect_server] {msg}")


def answers(api):
    try:
        urllib.request.urlopen(f"{api}/health", timeout=3)
        return True
    except Exception:
        return False


def write(text):
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".env.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


text = path.read_text() if path.is_file() else ""
lines = text.splitlines(keepends=True)
marked = [(i, MARK.fullmatch(l.rstrip("\r\n"))) for i, l in enumerate(lines)]
mine = [i for i, m in marked if m and m.group(2) == home]
theirs = [(i, m) for i, m in marked if m and m.group(2) != home]
own = [l for i, l in enumerate(lines) if ANY.match(l) and not marked[i][1]]

if action == "show":
    if mine:
        say(f"{path}: PREFECT_API_URL={marked[mine[0]][1].group(1)} (written by up: prefect commands run in {path.parent} use this server)")
    elif own or theirs:
        say(f"{path}: {(own[0] if own else lines[theirs[0][0]]).strip()} (not this server's)")
    else:
        say(f"{path}: no PREFECT_API_URL")
elif action == "set":
    if own:
        say(f"{path}: keeps your own {own[0].strip()}; prefect commands run from {path.parent} use that")
        sys.exit(0)
    live = [(i, m) for i, m in theirs if answers(m.group(1))]
    if live:
        m = live[0][1]
        say(f"{path}: left as is; it points at {m.group(1)}, the server of PREFECT_HOME={m.group(2)}, which answers")
        sys.exit(0)
    stale = {i for i, _ in theirs}
    if [lines[i] for i in mine] == [line]:
        say(f"{path}: PREFECT_API_URL={url} (already there)")
        sys.exit(0)
    if mine:  # same server, another port: rewrite our line in place
        lines = [line if i == mine[0] else l for i, l in enumerate(lines) if i not in stale and i not in mine[1:]]
        write("".join(lines))
    else:
        kept = "".join(l for i, l in enumerate(lines) if i not in stale)
        newline = bool(kept) and not kept.endswith("\n")
        created = not path.exists()
        write(kept + ("\n" if newline else "") + line)
        state_file.write_text(json.dumps({"path": str(path), "created": created, "newline_added": newline}))
    say(f"{path}: PREFECT_API_URL={url} (prefect commands run from {path.parent} use this server; `down` removes it)")
elif action == "unset":
    if not mine:
        state_file.unlink(missing_ok=True)
        sys.exit(0)
    last = mine[-1] == len(lines) - 1
    kept = "".join(l for i, l in enumerate(lines) if i not in mine)
    if last and state.get("newline_added") and kept.endswith("\n"):
        kept = kept[:-1]
    if not kept and state.get("created"):
        path.unlink()
        say(f"{path}: removed (up had created it)")
    else:
        write(kept)
        say(f"{path}: PREFECT_API_URL line removed")
    state_file.unlink(missing_ok=True)
EOF
}

deploy_fingerprint() {
    cat prefect.yaml flows/*.py | cksum | cut -d' ' -f1
    echo "$PREFECT_API_URL"
}

cmd_up() {
    mkdir -p "$RUN_DIR"
    local started_server=0 pid
    if pid=$(pid_of server); then
        healthy || die "server pid $pid is running but $PREFECT_API_URL/health does not answer; run '$0 down' first"
        say "server: already running (pid $pid) at $PREFECT_API_URL"
    else
        healthy && die "something else already serves $PREFECT_API_URL; choose another PORT"
        say "server: starting at http://$HOST:$PORT (logs $RUN_DIR/server.log)"
        start_bg server prefect server start --host "$HOST" --port "$PORT" --analytics-off
        echo "$PORT" >"$RUN_DIR/port"
        started_server=1
        local t0=$SECONDS
        until healthy; do
            pid_of server >/dev/null || {
                tail -n 20 "$RUN_DIR/server.log" >&2
                die "server exited during start-up (log above)"
            }
            ((SECONDS - t0 < STARTUP_TIMEOUT)) || {
                stop server
                die "server not healthy after ${STARTUP_TIMEOUT}s"
            }
            sleep 0.5
        done
        say "server: healthy after $((SECONDS - t0)) s (pid $(pid_of server))"
    fi
    echo "$PORT" >"$RUN_DIR/port"
    [[ -z $DOTENV ]] || dotenv set

    local pool pools limit
    # one CLI call (each costs seconds): "name=concurrency_limit ..." of the existing pools
    pools=" $(prefect work-pool ls --output json | "${PYTHON:-python3}" -c '
import json, sys
print(" ".join("%s=%s" % (p["name"], p.get("concurrency_limit")) for p in json.load(sys.stdin)))') "
    for pool in "${POOLS[@]}"; do
        if [[ $pools == *" $pool="* ]]; then
            say "pool $pool: exists"
        else
            prefect work-pool create "$pool" --type process >/dev/null
            say "pool $pool: created (type process)"
        fi
    done
    limit=${pools#* gpu=}
    limit=${limit%% *}
    if [[ $limit == "$GPU_SLOTS" ]]; then
        say "pool gpu: concurrency limit $GPU_SLOTS"
    else
        prefect work-pool set-concurrency-limit gpu "$GPU_SLOTS" >/dev/null
        say "pool gpu: concurrency limit set to $GPU_SLOTS"
    fi

    local fp
    fp=$(deploy_fingerprint)
    if ((started_server == 0)) && [[ -f $RUN_DIR/deployed && $(<"$RUN_DIR/deployed") == "$fp" ]]; then
        say "deployments: up to date (prefect.yaml and flows/ unchanged since the last deploy)"
    else
        say "deployments: prefect deploy --all (logs $RUN_DIR/deploy.log)"
        if ! prefect --no-prompt deploy --all >"$RUN_DIR/deploy.log" 2>&1; then
            tail -n 30 "$RUN_DIR/deploy.log" >&2
            die "prefect deploy failed (log above)"
        fi
        grep -o "Deployment '[^']*' successfully created" "$RUN_DIR/deploy.log" | sed "s/^/[prefect_server]   /" || true
        echo "$fp" >"$RUN_DIR/deployed"
    fi

    for pool in "${POOLS[@]}"; do
        if pid=$(pid_of "worker-$pool"); then
            say "worker $pool: already running (pid $pid)"
        else
            start_bg "worker-$pool" prefect worker start --pool "$pool" --type process \
                --name "$pool-$(hostname)-$PORT" --install-policy never
            say "worker $pool: started (pid $(<"$RUN_DIR/worker-$pool.pid"), logs $RUN_DIR/worker-$pool.log)"
        fi
    done
    say "ready: PREFECT_API_URL=$PREFECT_API_URL  UI http://$HOST:$PORT"
}

cmd_down() {
    local pool
    for pool in "${POOLS[@]}"; do stop "worker-$pool"; done
    stop server
    [[ -z $DOTENV && ! -f $RUN_DIR/dotenv ]] || dotenv unset
    rm -f "$RUN_DIR/deployed"
    say "down (database kept in $PREFECT_HOME)"
}

cmd_status() {
    local pid pool rc=0
    if pid=$(pid_of server); then
        if healthy; then say "server: running (pid $pid) at $PREFECT_API_URL"; else say "server: pid $pid alive but not healthy"; rc=1; fi
    else
        say "server: not running"
        rc=1
    fi
    for pool in "${POOLS[@]}"; do
        if pid=$(pid_of "worker-$pool"); then say "worker $pool: running (pid $pid)"; else say "worker $pool: not running"; rc=1; fi
    done
    [[ -z $DOTENV ]] || dotenv show
    if healthy; then prefect deployment ls; fi
    return $rc
}

cmd_run() {
    healthy || die "no server at $PREFECT_API_URL; run '$0 up' first"
    exec prefect deployment run 'pipeline/full' --watch "$@"
}

case ${1:-} in
up | down | status | run)
    c=$1
    shift
    "cmd_$c" "$@"
    ;;
*)
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
