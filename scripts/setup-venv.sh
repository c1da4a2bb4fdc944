#!/usr/bin/env bash
# Creates .venv (a virtual environment beside the project) and installs qemuca into it,
# with the extras given as $1 (e.g. "test"). Works on a fresh Debian 12 as root: it
# installs python3-venv first when the interpreter lacks venv/ensurepip.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends python3-venv python3-pip
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec"
