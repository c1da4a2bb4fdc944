#!/usr/bin/env bash
# Installs everything the test suite and the demo run against, on a fresh Debian 12
# machine (root): real OpenSSH, QEMU, GnuTLS/OpenSSL tools, augeas with libvirt's
# qemu.conf lens, libvirtd and virsh, tcpdump, systemd-analyze, and Python's venv. Quick when all is there.
# Package lists are fetched at most once: only when they are missing, or when an
# install from the lists the machine has fails.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(qemu-system-x86 gnutls-bin openssl openssh-server openssh-client augeas-tools
          libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients  # a real libvirtd per fake host
          tcpdump util-linux iproute2 procps strace
          systemd             # systemd-analyze checks the shipped units
          python3-venv python3-pip)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
((${#missing[@]})) || exit 0
export DEBIAN_FRONTEND=noninteractive
install() { apt-get install -y -q --no-install-recommends "${missing[@]}"; }
if compgen -G "/var/lib/apt/lists/*_Packages" >/dev/null && install; then
    exit 0
fi
apt-get update -q
install
