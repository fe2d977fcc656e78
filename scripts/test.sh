#!/usr/bin/env bash
# Run the whole test suite: lint, format check, type check, then pytest (arguments are passed on).
# Creates .venv and installs gogpt with its test extras on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$python" -m venv .venv
fi
stamp=.venv/.gogpt-test-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "==> installing gogpt with its test dependencies"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[test]'
  touch "$stamp"
fi

for program in redis-server chromium; do
  command -v "$program" >/dev/null || { echo "scripts/test.sh needs $program: apt-get install redis-server chromium"; exit 1; }
done

echo "==> ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "==> mypy"
.venv/bin/mypy
echo "==> pytest"
exec .venv/bin/pytest "$@"
