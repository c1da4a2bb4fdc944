#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine (root): installs the Debian
# packages the tests run against (sshd, QEMU, GnuTLS/OpenSSL tools, augeas + libvirt's
# lens), fetches Debian's stock qemu.conf, installs qemuca into .venv and runs pytest.
# Extra arguments go to pytest.
set -euo pipefail
. "$(dirname "$0")/as-root.sh"
cd "$(dirname "$0")/.."
./scripts/install-test-deps.sh
./scripts/fetch-stock-qemu-conf.sh
./scripts/setup-venv.sh test
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
