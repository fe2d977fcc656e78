#!/usr/bin/env bash
# Run gogpt in the background:  scripts/run.sh [start [gogpt options]|stop|status|logs [-n [N]]]
#
# start (the default) creates .venv and installs gogpt on first use (again when
# pyproject.toml changes), writes .env from .env.example with a fresh random SECRET_KEY
# if there is none, then starts `python -m gogpt` under nohup; options after `start`
# go to gogpt (`scripts/run.sh start --multi`).
#
#   GOGPT_HOME    directory holding .env, .venv, server.log, gogpt.pid and gogpt.db (the state,
#                 GOGPT_DB: a relative path is taken from here) (default: the repository)
#   GOGPT_PYTHON  run gogpt with this interpreter instead of .venv (nothing is installed)
#   GOGPT_START_TIMEOUT  seconds to wait for the server to answer (default 10)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
self=$repo/scripts/run.sh
home=${GOGPT_HOME:-$repo}
cd "$home"
home=$(pwd)
pid_file=gogpt.pid
log_file=server.log
python=${GOGPT_PYTHON:-.venv/bin/python}

die() { echo "$*" >&2; exit 1; }

setting() {  # a setting as gogpt sees it: the environment, else the last line of .env, else the default
  local name=$1 default=$2 value=${!1:-} line
  if [ -z "$value" ] && [ -f .env ]; then
    line=$(grep -E "^[[:space:]]*(export[[:space:]]+)?$name[[:space:]]*=" .env | tail -n 1 || true)
    value=${line#*=}
    case $value in
      *\"*|*\'*) value=$(printf '%s' "$value" | sed -E "s/^[[:space:]]*([\"'])(.*)\\1.*$/\\2/") ;;
      *) value=$(printf '%s' "$value" | sed -E 's/[[:space:]]+#.*$//') ;;
    esac
    value=$(printf '%s' "$value" | tr -d '\r' | sed -E 's/^[[:space:]]+|[[:space:]]+$//g')
  fi
  printf '%s\n' "${value:-$default}"
}

url() {  # where a local client reaches the server
  local host port
  host=$(setting HOST 0.0.0.0)
  port=$(setting PORT 8000)
  case $host in
    0.0.0.0) host=127.0.0.1 ;;
    ::|"[::]") host="[::1]" ;;
    *:*) host="[${host#[}"; host="${host%]}]" ;;  # an IPv6 address needs brackets in a URL
  esac
  echo "http://$host:$port"
}

running_pid() {  # the pid in the pid file, if that process is alive and is gogpt (not a reused pid)
  [ -f "$pid_file" ] || return 1
  local pid
  pid=$(tr -dc '0-9' < "$pid_file")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  if [ -r "/proc/$pid/cmdline" ]; then
    tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- '-m gogpt' || return 1
  fi
  echo "$pid"
}

install() {
  [ -n "${GOGPT_PYTHON:-}" ] && return 0
  local stamp=.venv/.gogpt-installed
  if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    if ! python3 -m venv .venv; then
      rm -rf .venv  # a half-made one (Debian without python3-venv leaves one without pip)
      die "creating .venv failed: Python 3.11+ with venv is needed (Debian: apt-get install python3-venv)"
    fi
    rm -f "$stamp"
  fi
  if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
    echo "==> installing gogpt into .venv (log: $home/.venv/install.log)"
    if ! { .venv/bin/python -m pip install --upgrade pip && .venv/bin/python -m pip install -e "$repo"; } \
        > .venv/install.log 2>&1; then
      tail -n 30 .venv/install.log >&2
      die "installing gogpt failed; the whole log is in $home/.venv/install.log"
    fi
    touch "$stamp"
  fi
}

write_env() {  # never overwrites an existing .env
  [ -f .env ] && return 0
  [ -f "$repo/.env.example" ] || die "$repo/.env.example is missing"
  local key
  key=$("$python" -c 'import secrets; print(secrets.token_hex(32))')
  (umask 077 && sed "s/^SECRET_KEY=.*/SECRET_KEY=$key/" "$repo/.env.example" > .env)
  chmod 600 .env
  echo "==> wrote $home/.env with a fresh SECRET_KEY (add CHAT_API_KEY and the rest there)"
}

answers() {  # does the server answer HTTP at this URL? Any status counts: it is up.
  "$python" - "$1" <<'PY' 2>/dev/null
import sys, urllib.error, urllib.request
direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
try:
    direct.open(sys.argv[1], timeout=1).close()
except urllib.error.HTTPError:
    pass
PY
}

start() {
  local pid base limit
  if pid=$(running_pid); then
    die "gogpt is already running (pid $pid) at $(url); stop it first: $self stop"
  fi
  install
  write_env
  base=$(url)
  if answers "$base/healthz"; then  # else that server's answer would pass for ours
    die "something else already answers at $base: stop it or set another PORT in $home/.env"
  fi
  echo "==> starting gogpt (log: $home/$log_file)"
  nohup "$python" -m gogpt "$@" >> "$log_file" 2>&1 < /dev/null &
  pid=$!
  echo "$pid" > "$pid_file"
  limit=${GOGPT_START_TIMEOUT:-10}
  [[ $limit =~ ^[0-9]+$ ]] || limit=10
  SECONDS=0
  while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$pid_file"
      echo "gogpt failed to start; the last lines of $home/$log_file:" >&2
      tail -n 20 "$log_file" >&2
      exit 1
    fi
    if answers "$base/healthz" && kill -0 "$pid" 2>/dev/null; then
      break
    fi
    if [ "$SECONDS" -ge "$limit" ]; then
      echo "gogpt (pid $pid) is running but $base did not answer within $limit s; the last lines of $log_file:" >&2
      tail -n 20 "$log_file" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "gogpt is running (pid $pid) at $base"
  echo "mint a token:  curl -s -X POST $base/token -d id=me -d hour=24 -d key=\$(sed -n 's/^SECRET_KEY=//p' $home/.env)"
  echo "stop it:       $self stop"
}

stop() {
  local pid grace limit
  if ! pid=$(running_pid); then
    rm -f "$pid_file"
    echo "gogpt is not running"
    return 0
  fi
  grace=$(setting SHUTDOWN_GRACE 30)
  grace=${grace%%.*}
  [[ $grace =~ ^[0-9]+$ ]] || grace=30
  limit=$((grace + 5))
  echo "==> stopping gogpt (pid $pid); running streams get up to $grace s"
  kill -TERM "$pid" 2>/dev/null || true
  SECONDS=0
  while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$limit" ]; do
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pid_file"
    die "gogpt (pid $pid) did not stop within $limit s, so it was killed"
  fi
  rm -f "$pid_file"
  echo "gogpt stopped"
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

logs() {
  [ -f "$log_file" ] || die "no $home/$log_file yet: gogpt has not been started here"
  if [ "${1:-}" = "-n" ]; then
    tail -n "${2:-50}" "$log_file"
  else
    tail -n 50 -f "$log_file"
  fi
}

command=${1:-start}
[ $# -gt 0 ] && shift
case $command in
  start) start "$@" ;;
  stop) stop ;;
  status) status ;;
  logs) logs "$@" ;;
  -h|--help|help) sed -n '2,/^set -euo/p' "$self" | sed '$d; s/^# \{0,1\}//' ;;
  *) echo "usage: $self [start [gogpt options]|stop|status|logs [-n [N]]]" >&2; exit 2 ;;
esac
