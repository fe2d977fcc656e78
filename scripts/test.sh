#!/usr/bin/env bash
# Run every check: ruff (lint and format), mypy (strict), then pytest; arguments go to pytest
# (`scripts/test.sh -k relay -x`). Creates .venv with gogpt and its test dependencies on first
# use, and again when pyproject.toml changes. PYTHON picks the interpreter for .venv (python3).
# Without arguments the whole suite runs three times: on the newest dependencies, again with
# SPLICE=off (the ordinary relay path), and in .venv-lowest on the lowest aiohttp that
# pyproject.toml allows. With arguments (a subset), only the first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }
die() { printf '\nscripts/test.sh: %s\n' "$*" >&2; exit 1; }

# Programs some tests drive, as "program:Debian package". .ci/run installs the same packages.
SYSTEM_PROGRAMS=(redis-server:redis-server chromium:chromium openssl:openssl valgrind:valgrind)
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

# make_venv DIR [PIP_ARGS...]: DIR with gogpt and its test dependencies (plus PIP_ARGS), made
# again when pyproject.toml is newer than its stamp.
make_venv() {
  local dir=$1 stamp=$1/.gogpt-test-installed
  shift
  if [ ! -x "$dir/bin/python" ]; then
    step "creating $dir with $python"
    if ! "$python" -m venv "$dir"; then
      rm -rf "$dir"  # a half-made one (Debian without python3-venv leaves one without pip)
      die "'$python -m venv' failed: Python 3.11+ with venv is needed (Debian: apt-get install python3-venv)"
    fi
    rm -f "$stamp"
  fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    step "installing gogpt and its test dependencies into $dir $* (log: $dir/install.log)"
    # pip and the build backend are chatty: keep their output in the log unless the install fails
    if ! { "$dir/bin/python" -m pip install --upgrade pip && "$dir/bin/python" -m pip install -e '.[test]' "$@"; } \
        > "$dir/install.log" 2>&1; then
      tail -n 30 "$dir/install.log" >&2
      die "installing '.[test]' into $dir failed; the whole log is in $dir/install.log"
    fi
    touch "$stamp"
  fi
}

make_venv .venv

step "ruff check"
.venv/bin/ruff check . || die "ruff found problems (many fix themselves: .venv/bin/ruff check --fix .)"
step "ruff format --check"
.venv/bin/ruff format --check . || die "files need formatting: .venv/bin/ruff format ."
step "mypy (strict)"
.venv/bin/mypy || die "mypy found type errors"
if [ $# -gt 0 ]; then
  step "pytest $*"
  exec .venv/bin/pytest "$@"
fi

aiohttp=$(.venv/bin/python -c 'import aiohttp; print(aiohttp.__version__)')
step "pytest, aiohttp $aiohttp (the newest allowed)"
.venv/bin/pytest || die "the suite failed on aiohttp $aiohttp"
step "pytest with SPLICE=off, aiohttp $aiohttp"
SPLICE=off .venv/bin/pytest || die "the suite failed with SPLICE=off"
lowest=$(.venv/bin/python - <<'PY'
import re, tomllib
requirements = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(next(re.search(r">=\s*([\w.]+)", r)[1] for r in requirements if re.match(r"aiohttp\s*[><=]", r)))
PY
)
make_venv .venv-lowest "aiohttp==$lowest"
step "pytest, aiohttp $lowest (the lowest allowed)"
.venv-lowest/bin/pytest || die "the suite failed on aiohttp $lowest"
