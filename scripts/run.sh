#!/usr/bin/env bash
# Sets up the checkout (see setup.sh) and runs Cairn on examples/quickstart.yaml,
# or on the config given as the first argument.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
config=${1:-examples/quickstart.yaml}
.venv/bin/cairn validate --config "$config"
exec .venv/bin/cairn serve --config "$config"
