#!/usr/bin/env bash
# A real, local Argilla 2.8 server for development, tests and CI.
#
#   bash scripts/argilla-server.sh start    # idempotent; prints the URL when ready
#   eval "$(bash scripts/argilla-server.sh env)"   # exports ARGILLA_API_URL / ARGILLA_API_KEY
#   bash scripts/argilla-server.sh status
#   bash scripts/argilla-server.sh stop
#
# Three processes, all bound to 127.0.0.1, all unprivileged:
#   redis-server (Debian package)   port ARGILLA_PORT+1, no persistence
#   osmem-server (Go binary in a PyPI wheel, speaks the OpenSearch API; in memory)
#                                   port ARGILLA_PORT+2
#   argilla-server 2.8.0 (SQLite)   port ARGILLA_PORT (default 6900)
# The rq worker is not started: logging records, responses and search indexing
# run inside the server process; the worker only runs hub imports, webhooks and
# re-computing record status after a distribution change. Set ARGILLA_WORKER=1
# to start it anyway.
#
# State (SQLite db, API key, pids, logs) lives in .cache/argilla/ (override with
# ARGILLA_STATE_DIR); the server's venv in .venv-argilla/ (ARGILLA_VENV). Both
# are gitignored. osmem keeps the search index in memory only, so `stop` also
# deletes the database: every `start` begins with an empty server.
#
# Users with their own Argilla (Docker, HF Spaces) do not need this script:
# they set ARGILLA_API_URL and ARGILLA_API_KEY.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ARGILLA_VENV:-$REPO/.venv-argilla}"
STATE="${ARGILLA_STATE_DIR:-$REPO/.cache/argilla}"
PORT="${ARGILLA_PORT:-6900}"
REDIS_PORT="${ARGILLA_REDIS_PORT:-$((PORT + 1))}"
OSMEM_PORT="${ARGILLA_OSMEM_PORT:-$((PORT + 2))}"
HOST=127.0.0.1
URL="http://$HOST:$PORT"
READY_TIMEOUT="${ARGILLA_READY_TIMEOUT:-120}"
OWNER=argilla

# The set verified with argilla-server 2.8 (its own dependency ranges let pip
# pick newer releases it does not work with); requests is imported, not declared.
PINS=(argilla-server==2.8.0 "click<8.2" "huggingface-hub<1" "datasets<4" "requests>=2.31" osmem-server==0.1.6)
# A venv whose stamp differs from the pins is rebuilt.
STAMP="${PINS[*]}"

log() { echo "argilla-server.sh: $*" >&2; }
die() { log "$*"; exit 1; }

alive() { [[ -f "$STATE/$1.pid" ]] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

ready() { curl -fsS -m 2 -o /dev/null "$URL/api/v1/version" 2>/dev/null; }

listening() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

ensure_redis() {
  command -v redis-server >/dev/null && return
  if [[ "$(id -u)" != 0 ]]; then
    die "redis-server is not installed and this is not root. Install it with: sudo apt-get update && sudo apt-get install -y redis-server"
  fi
  log "installing redis-server with apt-get"
  apt-get update -qq >"$STATE/apt.log" 2>&1
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >>"$STATE/apt.log" 2>&1 \
    || die "apt-get install redis-server failed; see $STATE/apt.log"
}

ensure_venv() {
  [[ -f "$VENV/.tpo-stamp" && "$(cat "$VENV/.tpo-stamp")" == "$STAMP" ]] && return
  log "creating $VENV (one-off, about a minute)"
  local py="${ARGILLA_PYTHON:-$(command -v python3.11 || command -v python3)}"
  rm -rf "$VENV"
  "$py" -m venv "$VENV"
  {
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "${PINS[@]}"
  } >"$STATE/pip.log" 2>&1 || die "pip install failed; see $STATE/pip.log"
  echo "$STAMP" >"$VENV/.tpo-stamp"
}

# Environment shared by the argilla_server CLI commands and the server itself.
server_env() {
  export ARGILLA_HOME_PATH="$STATE"
  export ARGILLA_DATABASE_URL="sqlite+aiosqlite:///$STATE/argilla.db?check_same_thread=False"
  export ARGILLA_SEARCH_ENGINE=opensearch
  export ARGILLA_ELASTICSEARCH="http://$HOST:$OSMEM_PORT"
  export ARGILLA_REDIS_URL="redis://$HOST:$REDIS_PORT/0"
  export HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_OFFLINE=1
  export ARGILLA_SHOW_HUGGINGFACE_SPACE_PERSISTENT_STORAGE_WARNING=false
}

wait_port() {  # name port
  for _ in $(seq 1 100); do
    listening "$2" && return
    alive "$1" || die "$1 exited at start; see $STATE/$1.log"
    sleep 0.1
  done
  die "$1 did not open port $2; see $STATE/$1.log"
}

start() {
  local began=$SECONDS
  mkdir -p "$STATE"
  chmod 700 "$STATE"
  if alive server && ready; then
    log "already running at $URL"
    return
  fi
  # A half-started or crashed set: start over from a clean state.
  stop_all quiet
  command -v curl >/dev/null || die "curl is required"
  local port
  for port in "$PORT" "$REDIS_PORT" "$OSMEM_PORT"; do
    listening "$port" && die "port $port on $HOST is already in use (another Argilla, or another checkout's server?);" \
      "choose free ports with ARGILLA_PORT=<port> (redis and osmem take the next two)"
  done
  ensure_redis
  ensure_venv
  server_env

  redis-server --bind "$HOST" --port "$REDIS_PORT" --save "" --appendonly no \
    --dir "$STATE" --daemonize no >"$STATE/redis.log" 2>&1 &
  echo $! >"$STATE/redis.pid"
  local osmem=("$VENV"/lib/python3*/site-packages/osmem_server/bin/osmem-server)
  # --no-stdin-watch: by default osmem exits as soon as its stdin closes.
  "${osmem[0]}" --addr "$HOST:$OSMEM_PORT" --no-stdin-watch --no-ja </dev/null >"$STATE/osmem.log" 2>&1 &
  echo $! >"$STATE/osmem.pid"

  wait_port redis "$REDIS_PORT"
  wait_port osmem "$OSMEM_PORT"

  # One interpreter migrates the database, creates the owner and then serves:
  # importing argilla_server costs seconds, so it is paid once. The secrets go
  # to 0600 files and reach the CLI through argv inside this process, so they
  # never show in the process table; the CLI's summary, which prints the key,
  # is silenced.
  "$VENV/bin/python" - "$STATE" "$OWNER" "$HOST" "$PORT" >"$STATE/server.log" 2>&1 <<'PY' &
import os, secrets, sys

state, owner, host, port = sys.argv[1:5]
os.umask(0o077)
secret = {"api_key": "tpo-" + secrets.token_urlsafe(32), "password": secrets.token_urlsafe(12)}
for name, value in secret.items():
    with open(f"{state}/{name}", "w") as f:
        f.write(value + "\n")
os.umask(0o022)

import typer
from argilla_server.cli import app

app(["database", "migrate"], standalone_mode=False)
typer.echo = lambda *args, **kwargs: None
app(["database", "users", "create", "--first-name", "Owner", "--username", owner, "--role", "owner",
     "--password", secret["password"], "--api-key", secret["api_key"], "--workspace", "argilla"],
    standalone_mode=False)

# osmem answers "update with script is not supported" to the three scripted
# updates of the search index; the first is what the UI (and the per-record
# responses endpoint) calls when a reviewer submits, so without this every
# submission fails with a 500. Same effect, done as read-modify-write.
from argilla_server.search_engine.commons import es_index_name_for_dataset
from argilla_server.search_engine.opensearch import OpenSearchEngine


async def _set_responses(engine, response, keep_new):
    index, record_id = es_index_name_for_dataset(response.record.dataset), str(response.record.id)
    source = (await engine.client.get(index=index, id=record_id))["_source"]
    responses = [r for r in source.get("responses") or [] if str(r["id"]) != str(response.id)]
    if keep_new:
        responses.append(engine._map_record_response_to_es(response))
    await engine._update_document_request(index, id=record_id, body={"doc": {"responses": responses}})


async def _delete_suggestion(engine, suggestion):
    index, record_id = es_index_name_for_dataset(suggestion.record.dataset), str(suggestion.record_id)
    source = (await engine.client.get(index=index, id=record_id))["_source"]
    suggestions = {k: v for k, v in (source.get("suggestions") or {}).items() if k != suggestion.question.name}
    # A partial "doc" update merges objects, so the whole document is rewritten.
    await engine.client.index(index=index, id=record_id, body={**source, "suggestions": suggestions}, refresh=True)


OpenSearchEngine.update_record_response = lambda self, response: _set_responses(self, response, True)
OpenSearchEngine.delete_record_response = lambda self, response: _set_responses(self, response, False)
OpenSearchEngine.delete_record_suggestion = _delete_suggestion

app(["start", "--host", host, "--port", port, "--no-access-log"])
PY
  echo $! >"$STATE/server.pid"
  if [[ "${ARGILLA_WORKER:-0}" == 1 ]]; then
    "$VENV/bin/python" -m argilla_server worker --num-workers 1 </dev/null >"$STATE/worker.log" 2>&1 &
    echo $! >"$STATE/worker.pid"
  fi

  local t0=$SECONDS
  until ready; do
    alive server || die "argilla-server exited at start; see $STATE/server.log"
    ((SECONDS - t0 < READY_TIMEOUT)) || die "argilla-server not ready after ${READY_TIMEOUT}s; see $STATE/server.log"
    sleep 0.5
  done
  log "ready at $URL in $((SECONDS - began))s; for the SDK and tests: eval \"\$(bash scripts/argilla-server.sh env)\""
  log "UI login: user '$OWNER', password in $STATE/password"
}

stop_all() {
  local name pid pids=()
  # TERM everything first: each process takes about 2 s to shut down.
  for name in worker server osmem redis; do
    [[ -f "$STATE/$name.pid" ]] || continue
    pid="$(cat "$STATE/$name.pid")"
    if kill "$pid" 2>/dev/null; then
      pids+=("$pid")
      [[ "${1:-}" == quiet ]] || log "stopping $name ($pid)"
    fi
    rm -f "$STATE/$name.pid"
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  # The search index died with osmem; a database that outlived it would list
  # records the search engine no longer knows.
  rm -f "$STATE/argilla.db" "$STATE/api_key" "$STATE/password"
}

status() {
  local name rc=0
  for name in redis osmem server worker; do
    if alive "$name"; then echo "$name: running (pid $(cat "$STATE/$name.pid"))"
    elif [[ "$name" != worker ]]; then echo "$name: stopped"; rc=1
    fi
  done
  if ready; then echo "server: ready at $URL"; else echo "server: not answering at $URL"; rc=1; fi
  return $rc
}

env_cmd() {
  if [[ ! -f "$STATE/api_key" ]] || ! alive server; then
    die "not running; start it with: bash scripts/argilla-server.sh start"
  fi
  printf 'export ARGILLA_API_URL=%q ARGILLA_API_KEY=%q\n' "$URL" "$(cat "$STATE/api_key")"
}

case "${1:-}" in
  start) start ;;
  stop) mkdir -p "$STATE"; stop_all ;;
  status) status ;;
  env) env_cmd ;;
  *) echo "usage: bash scripts/argilla-server.sh start|stop|status|env" >&2; exit 2 ;;
esac
