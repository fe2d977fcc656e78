#!/usr/bin/env bash
# Run every check: ruff (lint and format), mypy (strict), then pytest; arguments go to pytest
# (`scripts/test.sh -k relay -x`). Creates .venv with gogpt and its test dependencies on first
# use, and again when pyproject.toml changes. PYTHON picks the interpreter for .venv (python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }
die() { printf '\nscripts/test.sh: %s\n' "$*" >&2; exit 1; }

# Programs some tests drive, as "program:Debian package". .ci/run installs the same packages.
SYSTEM_PROGRAMS=(redis-server:redis-server chromium:chromium openssl:openssl)
missing=()
for entry in "${SYSTEM_PROGRAMS[@]}"; do
  command -v "${entry%%:*}" >/dev/null 2>&1 || missing+=("${entry#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  hint="missing programs some tests need; install them with: sudo apt-get install ${missing[*]}   (or run .ci/run as root)"
  if [ $# -eq 0 ]; then
    die "$hint"
  fi
  echo "warning: $hint; the tests that need them will fail" >&2  # a chosen subset may not need them
fi

python=${PYTHON:-python3}
stamp=.venv/.gogpt-test-installed
if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $python"
  if ! "$python" -m venv .venv; then
    rm -rf .venv  # a half-made one (Debian without python3-venv leaves one without pip)
    die "'$python -m venv' failed: Python 3.11+ with venv is needed (Debian: apt-get install python3-venv)"
  fi
  rm -f "$stamp"
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  step "installing gogpt and its test dependencies into .venv (log: .venv/install.log)"
  # pip and the build backend are chatty: keep their output in the log unless the install fails
  if ! { .venv/bin/python -m pip install --upgrade pip && .venv/bin/python -m pip install -e '.[test]'; } \
      > .venv/install.log 2>&1; then
    tail -n 30 .venv/install.log >&2
    die "installing '.[test]' into .venv failed; the whole log is in .venv/install.log"
  fi
  touch "$stamp"
fi

step "ruff check"
.venv/bin/ruff check . || die "ruff found problems (many fix themselves: .venv/bin/ruff check --fix .)"
step "ruff format --check"
.venv/bin/ruff format --check . || die "files need formatting: .venv/bin/ruff format ."
step "mypy (strict)"
.venv/bin/mypy || die "mypy found type errors"
step "pytest $*"
exec .venv/bin/pytest "$@"
