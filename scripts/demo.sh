#!/usr/bin/env bash
# qemuca's main job end to end on local defaults (fresh Debian 12, root):
# installs qemuca into .venv, creates a QEMU CA with an encrypted key in a temporary
# home, issues two hosts, exports their QEMU credential sets, checks them (qemuca
# inspect, openssl verify) and runs a real mutual-TLS handshake between the two
# sets over 127.0.0.1 with the destination's host name checked.
set -euo pipefail
. "$(dirname "$0")/as-root.sh"
cd "$(dirname "$0")/.."
command -v openssl >/dev/null || { apt-get update -q && apt-get install -y -q --no-install-recommends openssl; }
./scripts/setup-venv.sh
QEMUCA="$PWD/.venv/bin/qemuca"

work=$(mktemp -d /tmp/qemuca-demo.XXXXXX)
server_pid=""
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
export QEMUCA_HOME="$work/ca"
(umask 077; head -c 24 /dev/urandom | base64 > "$work/passphrase")
export QEMUCA_PASSPHRASE_FILE="$work/passphrase"

step() { printf '\n== %s\n' "$*"; }
step "create the QEMU CA (key encrypted with the passphrase file)"
"$QEMUCA" init --cn "QEMU CA demo"
step "issue two hosts"
"$QEMUCA" issue src.qemu.test dst.qemu.test --san 127.0.0.1
"$QEMUCA" list
step "export their QEMU credential sets"
"$QEMUCA" export src.qemu.test --dir "$work/src"
"$QEMUCA" export dst.qemu.test --dir "$work/dst"
ls -l "$work/dst"
step "check them: what QEMU demands, and the chain (OpenSSL)"
"$QEMUCA" inspect "$work/dst/server-cert.pem" >/dev/null && echo "dst server-cert.pem conforms"
openssl verify -purpose sslserver -CAfile "$work/dst/ca-cert.pem" "$work/dst/server-cert.pem"
openssl verify -purpose sslclient -CAfile "$work/src/ca-cert.pem" "$work/src/client-cert.pem"

step "mutual TLS handshake src -> dst over 127.0.0.1, checking the name dst.qemu.test"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
openssl s_server -quiet -accept "127.0.0.1:$port" -Verify 1 -verify_return_error \
    -cert "$work/dst/server-cert.pem" -key "$work/dst/server-key.pem" \
    -CAfile "$work/dst/ca-cert.pem" </dev/null >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do grep -qi ":$(printf %04X "$port") 00000000:0000 0A" /proc/net/tcp && break; sleep 0.05; done
echo | openssl s_client -connect "127.0.0.1:$port" -verify_hostname dst.qemu.test \
    -verify_return_error -CAfile "$work/src/ca-cert.pem" \
    -cert "$work/src/client-cert.pem" -key "$work/src/client-key.pem" -brief 2>&1 | tee "$work/client.log"
grep -q "Verification: OK" "$work/client.log"
printf '\nqemuca demo: OK (CA, two hosts, exported sets, verified chain, mutual TLS with name check)\n'
