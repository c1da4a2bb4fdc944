#!/usr/bin/env bash
# qemuca's main job end to end on a throwaway fleet on loopback (fresh Debian 12, root):
# installs what it needs (Debian packages, qemuca in .venv), starts three fake
# hypervisors (a real sshd and libvirtd each, in their own namespaces), then init,
# enroll, verify, a real encrypted QEMU migration (probe), `virsh migrate --live --tls`,
# check, and a rotation while libvirt keeps migrating a guest.
# `--keep` leaves the fleet up until Ctrl-C. Everything is removed at the end.
set -euo pipefail
. "$(dirname "$0")/as-root.sh"
cd "$(dirname "$0")/.."
echo "qemuca demo: installing what it needs (Debian packages, .venv; quick after the first run)"
./scripts/install-test-deps.sh >/dev/null
./scripts/fetch-stock-qemu-conf.sh >/dev/null
./scripts/setup-venv.sh
exec .venv/bin/python scripts/demo.py "$@"
