"""Real TLS handshakes between exported sets over 127.0.0.1, both peers authenticated.

This is what a migration does: the destination (server) demands a client certificate
from our CA, the source (client) checks the destination's certificate and its name.
pyOpenSSL drives OpenSSL directly; the stdlib ssl module is a second implementation
and gnutls-cli a third (QEMU itself uses GnuTLS).
"""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import threading
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import pytest
from cryptography import x509
from OpenSSL import SSL, crypto

from tests.support.pki import export_set, issue, make_store, revoke
from tests.support.tools import require_tool

TIMEOUT_S = 10
X509_V_ERR_CERT_REVOKED = 23
X509_V_ERR_HOSTNAME_MISMATCH = 62


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Exported sets: a, b, r (revoked after export) from one CA; x from another CA
    (same name as a); ip with 127.0.0.1 as an iPAddress SAN."""
    base = tmp_path_factory.mktemp("tls")
    home = make_store(base, name="ca", hosts=["a.qemu.test", "b.qemu.test", "r.qemu.test"])
    issue(home, "ip.qemu.test", sans=["127.0.0.1"])
    other = make_store(base, "ecdsa-p384", name="other-ca", hosts=["a.qemu.test"], host_key_type="rsa2048")
    out = {"r": base / "r", "x": base / "x"}
    export_set(home, "r.qemu.test", out["r"])
    export_set(other, "a.qemu.test", out["x"])
    revoke(home, "r.qemu.test", "key-compromise")
    for name in ("a", "b", "ip"):
        out[name] = base / name
        export_set(home, f"{name}.qemu.test", out[name])  # these carry ca-crl.pem
    return out


# ---------------------------------------------------------------- pyOpenSSL peers

def _timeouts(sock: socket.socket) -> None:
    """Blocking sockets that give up after TIMEOUT_S: a broken peer fails the test, never hangs it."""
    tv = struct.pack("ll", TIMEOUT_S, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class Peer:
    """One side's context: its set's cert and key, the CA (of `trust`, default the same
    set), optionally the CRL."""

    def __init__(self, set_dir: Path, role: str, crl: bool = False, trust: Optional[Path] = None):
        self.errors: List[int] = []
        self.peer_cn: Optional[str] = None
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.use_certificate_file(str(set_dir / f"{role}-cert.pem"))
        ctx.use_privatekey_file(str(set_dir / f"{role}-key.pem"))
        ctx.check_privatekey()
        ctx.load_verify_locations(str((trust or set_dir) / "ca-cert.pem"))
        if crl:
            store = ctx.get_cert_store()
            store.add_crl(x509.load_pem_x509_crl((set_dir / "ca-crl.pem").read_bytes()))
            store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
        mode = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if role == "server" else 0)
        ctx.set_verify(mode, self._verify)
        self.ctx = ctx
        self.expected_host: Optional[str] = None

    def _verify(self, conn, cert, errno, depth, ok):
        if not ok:
            self.errors.append(errno)
        if ok and depth == 0 and self.expected_host and not _hostname_checked_by_openssl():
            # Fallback when OpenSSL's own check is unreachable: compare the dNSName SANs.
            sans = cert.to_cryptography().extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
            if self.expected_host not in sans:
                self.errors.append(X509_V_ERR_HOSTNAME_MISMATCH)
                return False
        return bool(ok)


def _peer_cn(conn: SSL.Connection) -> str:
    cert = conn.get_peer_certificate().to_cryptography()
    return cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value


def _hostname_checked_by_openssl() -> bool:
    from OpenSSL.SSL import _lib

    return hasattr(_lib, "X509_VERIFY_PARAM_set1_host") and hasattr(_lib, "SSL_get0_param")


def _check_hostname(conn: SSL.Connection, host: str) -> None:
    """OpenSSL's RFC 6125 name check on the peer certificate (as QEMU's GnuTLS does it).
    pyOpenSSL has no public API for it: use its OpenSSL binding of X509_VERIFY_PARAM_set1_host."""
    if _hostname_checked_by_openssl():
        from OpenSSL.SSL import _lib

        param = _lib.SSL_get0_param(conn._ssl)
        assert _lib.X509_VERIFY_PARAM_set1_host(param, host.encode(), len(host)) == 1


def handshake(server: Peer, client: Peer, host: str) -> Tuple[Optional[str], Optional[str]]:
    """Connect client to server over 127.0.0.1, exchange one message each way.
    Returns (server error, client error); (None, None) means both sides succeeded."""

    def ping_pong(conn: SSL.Connection, _result: dict) -> None:
        assert conn.recv(16) == b"ping"
        conn.sendall(b"pong")
        server.peer_cn = _peer_cn(conn)

    listener, thread, result = _serve_once(server, ping_pong)
    client.expected_host = host
    raw = socket.create_connection(listener.getsockname(), timeout=TIMEOUT_S)
    raw.settimeout(None)
    _timeouts(raw)
    conn = SSL.Connection(client.ctx, raw)
    conn.set_tlsext_host_name(host.encode())
    _check_hostname(conn, host)
    conn.set_connect_state()
    try:
        conn.do_handshake()
        conn.sendall(b"ping")
        assert conn.recv(16) == b"pong"
        client.peer_cn = _peer_cn(conn)
    except (SSL.Error, OSError, AssertionError) as e:
        result["client"] = repr(e)
    finally:
        raw.close()
    thread.join(TIMEOUT_S * 2)
    listener.close()
    assert not thread.is_alive()
    return result.get("error"), result.get("client")


def test_two_hosts_authenticate_each_other(sets):
    server, client = Peer(sets["a"], "server", crl=True), Peer(sets["b"], "client", crl=True)
    assert handshake(server, client, "a.qemu.test") == (None, None)
    assert (server.peer_cn, client.peer_cn) == ("b.qemu.test", "a.qemu.test")
    assert server.errors == client.errors == []


def test_a_client_from_another_ca_is_refused(sets):
    server, client = Peer(sets["a"], "server"), Peer(sets["x"], "client", trust=sets["a"])
    server_error, client_error = handshake(server, client, "a.qemu.test")
    assert server_error and "certificate verify failed" in server_error
    assert client_error  # it learns from the alert, or trusts nothing of ours anyway


def test_a_server_from_another_ca_is_refused(sets):
    """Same host name, other CA: the name alone must never be enough."""
    server, client = Peer(sets["x"], "server", trust=sets["a"]), Peer(sets["b"], "client")
    server_error, client_error = handshake(server, client, "a.qemu.test")
    assert client_error and "certificate verify failed" in client_error
    assert server_error and "unknown ca" in server_error


def test_a_name_not_in_the_sans_is_refused(sets):
    server, client = Peer(sets["a"], "server"), Peer(sets["b"], "client")
    server_error, client_error = handshake(server, client, "c.qemu.test")
    assert client_error and X509_V_ERR_HOSTNAME_MISMATCH in client.errors
    assert server_error


def test_a_revoked_client_is_refused_once_the_crl_is_loaded(sets):
    without = handshake(Peer(sets["a"], "server"), Peer(sets["r"], "client"), "a.qemu.test")
    assert without == (None, None)  # the CRL is what cuts it off
    server = Peer(sets["a"], "server", crl=True)
    server_error, client_error = handshake(server, Peer(sets["r"], "client"), "a.qemu.test")
    assert server_error and X509_V_ERR_CERT_REVOKED in server.errors
    assert client_error


def test_a_revoked_server_is_refused_by_a_client_with_the_crl(sets):
    client = Peer(sets["a"], "client", crl=True)
    server_error, client_error = handshake(Peer(sets["r"], "server"), client, "r.qemu.test")
    assert client_error and X509_V_ERR_CERT_REVOKED in client.errors


# ---------------------------------------------------------------- stdlib ssl (second implementation)

def _stdlib_contexts(server_dir: Path, client_dir: Path, crl: bool = False):
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(server_dir / "server-cert.pem", server_dir / "server-key.pem")
    sctx.load_verify_locations(server_dir / "ca-cert.pem")
    sctx.verify_mode = ssl.CERT_REQUIRED
    sctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if crl:
        sctx.load_verify_locations(server_dir / "ca-crl.pem")
        sctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED
    cctx.load_cert_chain(client_dir / "client-cert.pem", client_dir / "client-key.pem")
    cctx.load_verify_locations(client_dir / "ca-cert.pem")
    cctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return sctx, cctx


def stdlib_handshake(sctx, cctx, host: str) -> Tuple[Optional[str], Optional[str]]:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT_S)
    result: dict = {}

    def serve():
        try:
            raw, _ = listener.accept()
            raw.settimeout(TIMEOUT_S)
            with sctx.wrap_socket(raw, server_side=True) as conn:
                assert conn.recv(16) == b"ping"
                conn.sendall(b"pong")
        except (OSError, AssertionError) as e:
            result["server"] = repr(e)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=TIMEOUT_S) as raw:
            with cctx.wrap_socket(raw, server_hostname=host) as conn:
                conn.sendall(b"ping")
                assert conn.recv(16) == b"pong"
    except (OSError, AssertionError) as e:
        result["client"] = repr(e)
    thread.join(TIMEOUT_S * 2)
    listener.close()
    assert not thread.is_alive()
    return result.get("server"), result.get("client")


def test_stdlib_ssl_agrees(sets):
    assert stdlib_handshake(*_stdlib_contexts(sets["a"], sets["b"], crl=True), "a.qemu.test") == (None, None)
    _, wrong_name = stdlib_handshake(*_stdlib_contexts(sets["a"], sets["b"]), "b.qemu.test")
    assert wrong_name and "Hostname mismatch" in wrong_name
    revoked, _ = stdlib_handshake(*_stdlib_contexts(sets["a"], sets["r"], crl=True), "a.qemu.test")
    assert revoked and "revoked" in revoked


def test_an_ip_san_matches_an_ip_destination(sets):
    """A migration URI with an IP matches only an iPAddress SAN (issue --san IP)."""
    sctx, cctx = _stdlib_contexts(sets["ip"], sets["b"])
    assert stdlib_handshake(sctx, cctx, "127.0.0.1") == (None, None)
    sctx, cctx = _stdlib_contexts(sets["a"], sets["b"])
    _, error = stdlib_handshake(sctx, cctx, "127.0.0.1")
    assert error and "mismatch" in error


# ---------------------------------------------------------------- GnuTLS (QEMU's library)
# Only gnutls-cli: gnutls-serv cannot be bound to the loopback address.

def _gnutls_client(client_dir: Path, host: str, port: int) -> subprocess.CompletedProcess:
    gnutls_cli = require_tool("gnutls-cli")
    return subprocess.run(
        [gnutls_cli, "--port", str(port), "--x509cafile", str(client_dir / "ca-cert.pem"),
         "--x509certfile", str(client_dir / "client-cert.pem"),
         "--x509keyfile", str(client_dir / "client-key.pem"), "--verify-hostname", host, "127.0.0.1"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT_S * 2)


def _serve_once(server: Peer, session: Callable[[SSL.Connection, dict], None]
                ) -> Tuple[socket.socket, threading.Thread, dict]:
    """A one-connection TLS server on 127.0.0.1 that runs `session` after the handshake;
    result["error"] says what failed on its side."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(TIMEOUT_S)
    result: dict = {}

    def serve():
        try:
            raw, _ = listener.accept()
        except OSError as e:
            result["error"] = f"accept: {e}"
            return
        try:
            _timeouts(raw)
            conn = SSL.Connection(server.ctx, raw)
            conn.set_accept_state()
            conn.do_handshake()
            session(conn, result)
            conn.shutdown()
        except (SSL.Error, OSError, AssertionError) as e:
            result["error"] = repr(e)
        finally:
            raw.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread, result


def _greet_until_goodbye(conn: SSL.Connection, result: dict) -> None:
    result["peer"] = _peer_cn(conn)
    conn.sendall(b"hello\n")
    try:  # until gnutls-cli, at the end of its stdin, says goodbye
        while conn.recv(1024):
            pass
    except SSL.ZeroReturnError:
        pass


def test_gnutls_client_handshake(sets):
    for host, ok in (("a.qemu.test", True), ("c.qemu.test", False)):
        listener, thread, result = _serve_once(Peer(sets["a"], "server", crl=True), _greet_until_goodbye)
        proc = _gnutls_client(sets["b"], host, listener.getsockname()[1])
        thread.join(TIMEOUT_S * 2)
        listener.close()
        if ok:
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert "Handshake was completed" in proc.stdout + proc.stderr
            assert result.get("peer") == "b.qemu.test"
        else:
            assert proc.returncode != 0
            assert "does not match the expected" in proc.stdout + proc.stderr
