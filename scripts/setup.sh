#!/usr/bin/env bash
# Prepares this checkout: system packages (when root with apt), then the venv in .venv
# with Cairn and its dev tools. Safe to run again; it skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "setup: $*" >&2; }
venv=${CAIRN_VENV:-.venv}

apt_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    missing=()
    for pkg in "$@"; do
      dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
      log "installing ${missing[*]}"
      apt-get update -qq >&2 || true
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2 || return 1
    fi
  else
    log "not root or no apt: skipping system packages $*"
  fi
}

python=${PYTHON:-python3}
if ! command -v "$python" >/dev/null 2>&1 || ! "$python" -c "import ensurepip, venv" >/dev/null 2>&1; then
  apt_install python3 python3-venv python3-dev
fi
# FUSE (for the mount frontend): wanted, not required for the other layers.
apt_install fuse3 libfuse3-dev pkg-config gcc || log "FUSE packages could not be installed"
# Real S3 clients for the end-to-end tests.
apt_install rclone || log "rclone could not be installed"
apt_install restic || log "restic could not be installed (its e2e test will fail)"
# Programs the mount tests run on the mount (git, tar and sqlite3 usually come with the OS).
apt_install rsync git sqlite3 || log "rsync, git or sqlite3 could not be installed"

stamp="$venv/.cairn-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv"
    "$python" -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -e '.[dev]' >&2
  touch "$stamp"
fi
log "ready: $venv"
