#!/usr/bin/env bash
# The test command named in the README. pytest's exit 5 ("no tests collected") is a failure here.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m ruff check . || exit 1
python3 -m ruff format --check . || exit 1
python3 -P -m pytest -q -m "not gpu" "$@"  # -P: the repository root is not an import root
rc=$?
if [ $rc -eq 5 ]; then echo "no tests were collected: failing" >&2; exit 1; fi
exit $rc
