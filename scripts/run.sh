#!/usr/bin/env bash
# Start gogpt in the background (the default), or: stop | status | logs [-n]
#
# First use creates .venv and installs gogpt, and writes .env from .env.example with a
# fresh random SECRET_KEY. GOGPT_HOME (default: the repository) holds .env, .venv,
# server.log and gogpt.pid.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
home=${GOGPT_HOME:-$repo}
cd "$home"
pid_file=gogpt.pid
log_file=server.log
python=.venv/bin/python

setting() {  # the value of a setting: the environment first, then .env, then the default
  local name=$1 default=$2 value
  value=${!name:-}
  if [ -z "$value" ] && [ -f .env ]; then
    value=$(sed -n "s/^[[:space:]]*$name[[:space:]]*=[[:space:]]*//p" .env | tail -n 1 | tr -d "\"'\r")
  fi
  echo "${value:-$default}"
}

running_pid() {
  [ -f "$pid_file" ] || return 1
  local pid
  pid=$(cat "$pid_file")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; else return 1; fi
}

url() {
  local host
  host=$(setting HOST 0.0.0.0)
  [ "$host" = 0.0.0.0 ] && host=127.0.0.1
  echo "http://$host:$(setting PORT 8000)"
}

install() {
  if [ ! -x "$python" ]; then
    echo "==> creating .venv"
    python3 -m venv .venv
  fi
  local stamp=.venv/.gogpt-installed
  if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
    echo "==> installing gogpt into .venv (first use only)"
    # the build backend is chatty on stderr: keep it in a file unless the install fails
    if ! { "$python" -m pip install --quiet --upgrade pip && "$python" -m pip install --quiet -e "$repo"; } \
        2> .venv/install.log; then
      cat .venv/install.log
      echo "installing gogpt failed (see above)"
      exit 1
    fi
    touch "$stamp"
  fi
}

write_env() {
  [ -f .env ] && return 0
  local key
  key=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
  umask 077
  sed "s/^SECRET_KEY=.*/SECRET_KEY=$key/" "$repo/.env.example" > .env
  echo "==> wrote .env with a fresh SECRET_KEY (edit it to add CHAT_API_KEY and the rest)"
}

start() {
  local pid
  if pid=$(running_pid); then
    echo "gogpt is already running (pid $pid) at $(url)"
    exit 1
  fi
  install
  write_env
  echo "==> starting gogpt (log: $home/$log_file)"
  nohup "$python" -m gogpt >> "$log_file" 2>&1 < /dev/null &
  pid=$!
  echo "$pid" > "$pid_file"
  local base
  base=$(url)
  for _ in $(seq 1 100); do  # up to 10 s for the port to answer
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$pid_file"
      echo "gogpt failed to start; the end of $log_file:"
      tail -n 20 "$log_file"
      exit 1
    fi
    if "$python" - "$base/healthz" <<'PY' 2>/dev/null; then
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=1)
PY
      echo "gogpt is running (pid $pid) at $base"
      echo "mint a token: curl -s -X POST $base/token -d id=me -d hour=1 -d key=\$SECRET_KEY"
      return 0
    fi
    sleep 0.1
  done
  echo "gogpt started (pid $pid) but $base does not answer yet; see $log_file"
}

stop() {
  local pid
  if ! pid=$(running_pid); then
    rm -f "$pid_file"
    echo "gogpt is not running"
    return 0
  fi
  kill -TERM "$pid"
  local grace
  grace=$(setting SHUTDOWN_GRACE 30)
  local limit=$(( (${grace%.*} + 5) * 10 ))
  for _ in $(seq 1 "$limit"); do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$pid_file"
      echo "gogpt stopped"
      return 0
    fi
    sleep 0.1
  done
  echo "gogpt (pid $pid) did not stop within $((limit / 10)) s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pid_file"
}

status() {
  local pid
  if pid=$(running_pid); then
    echo "gogpt is running (pid $pid) at $(url)"
  else
    echo "gogpt is not running"
    exit 3
  fi
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  logs) if [ "${2:-}" = "-n" ]; then tail -n 50 "$log_file"; else tail -f "$log_file"; fi ;;
  *) echo "usage: $0 [start|stop|status|logs [-n]]" >&2; exit 2 ;;
esac
