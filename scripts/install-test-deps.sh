#!/usr/bin/env bash
# Installs everything the test suite runs against, on a fresh Debian 12 machine (root):
# real OpenSSH, QEMU, GnuTLS/OpenSSL tools, augeas with libvirt's qemu.conf lens,
# tcpdump, and Debian's stock qemu.conf for the editor's tests.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(qemu-system-x86 gnutls-bin openssl openssh-server openssh-client augeas-tools
          libvirt-daemon-driver-qemu tcpdump util-linux iproute2 procps strace
          systemd)  # systemd-analyze checks the shipped units
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
