#!/usr/bin/env bash
# The whole test suite, the way CI runs it: setup, PostgreSQL, lint, types, import
# contracts, then pytest from the lowest layer up (unit, contract, service, e2e).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
venv=${CAIRN_VENV:-.venv}
export PATH="$PWD/$venv/bin:$PATH"

if [ -z "${CAIRN_TEST_PG_DSN:-}" ]; then
  if dsn=$(bash scripts/postgres-up.sh); then
    export CAIRN_TEST_PG_DSN="$dsn"
  else
    echo "test: PostgreSQL is not available; its tests will be skipped unless CAIRN_REQUIRE_PG=1" >&2
  fi
fi

echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy --strict (appliance, backends)"
mypy
echo "== import contracts"
lint-imports
echo "== pytest"
python -m pytest tests/unit tests/contract tests/service tests/e2e tests/fuse "$@"
