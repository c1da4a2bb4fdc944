"""Hostile input catalog (issue 7.4): bad names, SANs, files, passphrases, configs, options.

Every case is a real `python -m qemuca` run and must fail the documented way: exit code of
docs/exit-codes.md, exactly one stderr line 'qemuca: error: ...' with no control character
(a hostile name must not split the line or drive the terminal), no traceback, nothing on
stdout, and nothing written: both stores, every input and target file, and the homes that
`init` was pointed at stay exactly as they were. The cases run side by side.

Exit codes worth knowing when reading the table: click checks a path given where a file is
expected (a directory) and out-of-range numbers itself: 2. A FIFO or a device where a file
is expected is refused at once (never read, never waited on): 3, or 6 for a passphrase file.
`check` reports bad thresholds with 3, as monitoring plugins reserve 2 for CRITICAL.
"""

from __future__ import annotations

import os
import stat
import subprocess
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from qemuca.errors import (
    EXIT_CONFLICT,
    EXIT_FAILED,
    EXIT_INVALID_INPUT,
    EXIT_IO,
    EXIT_NOT_FOUND,
    EXIT_PASSPHRASE,
    EXIT_USAGE,
)
from tests.pki.test_fuzz_readers import SAMPLES, csr_with_bitstring_cn, csr_with_version, pem
from tests.support.pki import (
    assert_error,
    export_set,
    make_store,
    run_qemuca,
    snapshot_store,
    tamper_signature,
    write_secret,
)

SECRET = "correct horse battery staple"
CASE_TIMEOUT = 60  # a case that blocks (a FIFO read) fails instead of hanging the suite


@dataclass(frozen=True)
class Case:
    id: str
    args: Tuple[str, ...]
    code: int
    needles: Tuple[str, ...] = ()
    home: str = "plain"  # "plain", "enc" (passphrase-protected store) or "fresh" (no store yet)
    env: Optional[Dict[str, str]] = field(default=None, hash=False)


def case(id_: str, args: Sequence, code: int, *needles: str, home: str = "plain", env=None) -> Case:
    return Case(id_, tuple(str(a) for a in args), code, needles, home, env)


def _csr(key, cn: str = "weak.qemu.test", algorithm=hashes.SHA256()) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    signed = builder.sign(key, None if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey))
                          else algorithm)
    return signed.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data, mode: int = 0o644) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogateescape"))
    os.chmod(path, mode)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two stores (plain and passphrase-protected), a folder of hostile files, qemu.conf
    files with syntax errors, and an empty folder for the homes `init` must not create."""
    base = tmp_path_factory.mktemp("hostile")
    plain = make_store(base, name="plain", hosts=["a.qemu.test"])
    enc = make_store(base, name="enc", passphrase=SECRET.encode(), hosts=["a.qemu.test"])
    f = base / "in"
    f.mkdir()
    export_set(plain, "a.qemu.test", base / "set")
    cert = (base / "set" / "server-cert.pem").read_bytes()
    good_key = ec.generate_private_key(ec.SECP256R1())
    good = _write(f / "good.csr", _csr(good_key, "good.qemu.test"))
    files = {
        "good.csr": good,
        "cert.pem": _write(f / "cert.pem", cert),
        "key.pem": _write(f / "key.pem", good_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600),
        "crl.pem": _write(f / "crl.pem", pem("X509 CRL", SAMPLES["X509 CRL"][0])),
        "random.bin": _write(f / "random.bin", os.urandom(4096)),
        "big.pem": _write(f / "big.pem", cert * ((2 << 20) // len(cert) + 1)),  # > 2 MiB of valid PEM
        "badb64.pem": _write(f / "badb64.pem", b"-----BEGIN CERTIFICATE-----\n!!not*base64$$\n"
                                               b"-----END CERTIFICATE-----\n"),
        "badb64.csr": _write(f / "badb64.csr", b"-----BEGIN CERTIFICATE REQUEST-----\n%%%%\n"
                                               b"-----END CERTIFICATE REQUEST-----\n"),
        "empty.pem": _write(f / "empty.pem", b""),
        "nul.pem": _write(f / "nul.pem", b"\0" * 512),
        "truncated.pem": _write(f / "truncated.pem", cert[: len(cert) // 2]),
        "truncated.csr": _write(f / "truncated.csr",  # the body cut short, the END line kept
                                good.read_bytes()[:-60] + b"\n-----END CERTIFICATE REQUEST-----\n"),
        "dsaparams.pem": _write(f / "dsaparams.pem", pem("DSA PARAMETERS", b"\x30\x00")),
        "pubkey.pem": _write(f / "pubkey.pem", good_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)),
        "openssh.pem": _write(f / "openssh.pem", b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk=\n"
                                                 b"-----END OPENSSH PRIVATE KEY-----\n"),
        "tampered.csr": _write(f / "tampered.csr", tamper_signature(good.read_bytes())),
        "rsa1024.csr": _write(f / "rsa1024.csr", _csr(rsa.generate_private_key(65537, 1024))),
        "p521.csr": _write(f / "p521.csr", _csr(ec.generate_private_key(ec.SECP521R1()))),
        "ed25519.csr": _write(f / "ed25519.csr", _csr(ed25519.Ed25519PrivateKey.generate())),
        "ed448.csr": _write(f / "ed448.csr", _csr(ed448.Ed448PrivateKey.generate())),
        "dsa.csr": _write(f / "dsa.csr", _csr(dsa.generate_private_key(1024))),
        "v5.csr": _write(f / "v5.csr", pem("CERTIFICATE REQUEST", csr_with_version(5))),
        "bitcn.csr": _write(f / "bitcn.csr", pem("CERTIFICATE REQUEST", csr_with_bitstring_cn())),
        "newline\nname.pem": _write(f / "newline\nname.pem", b"garbage"),
        # hosts files and inventories
        "hosts-binary": _write(f / "hosts-binary", b"a.qemu.test\n\x00\xff\xfe\x80garbage\n"),
        "hosts-utf16": _write(f / "hosts-utf16", "a.qemu.test\n".encode("utf-16")),
        "hosts-dash": _write(f / "hosts-dash", "ok.qemu.test\n-x.qemu.test\n"),
        "hosts-escape": _write(f / "hosts-escape", "ok.qemu.test\nevil\x1b[2J.qemu.test\n"),
        "hosts-spaces": _write(f / "hosts-spaces", "ok.qemu.test\nbad name.qemu.test\n"),
        "inv-letters": _write(f / "inv-letters", "[kvm]\nkvm[01:zz].qemu.test\n"),
        "inv-backwards": _write(f / "inv-backwards", "[kvm]\nkvm[9:1].qemu.test\n"),
        "inv-huge": _write(f / "inv-huge", "[kvm]\nkvm[1:999999999].qemu.test\n"),
        "inv-binary": _write(f / "inv-binary", b"[kvm]\n\x00\x01\x02\n"),
        "inv-header": _write(f / "inv-header", "[kvm\na.qemu.test\n"),
        "inv-port": _write(f / "inv-port", "[kvm]\na.qemu.test ansible_port=99999\n"),
        "inv.yml": _write(f / "inv.yml", "all:\n  hosts: [1, 2\n"),
        "inv-ok": _write(f / "inv-ok", "[kvm]\na.qemu.test\n"),
        "pass-wrong": Path(write_secret(f / "pass-wrong", "not the passphrase")),
        "pass-world": Path(write_secret(f / "pass-world", SECRET, 0o644)),
        "pass-group": Path(write_secret(f / "pass-group", SECRET, 0o640)),
        "pass-empty": Path(write_secret(f / "pass-empty", "")),
        "pass-first-line-empty": _write(f / "pass-first-line-empty", "\n" + SECRET + "\n", 0o600),
        "pass-good": Path(write_secret(f / "pass-good", SECRET)),
    }
    (f / "dir").mkdir()
    (f / "pass-dir").mkdir(mode=0o700)
    os.mkfifo(f / "fifo", 0o600)
    os.chmod(f / "fifo", 0o600)  # a 0600 FIFO passes the passphrase file's mode check
    files.update({"dir": f / "dir", "pass-dir": f / "pass-dir", "fifo": f / "fifo"})
    conf = base / "conf"
    conf.mkdir()
    for name, text in {"no-value": "migrate_tls_x509_verify = \n",
                       "unterminated-string": 'migrate_tls_x509_cert_dir = "/etc/pki/qemu\n',
                       "unterminated-list": 'cgroup_controllers = [ "cpu", \n',
                       "no-name": "= 1\n",
                       "two-on-a-line": "a = 1 b = 2\n",
                       "binary": "\x00\xff\xfe\n",
                       "bad-verify": "migrate_tls_x509_verify = \"yes\"\n"}.items():
        files["conf-" + name] = _write(conf / f"{name}.conf", text, 0o600)
    (base / "fresh").mkdir()
    (base / "out").mkdir()
    return {"base": base, "plain": plain, "enc": enc, "files": files, "in": f, "conf": conf,
            "fresh": base / "fresh", "out": base / "out"}


def catalog(w) -> list:
    f, out = w["files"], w["out"]
    long_cn = "c" * 65
    cases = [
        # ---- host names (issue validates every name before anything is written)
        case("host-empty", ["issue", ""], EXIT_INVALID_INPUT, "empty"),
        case("host-dotdot", ["issue", ".."], EXIT_INVALID_INPUT, "empty label"),
        case("host-slash", ["issue", "a/b"], EXIT_INVALID_INPUT, "path"),
        case("host-traversal", ["issue", "../../etc/passwd"], EXIT_INVALID_INPUT, "path"),
        case("host-leading-dash", ["issue", "--", "-x.qemu.test"], EXIT_INVALID_INPUT, "hyphens"),
        case("host-dash-is-an-option", ["issue", "-x.qemu.test"], EXIT_USAGE, "no such option"),
        case("host-dash-in-hosts-file", ["issue", "--hosts-file", f["hosts-dash"]], EXIT_INVALID_INPUT,
             "-x.qemu.test"),
        case("host-wildcard", ["issue", "*.qemu.test"], EXIT_INVALID_INPUT, "wildcard"),
        case("host-300-chars", ["issue", "a" * 300], EXIT_INVALID_INPUT, "longer than 253"),
        case("host-label-64", ["issue", "a" * 64 + ".qemu.test"], EXIT_INVALID_INPUT, "longer than 63"),
        case("host-cn-over-64", ["issue", "a" * 60 + ".qemu.test"], EXIT_INVALID_INPUT, "64"),
        case("host-escape", ["issue", "a\x1b[31mb.qemu.test"], EXIT_INVALID_INPUT, "control", "\\x1b"),
        case("host-tab", ["issue", "a\tb.qemu.test"], EXIT_INVALID_INPUT, "control"),
        case("host-cr", ["issue", "a\rb.qemu.test"], EXIT_INVALID_INPUT, "control", "\\r"),
        case("host-zero-width-space", ["issue", "a\u200bb.qemu.test"], EXIT_INVALID_INPUT, "invisible"),
        case("host-soft-hyphen", ["issue", "a\u00adb.qemu.test"], EXIT_INVALID_INPUT, "invisible"),
        case("host-rtl-override", ["issue", "a\u202eb.qemu.test"], EXIT_INVALID_INPUT, "not allowed"),
        case("host-fullwidth", ["issue", "\uff41.qemu.test"], EXIT_INVALID_INPUT, "mapped"),
        case("host-cyrillic-a-among-latin", ["issue", "\u0430pple.qemu.test"], EXIT_INVALID_INPUT,
             "mixes scripts"),
        case("host-all-cyrillic-lookalike", ["issue", "\u0430\u0441\u0435.qemu.test"], EXIT_INVALID_INPUT,
             "look latin"),
        case("host-confusable-as-a-label", ["issue", "xn--pple-43d.qemu.test"], EXIT_INVALID_INPUT,
             "mixes scripts"),
        case("host-bad-a-label", ["issue", "xn--a.qemu.test"], EXIT_INVALID_INPUT, "a-label"),
        case("host-snowman", ["issue", "\u2603.qemu.test"], EXIT_INVALID_INPUT, "not allowed"),
        case("host-ipv4", ["issue", "10.0.0.1"], EXIT_INVALID_INPUT, "IP address", "--san"),
        case("host-ipv6-brackets", ["issue", "[::1]"], EXIT_INVALID_INPUT, "letters"),
        case("host-trailing-space", ["issue", "a.qemu.test "], EXIT_INVALID_INPUT, "letters"),
        case("host-underscore", ["issue", "a_b.qemu.test"], EXIT_INVALID_INPUT, "letters"),
        case("host-numeric-tld", ["issue", "host.123"], EXIT_INVALID_INPUT, "numeric"),
        case("host-one-bad-among-good", ["issue", "ok1.qemu.test", "bad/one", "ok2.qemu.test"],
             EXIT_INVALID_INPUT, "bad/one"),
        case("host-export", ["export", "a/b", "--dir", out / "x"], EXIT_INVALID_INPUT, "path"),
        case("host-deploy", ["deploy", "--", "-rf"], EXIT_INVALID_INPUT, "hyphens"),
        case("host-enroll", ["enroll", "a\x1b]0;pwned\x07.qemu.test"], EXIT_INVALID_INPUT, "control"),
        # ---- SANs
        case("san-empty", ["issue", "ok.qemu.test", "--san", ""], EXIT_INVALID_INPUT, "empty"),
        case("san-wildcard", ["issue", "ok.qemu.test", "--san", "*.qemu.test"], EXIT_INVALID_INPUT, "wildcard"),
        case("san-cidr", ["issue", "ok.qemu.test", "--san", "10.0.0.0/8"], EXIT_INVALID_INPUT, "path"),
        case("san-half-bracket", ["issue", "ok.qemu.test", "--san", "[::1"], EXIT_INVALID_INPUT, "letters"),
        case("san-bracketed-name", ["issue", "ok.qemu.test", "--san", "[a.qemu.test]"], EXIT_INVALID_INPUT,
             "brackets"),
        case("san-zone-index", ["issue", "ok.qemu.test", "--san", "fe80::1%eth0"], EXIT_INVALID_INPUT, "zone"),
        case("san-unspecified", ["issue", "ok.qemu.test", "--san", "0.0.0.0"], EXIT_INVALID_INPUT, "not an address"),
        case("san-multicast", ["issue", "ok.qemu.test", "--san", "ff02::1"], EXIT_INVALID_INPUT, "not an address"),
        case("san-bad-ipv4", ["issue", "ok.qemu.test", "--san", "999.1.1.1"], EXIT_INVALID_INPUT, "numeric"),
        case("san-url", ["issue", "ok.qemu.test", "--san", "http://x.qemu.test"], EXIT_INVALID_INPUT, "path"),
        case("san-email", ["issue", "ok.qemu.test", "--san", "root@x.qemu.test"], EXIT_INVALID_INPUT, "letters"),
        case("san-sign", ["sign", f["good.csr"], "--san", "a\u200bb.qemu.test"], EXIT_INVALID_INPUT, "invisible"),
        case("san-enroll", ["enroll", "a.qemu.test", "--san", "*.x.qemu.test"], EXIT_INVALID_INPUT, "wildcard"),
        # ---- files for inspect
        case("inspect-random", ["inspect", f["random.bin"]], EXIT_INVALID_INPUT, "no PEM block"),
        case("inspect-2MiB", ["inspect", f["big.pem"]], EXIT_INVALID_INPUT, "larger than 1 MiB"),
        case("inspect-bad-base64", ["inspect", f["badb64.pem"]], EXIT_INVALID_INPUT, "corrupt"),
        case("inspect-empty", ["inspect", f["empty.pem"]], EXIT_INVALID_INPUT, "no PEM block"),
        case("inspect-truncated", ["inspect", f["truncated.pem"]], EXIT_INVALID_INPUT, "no PEM block"),
        case("inspect-truncated-body", ["inspect", f["truncated.csr"]], EXIT_INVALID_INPUT, "corrupt"),
        case("inspect-directory", ["inspect", f["dir"]], EXIT_USAGE, "is a directory"),
        case("inspect-fifo", ["inspect", f["fifo"]], EXIT_INVALID_INPUT, "not a regular file"),
        case("inspect-dev-zero", ["inspect", "/dev/zero"], EXIT_INVALID_INPUT, "not a regular file"),
        case("inspect-dsa-params", ["inspect", f["dsaparams.pem"]], EXIT_INVALID_INPUT, "DSA PARAMETERS"),
        case("inspect-public-key", ["inspect", f["pubkey.pem"]], EXIT_INVALID_INPUT, "PUBLIC KEY"),
        case("inspect-openssh-garbage", ["inspect", f["openssh.pem"]], EXIT_INVALID_INPUT, "corrupt"),
        case("inspect-csr-bad-version", ["inspect", f["v5.csr"]], EXIT_INVALID_INPUT, "corrupt"),
        case("inspect-csr-bitstring-cn", ["inspect", f["bitcn.csr"]], EXIT_INVALID_INPUT, "corrupt"),
        case("inspect-newline-in-path", ["inspect", f["newline\nname.pem"]], EXIT_INVALID_INPUT, "no PEM block"),
        # ---- files for sign
        case("sign-a-key", ["sign", f["key.pem"]], EXIT_INVALID_INPUT, "certificate signing request"),
        case("sign-a-crl", ["sign", f["crl.pem"]], EXIT_INVALID_INPUT, "certificate signing request"),
        case("sign-random", ["sign", f["random.bin"]], EXIT_INVALID_INPUT, "certificate signing request"),
        case("sign-2MiB", ["sign", f["big.pem"]], EXIT_INVALID_INPUT, "larger than 1 MiB"),
        case("sign-bad-base64", ["sign", f["badb64.csr"]], EXIT_INVALID_INPUT, "certificate signing request"),
        case("sign-empty", ["sign", f["empty.pem"]], EXIT_INVALID_INPUT, "certificate signing request"),
        case("sign-truncated", ["sign", f["truncated.csr"]], EXIT_INVALID_INPUT, "certificate signing request"),
        case("sign-directory", ["sign", f["dir"]], EXIT_USAGE, "is a directory"),
        case("sign-fifo", ["sign", f["fifo"]], EXIT_INVALID_INPUT, "not a regular file"),
        case("sign-dev-zero", ["sign", "/dev/zero"], EXIT_INVALID_INPUT, "not a regular file"),
        case("sign-bad-signature", ["sign", f["tampered.csr"]], EXIT_INVALID_INPUT, "signature"),
        case("sign-rsa-1024", ["sign", f["rsa1024.csr"]], EXIT_INVALID_INPUT, "1024"),
        case("sign-p521", ["sign", f["p521.csr"]], EXIT_INVALID_INPUT, "secp521r1"),
        case("sign-ed25519", ["sign", f["ed25519.csr"]], EXIT_INVALID_INPUT, "Ed25519"),
        case("sign-ed448", ["sign", f["ed448.csr"]], EXIT_INVALID_INPUT, "Ed448"),
        case("sign-dsa", ["sign", f["dsa.csr"]], EXIT_INVALID_INPUT, "DSA"),
        case("sign-out-missing-dir", ["sign", f["good.csr"], "--out", out / "nodir" / "c.pem"], EXIT_IO,
             "no such directory"),
        case("sign-out-directory", ["sign", f["good.csr"], "--out", f["dir"]], EXIT_USAGE, "is a directory"),
        # ---- passphrases (the protected store)
        case("pass-wrong", ["issue", "b.qemu.test", "--passphrase-file", f["pass-wrong"]], EXIT_PASSPHRASE,
             "wrong passphrase", home="enc"),
        case("pass-missing", ["issue", "b.qemu.test", "--passphrase-file", f["dir"] / "none"], EXIT_PASSPHRASE,
             "does not exist", home="enc"),
        case("pass-world-readable", ["issue", "b.qemu.test", "--passphrase-file", f["pass-world"]],
             EXIT_PASSPHRASE, "chmod 600", home="enc"),
        case("pass-group-readable", ["sign", f["good.csr"], "--passphrase-file", f["pass-group"]],
             EXIT_PASSPHRASE, "chmod 600", home="enc"),
        case("pass-empty", ["issue", "b.qemu.test", "--passphrase-file", f["pass-empty"]], EXIT_PASSPHRASE,
             "empty", home="enc"),
        case("pass-first-line-empty", ["revoke", "a.qemu.test", "--passphrase-file", f["pass-first-line-empty"]],
             EXIT_PASSPHRASE, "empty", home="enc"),
        case("pass-directory", ["crl", "--passphrase-file", f["pass-dir"]], EXIT_PASSPHRASE, "directory",
             home="enc"),
        case("pass-fifo", ["issue", "b.qemu.test", "--passphrase-file", f["fifo"]], EXIT_PASSPHRASE,
             "not a regular file", home="enc"),
        case("pass-dev-zero", ["issue", "b.qemu.test", "--passphrase-file", "/dev/zero"], EXIT_PASSPHRASE,
             "passphrase file", home="enc"),
        case("pass-none-no-terminal", ["issue", "b.qemu.test"], EXIT_PASSPHRASE, "no terminal", home="enc"),
        case("pass-env-world-readable", ["crl"], EXIT_PASSPHRASE, "chmod 600", home="enc",
             env={"QEMUCA_PASSPHRASE_FILE": str(f["pass-world"])}),
        # ---- init (the home must not be created)
        case("init-pass-fifo", ["init", "--passphrase-file", f["fifo"]], EXIT_PASSPHRASE, "not a regular file",
             home="fresh"),
        case("init-pass-empty", ["init", "--passphrase-file", f["pass-empty"]], EXIT_PASSPHRASE, "empty",
             home="fresh"),
        case("init-pass-and-no-pass", ["init", "--passphrase-file", f["pass-good"], "--no-passphrase"],
             EXIT_INVALID_INPUT, "exclude", home="fresh"),
        case("init-cn-65", ["init", "--no-passphrase", "--cn", long_cn], EXIT_INVALID_INPUT, "1 to 64",
             home="fresh"),
        case("init-cn-control", ["init", "--no-passphrase", "--cn", "CA\x1b[31m"], EXIT_INVALID_INPUT,
             "control", home="fresh"),
        case("init-cn-empty", ["init", "--no-passphrase", "--cn", " "], EXIT_INVALID_INPUT, "1 to 64",
             home="fresh"),
        case("init-org-65", ["init", "--no-passphrase", "--org", long_cn], EXIT_INVALID_INPUT, "1 to 64",
             home="fresh"),
        case("init-key-type", ["init", "--no-passphrase", "--key-type", "dsa"], EXIT_USAGE, "--key-type",
             home="fresh"),
        case("init-over-a-ca", ["init", "--no-passphrase"], EXIT_CONFLICT, "--force"),
        # ---- qemu.conf (the file must stay as it was)
        *[case(f"qemu-conf-{name}", ["qemu-conf", "apply", "--file", f["conf-" + name]], EXIT_INVALID_INPUT,
               needle)
          for name, needle in [("no-value", ":1:"), ("unterminated-string", "unterminated"),
                               ("unterminated-list", ":2:"), ("no-name", "expecting a name"),
                               ("two-on-a-line", "expecting"), ("binary", ":1:")]],
        case("qemu-conf-remove-syntax", ["qemu-conf", "remove", "--file", f["conf-no-name"]], EXIT_INVALID_INPUT,
             "expecting a name"),
        case("qemu-conf-show-syntax", ["qemu-conf", "show", "--file", f["conf-unterminated-string"]],
             EXIT_INVALID_INPUT, "unterminated"),
        case("qemu-conf-show-bad-verify", ["qemu-conf", "show", "--file", f["conf-bad-verify"]],
             EXIT_INVALID_INPUT, "must be 0 or 1"),
        case("qemu-conf-directory", ["qemu-conf", "apply", "--file", f["dir"]], EXIT_INVALID_INPUT,
             "not a regular file"),
        case("qemu-conf-fifo", ["qemu-conf", "apply", "--file", f["fifo"]], EXIT_INVALID_INPUT,
             "not a regular file"),
        case("qemu-conf-relative-cert-dir", ["qemu-conf", "apply", "--file", f["conf-binary"].parent / "new.conf",
                                             "--cert-dir", "pki/qemu"], EXIT_INVALID_INPUT, "absolute"),
        case("qemu-conf-quote-in-cert-dir", ["qemu-conf", "apply", "--file", f["conf-binary"].parent / "new.conf",
                                             "--cert-dir", '/etc/pki/qemu"\nuser = "root'], EXIT_INVALID_INPUT,
             "quotes"),
        case("qemu-conf-missing-dir", ["qemu-conf", "apply", "--file", f["dir"] / "none" / "qemu.conf"],
             EXIT_NOT_FOUND, "does not exist"),
        # ---- hosts files and inventories
        case("hosts-binary", ["issue", "--hosts-file", f["hosts-binary"]], EXIT_INVALID_INPUT, "not UTF-8"),
        case("hosts-escape", ["issue", "--hosts-file", f["hosts-escape"]], EXIT_INVALID_INPUT, "control"),
        case("hosts-spaces", ["issue", "--hosts-file", f["hosts-spaces"]], EXIT_INVALID_INPUT, "bad name"),
        case("hosts-fifo", ["issue", "--hosts-file", f["fifo"]], EXIT_INVALID_INPUT, "not a regular file"),
        case("hosts-dev-zero", ["issue", "--hosts-file", "/dev/zero"], EXIT_INVALID_INPUT, "not a regular file"),
        case("hosts-directory", ["issue", "--hosts-file", f["dir"]], EXIT_USAGE, "is a directory"),
        case("inventory-letter-range", ["deploy", "--inventory", f["inv-letters"]], EXIT_INVALID_INPUT,
             "bad range"),
        case("inventory-huge-range", ["deploy", "--inventory", f["inv-huge"]], EXIT_INVALID_INPUT, "too many"),
        case("inventory-binary", ["enroll", "--inventory", f["inv-binary"]], EXIT_INVALID_INPUT, "binary"),
        case("inventory-bad-header", ["deploy", "--inventory", f["inv-header"]], EXIT_INVALID_INPUT, "brackets"),
        case("inventory-bad-port", ["deploy", "--inventory", f["inv-port"]], EXIT_INVALID_INPUT, "port"),
        case("inventory-bad-yaml", ["rollback", "--inventory", f["inv.yml"]], EXIT_INVALID_INPUT, "YAML"),
        case("inventory-fifo", ["deploy", "--inventory", f["fifo"]], EXIT_INVALID_INPUT, "not a regular file"),
        case("inventory-unknown-limit", ["deploy", "--inventory", f["inv-ok"], "--limit", "nope"],
             EXIT_INVALID_INPUT, "nope"),
        case("limit-without-inventory", ["deploy", "a.qemu.test", "--limit", "kvm"], EXIT_INVALID_INPUT,
             "--inventory"),
        case("deploy-relative-cert-dir", ["deploy", "a.qemu.test", "--cert-dir", "pki/qemu"], EXIT_INVALID_INPUT,
             "absolute"),
        # ---- options out of range, unknown commands and options
        case("issue-days-0", ["issue", "b.qemu.test", "--days", "0"], EXIT_USAGE, "--days"),
        case("issue-days-99999", ["issue", "b.qemu.test", "--days", "99999"], EXIT_USAGE, "--days"),
        case("deploy-parallel-0", ["deploy", "a.qemu.test", "--parallel", "0"], EXIT_USAGE, "--parallel"),
        case("check-warn-days-negative", ["check", "--warn-days", "-1"], EXIT_INVALID_INPUT, "--warn-days"),
        case("check-crit-above-warn", ["check", "--crit-days", "40"], EXIT_INVALID_INPUT, "--crit-days"),
        case("revoke-crl-days-0", ["revoke", "a.qemu.test", "--crl-days", "0"], EXIT_USAGE, "--crl-days"),
        case("crl-days-0", ["crl", "--days", "0"], EXIT_USAGE, "--days"),
        case("crl-out-missing-dir", ["crl", "--out", out / "nodir" / "crl.pem"], EXIT_IO, "no such directory"),
        case("export-no-dir", ["export", "a.qemu.test"], EXIT_USAGE, "--dir"),
        case("export-dir-is-a-file", ["export", "a.qemu.test", "--dir", f["random.bin"]], EXIT_USAGE, "is a file"),
        case("unknown-command", ["frobnicate"], EXIT_USAGE, "no such command"),
        case("unknown-command-escape", ["frob\x1b[31m"], EXIT_USAGE, "no such command", "\\x1b"),
        case("unknown-option", ["issue", "--bogus"], EXIT_USAGE, "no such option"),
        case("unknown-subcommand", ["qemu-conf", "frob"], EXIT_USAGE, "no such command"),
        case("missing-argument", ["show"], EXIT_USAGE, "missing argument"),
        case("home-without-value", ["--home"], EXIT_USAGE, "requires an argument"),
        case("show-escape", ["show", "\x1b[2J\x1b[Hx"], EXIT_NOT_FOUND, "\\x1b"),
        case("show-cr", ["show", "a\rb"], EXIT_NOT_FOUND, "a\\rb"),
    ]
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return cases


def _snapshot(root: Path) -> dict:
    """Every entry under root: bytes and mode of files, type and mode of the rest (a FIFO
    is never opened)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if stat.S_ISREG(st.st_mode):
            out[str(p)] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes())
        else:
            out[str(p)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode))
    return out


def _state(w) -> dict:
    return {"plain": snapshot_store(w["plain"]), "enc": snapshot_store(w["enc"]),
            "in": _snapshot(w["in"]), "conf": _snapshot(w["conf"]), "out": _snapshot(w["out"]),
            "fresh": sorted(os.listdir(w["fresh"]))}


def _run(w, index: int, c: Case):
    home = w["fresh"] / f"home{index}" if c.home == "fresh" else w[c.home]
    try:
        return run_qemuca(home, *c.args, env=c.env, timeout=CASE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return None


def _problem(c: Case, proc) -> Optional[str]:
    """Why a run is not the documented failure, or None."""
    if proc is None:
        return f"blocked for {CASE_TIMEOUT} s"
    try:
        line = assert_error(proc, c.code, *c.needles)
    except AssertionError as e:
        return str(e)
    if proc.stdout:
        return f"printed on stdout: {proc.stdout!r}"
    bad = [ch for ch in line if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs")]
    if bad:
        return f"control or invisible characters {bad!r} in {line!r}"
    return None


def test_hostile_inputs_fail_cleanly_and_write_nothing(world, capsys):
    cases = catalog(world)
    before = _state(world)
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 2))) as pool:
        results = list(pool.map(lambda ic: _run(world, *ic), enumerate(cases)))
    problems = [f"{c.id}: {why}" for c, p in zip(cases, results) if (why := _problem(c, p))]
    tracebacks = sum(1 for p in results if p is not None and "Traceback" in p.stdout + p.stderr)
    with capsys.disabled():
        print(f"\n{len(cases)} bad inputs tried, {tracebacks} tracebacks, {len(problems)} not as documented")
    assert not problems, "\n".join(problems)
    assert _state(world) == before, "a failing command changed a store, an input or a target file"
    assert len(cases) >= 60


def test_inspect_flags_what_sign_refuses_and_escapes_hostile_names(world):
    """Not errors but findings: a weak or tampered CSR fails inspect (exit 1) as a
    non-conforming certificate does; a certificate whose subject holds terminal escapes
    is shown with them escaped."""
    f = world["files"]
    key = ec.generate_private_key(ec.SECP256R1())
    valid = x509.load_pem_x509_certificate(f["cert.pem"].read_bytes())
    hostile = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a\x1b[2J\u202eb")]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(valid.not_valid_before_utc).not_valid_after(valid.not_valid_after_utc)
               .sign(key, hashes.SHA256()))
    hostile_path = _write(world["base"] / "hostile-subject.pem", hostile.public_bytes(serialization.Encoding.PEM))
    paths = [f["rsa1024.csr"], f["tampered.csr"], f["dsa.csr"], hostile_path, hostile_path, f["good.csr"]]
    flags = [["--json"], ["--json"], [], [], ["--json"], []]
    procs = [run_qemuca(world["plain"], "inspect", p, *x) for p, x in zip(paths, flags)]
    for proc in procs[:5]:
        assert proc.returncode == EXIT_FAILED, proc
        assert "Traceback" not in proc.stderr and proc.stderr == ""
    assert procs[5].returncode == 0
    for proc in procs[3:5]:
        assert "\x1b" not in proc.stdout and "\u202e" not in proc.stdout
        assert "\\x1b[2J" in proc.stdout.replace("\\\\", "\\")


def test_sign_refuses_csrs_cryptography_cannot_fully_parse(world):
    f = world["files"]
    before = snapshot_store(world["plain"])
    procs = [run_qemuca(world["plain"], "sign", f[name]) for name in ("v5.csr", "bitcn.csr")]
    assert snapshot_store(world["plain"]) == before
    for proc in procs:
        assert_error(proc, EXIT_INVALID_INPUT)


def test_rollover_refuses_bad_ca_names(tmp_path):
    home = make_store(tmp_path, hosts=["a.qemu.test"])
    before = snapshot_store(home)
    for cn in ("c" * 65, "CA\x1b[31m"):
        assert_error(run_qemuca(home, "ca", "rollover", "start", "--cn", cn, "--key-type", "ecdsa-p256"),
                     EXIT_INVALID_INPUT, "--cn")
        assert snapshot_store(home) == before
