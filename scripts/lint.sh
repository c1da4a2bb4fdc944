#!/usr/bin/env bash
# The linter (ruff: pyflakes, pycodestyle, import order, bugbear, pyupgrade) over the whole
# tree and the type checker (mypy) over the package, both configured in pyproject.toml.
# Needs the test venv (./scripts/setup-venv.sh test, which ./scripts/test.sh runs).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check qemuca tests bench scripts ansible
.venv/bin/mypy
echo "lint: ruff and mypy clean"
