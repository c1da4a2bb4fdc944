#!/usr/bin/env bash
# Puts Debian's stock /etc/libvirt/qemu.conf in tests/.cache/qemu.conf for the tests.
# It comes from the package libvirt-daemon-system, downloaded with `apt-get download`
# and unpacked with `dpkg-deb -x`: nothing is installed. Quick when already fetched.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/tests/.cache/qemu.conf"
[ -s "$dest" ] && exit 0

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
# apt warns that it downloads unsandboxed as root into a private directory: harmless.
if ! apt-get download -q libvirt-daemon-system >/dev/null 2>&1; then
    apt-get update -q >/dev/null
    apt-get download -q libvirt-daemon-system
fi
dpkg-deb -x libvirt-daemon-system_*.deb unpacked
mkdir -p "$(dirname "$dest")"
# Copy under a temporary name, then rename: a half-written cache never looks fetched.
cp unpacked/etc/libvirt/qemu.conf "$dest.tmp"
mv "$dest.tmp" "$dest"
echo "fetched $dest"
