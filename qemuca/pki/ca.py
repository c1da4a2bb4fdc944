"""The QEMU CA: create it, unlock its key, issue, sign, revoke and publish the CRL.

Knows nothing of the command line: passphrases arrive through a callable, so the
CLI can prompt while scripts pass a file, and the key is only unlocked when an
action really needs it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import os
import shutil
import socket
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from qemuca.errors import Conflict, InvalidInput, NotFound, PassphraseError, StoreError
from qemuca.hosts.fs import make_dirs
from qemuca.hosts.layout import CredentialSet
from qemuca.names import host_name, san_value
from qemuca.pki import profile
from qemuca.pki.certinfo import PARSE_ERRORS
from qemuca.pki.checks import fingerprint, is_encrypted_pem, key_matches
from qemuca.store.index import CertRecord, NewCert, Store, iso, parse_iso

PassphraseSource = Callable[[], bytes]

REVOCATION_REASONS = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key-compromise": x509.ReasonFlags.key_compromise,
    "ca-compromise": x509.ReasonFlags.ca_compromise,
    "affiliation-changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
    "privilege-withdrawn": x509.ReasonFlags.privilege_withdrawn,
}
DEFAULT_CRL_DAYS = 30


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def key_pem(key, passphrase: Optional[bytes] = None) -> str:
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             encryption).decode("ascii")


def read_passphrase_file(path: str) -> bytes:
    """The first line of a passphrase file that only its owner can read."""
    try:
        st = os.stat(path)
        if st.st_mode & 0o077:
            raise PassphraseError(f"passphrase file {path} is accessible by others "
                                  f"(mode {st.st_mode & 0o777:04o}); run: chmod 600 {path}")
        with open(path, "rb") as f:
            data = f.read(4096)
    except FileNotFoundError:
        raise PassphraseError(f"passphrase file {path} does not exist") from None
    except IsADirectoryError:
        raise PassphraseError(f"passphrase file {path} is a directory") from None
    except PermissionError:
        raise PassphraseError(f"passphrase file {path} is not readable") from None
    passphrase = data.split(b"\n", 1)[0].rstrip(b"\r")
    if not passphrase:
        raise PassphraseError(f"passphrase file {path} is empty")
    return passphrase


def default_ca_common_name() -> str:
    return f"QEMU CA {socket.getfqdn()}"


# ---------------------------------------------------------------- creation

@dataclass(frozen=True)
class ImportedCA:
    """An existing CA taken over by `init --import-cert/--import-key` (checked by
    pki.import_ca.load_foreign_ca) and where its files came from, for the audit log."""

    cert: x509.Certificate
    key: object
    cert_source: str
    key_source: str


def init_ca(home: str, *, common_name: str, organization: Optional[str], key_type: str,
            days: int, passphrase: Optional[bytes], force: bool,
            imported: Optional[ImportedCA] = None) -> Store:
    """Create the CA (or take over `imported`) and an empty index; an existing CA is set
    aside, never deleted. The key is stored encrypted with `passphrase` when given."""
    store = Store(home)
    if os.path.exists(store.ca_cert_path) and not force:
        raise Conflict(f"a CA already exists in {store.home} (use --force to set it aside "
                       "and create a new one)")
    if days < 1:
        raise InvalidInput("--days must be at least 1")
    origin = {}
    if imported is None:
        key = profile.generate_key(key_type)
        cert = profile.build_ca_certificate(key, profile.ca_name(common_name, organization), days)
    else:
        key, cert = imported.key, imported.cert
        key_type = key_type_name(cert.public_key())
        origin = {"imported_from": {"cert": imported.cert_source, "key": imported.key_source}}

    make_dirs(os.path.dirname(store.home), 0o755)
    _check_home_owner(store.home)
    make_dirs(store.home, 0o700)
    os.chmod(store.home, 0o700)
    _retire(store)
    staging = os.path.join(store.home, f".ca-new-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.mkdir(staging, 0o700)
    store.fs.write_atomic(os.path.join(staging, "ca-key.pem"), key_pem(key, passphrase).encode(), 0o600)
    store.fs.write_atomic(os.path.join(staging, "ca-cert.pem"), cert_pem(cert).encode(), 0o644)
    store.initialise_index()
    with store.write() as db:
        db.execute("INSERT OR REPLACE INTO meta VALUES ('ca_fingerprint', ?)", (fingerprint(cert),))
        store.audit(db, "init", cert.subject.rfc4514_string(), fingerprint_sha256=fingerprint(cert),
                    key_type=key_type, not_after=iso(cert.not_valid_after_utc),
                    encrypted=passphrase is not None, **origin)
    # The CA appears in one rename, after the index is ready: an interrupted init
    # leaves no half CA, only leftovers that the next init sets aside.
    os.rename(staging, store.ca_dir)
    return store


def _check_home_owner(home: str) -> None:
    """A home someone else owns is not ours to keep a CA key in: its owner could swap
    the files under us, or read what we write."""
    try:
        st = os.stat(home)
    except FileNotFoundError:
        return
    if st.st_uid != os.geteuid():
        raise InvalidInput(f"{home} is owned by uid {st.st_uid}, not by you (uid {os.geteuid()}): "
                           "choose a home of your own (--home)")


def _retire(store: Store) -> None:
    """Move an existing CA, index and CRL to retired/<time>/ (kept for recovery)."""
    names = ["ca", "ca-previous", "index.sqlite", "index.sqlite-wal", "index.sqlite-shm", "crl.pem"]
    present = [n for n in names if os.path.lexists(os.path.join(store.home, n))]
    if not present:
        return
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    target = os.path.join(store.home, "retired", stamp)
    make_dirs(target, 0o700)
    store.close()
    for name in present:
        os.rename(os.path.join(store.home, name), os.path.join(target, name))


# ---------------------------------------------------------------- the CA in use

@dataclass(frozen=True)
class Issued:
    record: CertRecord
    replaced: Optional[str]


class Signer:
    """One CA certificate and its key (unlocked on first use)."""

    def __init__(self, fs, cert_path: str, key_path: str, passphrase: Optional[PassphraseSource]):
        self.fs, self.cert_path, self.key_path = fs, cert_path, key_path
        self._passphrase = passphrase
        self._key = None
        self.password: Optional[bytes] = None  # what unlocked the key (None: not encrypted)
        try:
            self.cert = x509.load_pem_x509_certificate(fs.read_bytes(cert_path))
        except OSError as e:
            raise StoreError(f"CA certificate {cert_path} is unreadable: {e.strerror}") from None
        except ValueError:
            raise StoreError(f"CA certificate {cert_path} is corrupt (not a PEM certificate)") from None
        self.fingerprint = fingerprint(self.cert)

    @property
    def key(self):
        if self._key is None:
            self._key = self._load_key()
        return self._key

    def _load_key(self):
        path = self.key_path
        try:
            data = self.fs.read_bytes(path)
        except FileNotFoundError:
            raise StoreError(f"CA key {path} is missing (a CA taken over with 'ca rollover start --from-cert' "
                             "has none here: renew or rekey the hosts it issued rather than revoking "
                             "them)") from None
        except OSError as e:
            raise StoreError(f"CA key {path} is unreadable: {e.strerror}") from None
        encrypted = is_encrypted_pem(data)
        password = None
        if encrypted:
            if self._passphrase is None:
                raise PassphraseError("the CA key is encrypted: give --passphrase-file or "
                                      "QEMUCA_PASSPHRASE_FILE")
            password = self._passphrase()
        try:
            # Our own key, checked against the CA certificate below: OpenSSL's RSA
            # validation (primality of p and q) would cost ~150 ms per command.
            key = serialization.load_pem_private_key(data, password=password,
                                                     unsafe_skip_rsa_key_validation=True)
        except (ValueError, TypeError):
            if encrypted:
                raise PassphraseError("wrong passphrase for the CA key") from None
            raise StoreError(f"CA key {path} is corrupt") from None
        if not key_matches(key, self.cert):
            raise StoreError(f"CA key {path} does not match the CA certificate")
        self.password = password
        return key


class CertificateAuthority:
    """The signing CA, and during a rollover the previous one (still trusted, and
    still signing the CRL of the certificates it issued)."""

    def __init__(self, store: Store, passphrase: Optional[PassphraseSource] = None):
        self.store = store
        self._passphrase = passphrase
        self.current = Signer(store.fs, store.ca_cert_path, store.ca_key_path, passphrase)
        self.cert, self.fingerprint = self.current.cert, self.current.fingerprint
        self.previous: Optional[Signer] = None
        if os.path.exists(store.previous_ca_cert_path):
            self.previous = Signer(store.fs, store.previous_ca_cert_path, store.previous_ca_key_path,
                                   passphrase)

    @property
    def key(self):
        return self.current.key

    def unlock(self) -> None:
        """Open the signing key now (asking for the passphrase), so that a wrong one fails
        before any host is touched or any worker thread starts."""
        _ = self.key

    @property
    def key_type(self) -> str:
        return key_type_name(self.cert.public_key())

    def trusted(self) -> List[Signer]:
        """The CAs hosts must trust now: during a rollover both, newest first."""
        rollover = self.store.rollover()
        if self.previous is not None and (rollover or {}).get("stage") != "finishing":
            return [self.current, self.previous]
        return [self.current]

    def bundle(self) -> bytes:
        """What hosts get as ca-cert.pem."""
        return b"".join(cert_pem(s.cert).encode() for s in self.trusted())

    def crl_pem(self) -> Optional[bytes]:
        """The current CRL(s) when anything is revoked (what hosts get as ca-crl.pem)."""
        if not self.store.revoked():
            return None
        try:
            return self.store.fs.read_bytes(self.store.crl_path)
        except FileNotFoundError:
            raise StoreError("certificates are revoked but no CRL exists: run 'qemuca crl'") from None

    # -- issuing
    def issue(self, hosts: Sequence[str], sans: Sequence[str], days: int, key_type: str,
              force: bool) -> List[Issued]:
        """Issue one certificate per host with a key made here; one index transaction."""
        names = _unique_hosts(hosts)
        extra = [san_value(s) for s in sans]
        _check_days(days)
        if key_type not in profile.KEY_TYPES:
            raise InvalidInput(f"unknown key type '{key_type}'")
        if not force and extra and len(names) > 1:
            raise Conflict(f"--san applies to every host given: {len(names)} hosts would share "
                           f"{sans[0]} and each could pose as the others under it; issue them one by "
                           "one, or use --force")
        if not force:
            for name in names:
                current = self.store.valid_for_host(name)
                if current:
                    raise Conflict(f"{name} already has a valid certificate (serial "
                                   f"{current.serial}); use --force to replace it")
                self.check_names(name, extra)
        new = [self.make_cert(name, extra, days, profile.generate_key(key_type)) for name in names]
        replaced = self.store.add_certificates(new, force=force, action="issue")
        # The records as the index holds them, `replaces` included.
        return [Issued(dataclasses.replace(n.record, replaces=r), r) for n, r in zip(new, replaced)]

    def check_names(self, host: str, sans: Sequence) -> None:
        """Refuse a name another host's valid certificate holds: with it, this host could
        pose as that one and receive its guests (callers skip this with --force)."""
        wanted = {_name_key(n) for n in [host, *sans]}
        for other in self.store.valid():
            if other.host == host:
                continue
            clash = sorted(wanted & {_name_key(n) for n in [other.host, *other.sans]})
            if clash:
                raise Conflict(f"{clash[0]} is a name of {other.host} (serial {other.serial}): a certificate "
                               f"for {host} holding it could pose as {other.host}; revoke or reissue "
                               f"{other.host} first, or use --force if it no longer uses that name")

    def make_cert(self, host: str, sans: Sequence, days: int, key) -> NewCert:
        """A certificate for a key held here (new, or the same key on renewal), not recorded.
        The key goes to the index encrypted under the CA key's passphrase: stealing the
        store must not be enough to pose as a host (a store without one says so at init)."""
        cert = profile.build_host_certificate(self.cert, self.key, host, sans, key.public_key(), days)
        return NewCert(self.record_for(cert, host, "generated", key_type_name(key.public_key())),
                       key_pem(key, self.current.password))

    def host_key(self, serial: str):
        """The private key qemuca made for a certificate, or None (made on the host). An
        encrypted one is opened with the CA's passphrase (the same for both CAs of a
        rollover); keys stored by older versions, unencrypted, still load."""
        data = self.store.key_pem(serial)
        if data is None:
            return None
        password = None
        if is_encrypted_pem(data.encode()):
            self.unlock()
            password = self.current.password
        try:
            return serialization.load_pem_private_key(data.encode(), password)
        except (ValueError, TypeError):
            raise StoreError(f"the stored key of serial {serial} cannot be opened with the CA's "
                             "passphrase (changed since?)") from None

    def host_key_pem(self, serial: str) -> Optional[bytes]:
        """host_key() as the unencrypted PEM a host needs (QEMU reads keys without secret)."""
        key = self.host_key(serial)
        return None if key is None else key_pem(key).encode()

    def sign(self, csr_data: bytes, host: Optional[str], sans: Sequence[str], days: int,
             force: bool) -> Issued:
        """Sign a CSR made on the host; the profile, not the CSR, decides the extensions."""
        new = self.certify(csr_data, host, sans, days)
        if not force:
            self.check_names(new.record.host, new.record.sans)
        return self.record(new, force, "sign")

    def record(self, new: NewCert, force: bool, action: str) -> Issued:
        (replaced,) = self.store.add_certificates([new], force=force, action=action)
        return Issued(dataclasses.replace(new.record, replaces=replaced), replaced)

    def certify(self, csr_data: bytes, host: Optional[str], sans: Sequence[str], days: int) -> NewCert:
        """A certificate for a CSR, not yet recorded (enroll records it once deployed)."""
        csr = load_csr(csr_data)
        if host is None:
            cns = csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            if not cns:
                raise InvalidInput("the CSR has no CN: give the host name with --host")
            host = str(cns[0].value)
        name = host_name(host)
        extra = [san_value(s) for s in sans]
        _check_days(days)
        public = csr.public_key()
        cert = profile.build_host_certificate(self.cert, self.key, name, extra, public, days)
        return NewCert(self.record_for(cert, name, "csr", key_type_name(public)), None)

    def record_for(self, cert, host, key_source, key_type) -> CertRecord:
        """The index row of a certificate of this CA (not recorded)."""
        return CertRecord(
            serial=serial_hex(cert), host=host, sans=profile.sans_of(cert),
            not_before=iso(cert.not_valid_before_utc), not_after=iso(cert.not_valid_after_utc),
            fingerprint_sha256=fingerprint(cert), status="valid", replaces=None,
            issued_at=iso(profile.utcnow()), ca_fingerprint=self.fingerprint,
            key_source=key_source, key_type=key_type, cert_pem=cert_pem(cert))

    # -- revocation
    def revoke(self, host_or_serial: str, reason: str, crl_days: int = DEFAULT_CRL_DAYS) -> CertRecord:
        """Revoke and re-sign the CRL in one transaction: a process killed in between
        cannot leave a revoked certificate out of the CRL."""
        if reason not in REVOCATION_REASONS:
            raise InvalidInput(f"unknown reason '{reason}' (choose from {', '.join(REVOCATION_REASONS)})")
        _check_crl_days(crl_days)
        record = self.store.find(host_or_serial)
        self._unlock_crl_signers([record])  # first: a wrong passphrase must change nothing
        with self.store.write() as db:
            self.store.revoke_in(db, record.serial, reason, profile.utcnow())
            self._write_crl_in(db, crl_days)
        revoked = self.store.by_serial(record.serial)
        if revoked is None:  # the row was there inside the transaction
            raise StoreError(f"certificate {record.serial} vanished from the index")
        return revoked

    def write_crl(self, days: int = DEFAULT_CRL_DAYS) -> bytes:
        """Sign the CRL of every trusted CA and store them, concatenated, as crl.pem.

        The signing CA's CRL is always there (maybe empty); the previous CA's only
        when certificates it issued are revoked. QEMU (GnuTLS) reads every CRL in
        ca-crl.pem.
        """
        _check_crl_days(days)
        self._unlock_crl_signers([])
        with self.store.write() as db:
            return self._write_crl_in(db, days)

    def _crl_signers(self, revoked: Sequence[CertRecord]) -> List[Signer]:
        return [s for s in self.trusted()
                if s is self.current or any(r.ca_fingerprint == s.fingerprint for r in revoked)]

    def _unlock_crl_signers(self, extra: Sequence[CertRecord]) -> None:
        for signer in self._crl_signers(list(self.store.revoked()) + list(extra)):
            _ = signer.key  # unlock every key before the transaction

    def _write_crl_in(self, db, days: int) -> bytes:
        """The CRL of what the index holds now, read inside the caller's transaction, so
        that two processes revoking at once cannot leave one revocation out."""
        now = profile.utcnow()
        revoked = self.store.revoked()
        pems = []
        for signer in self._crl_signers(revoked):
            number = self.store.next_crl_number(db)
            mine = [r for r in revoked if r.ca_fingerprint == signer.fingerprint]
            pems.append(_crl(signer, mine, number, now, days))
        pem = b"".join(pems)
        self.store.publish_crl(db, pem)
        self.store.audit(db, "crl", None, crl_number=number, next_update=iso(now + dt.timedelta(days=days)),
                         revoked=len(revoked), issuers=len(pems))
        return pem


def _crl(signer: Signer, revoked: Sequence[CertRecord], number: int, now: dt.datetime, days: int) -> bytes:
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(signer.cert.subject)
               .last_update(now)
               .next_update(now + dt.timedelta(days=days))
               .add_extension(x509.CRLNumber(number), critical=False)
               .add_extension(profile.authority_key_id(signer.cert), critical=False))
    for rec in revoked:
        entry = (x509.RevokedCertificateBuilder()
                 .serial_number(int(rec.serial, 16))
                 .revocation_date(parse_iso(rec.revoked_at or "")))
        if rec.revocation_reason and rec.revocation_reason != "unspecified":
            entry = entry.add_extension(x509.CRLReason(REVOCATION_REASONS[rec.revocation_reason]),
                                        critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    crl = builder.sign(signer.key, profile.signature_hash(signer.key))
    return crl.public_bytes(serialization.Encoding.PEM)


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    blocks = data.count(b"-----BEGIN CERTIFICATE REQUEST-----") + data.count(
        b"-----BEGIN NEW CERTIFICATE REQUEST-----")
    if blocks > 1:
        raise InvalidInput(f"the file holds {blocks} certificate signing requests: give one per host")
    try:
        csr = (x509.load_pem_x509_csr(data) if b"-----BEGIN" in data
               else x509.load_der_x509_csr(data))
    except PARSE_ERRORS:
        raise InvalidInput("not a valid certificate signing request (PEM or DER)") from None
    try:
        valid = csr.is_signature_valid
        public = csr.public_key()
    except Exception:
        raise InvalidInput("the CSR uses an unsupported key or signature algorithm") from None
    if not valid:
        raise InvalidInput("the CSR's signature does not verify")
    try:
        csr.subject.rfc4514_string()
    except PARSE_ERRORS:
        raise InvalidInput("the CSR's subject is malformed") from None
    problem = profile.key_problem(public)
    if problem:
        raise InvalidInput(f"CSR refused: {problem}")
    return csr


def key_type_name(public) -> str:
    if isinstance(public, rsa.RSAPublicKey):
        return f"rsa{public.key_size}"
    if isinstance(public, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ecdsa-p256", "secp384r1": "ecdsa-p384"}[public.curve.name]
    raise InvalidInput("unsupported key type")


def _unique_hosts(hosts: Sequence[str]) -> List[str]:
    if not hosts:
        raise InvalidInput("no host given")
    names: List[str] = []
    for h in hosts:
        name = host_name(h)
        if name not in names:
            names.append(name)
    return names


def _check_crl_days(days: int) -> None:
    if days < 1:
        raise InvalidInput("the CRL's next update must be at least 1 day away")


def _check_days(days: int) -> None:
    if days < 1 or days > 36500:
        raise InvalidInput("--days must be between 1 and 36500")


def require_host(store: Store, host: str) -> CertRecord:
    record = store.valid_for_host(host_name(host))
    if record is None:
        raise NotFound(f"{host} has no valid certificate (issue one with 'qemuca issue {host}')")
    return record


def credential_set(store: Store, ca: CertificateAuthority, host: str):
    """The host's current credential set from the store, with the key qemuca made.

    Hosts enrolled with a CSR have no key here: their key never left the host.
    """
    record = require_host(store, host)
    key = ca.host_key_pem(record.serial)
    if key is None:
        raise NotFound(f"{record.host}'s key was generated on the host (CSR): qemuca has no "
                       "key to export; use 'qemuca enroll' or copy the certificate only")
    return CredentialSet.build(record.host, record.fingerprint_sha256, ca.bundle(),
                               record.cert_pem.encode(), key, ca.crl_pem())


def _name_key(name) -> str:
    """A SAN compared as GnuTLS matches it: DNS names case-insensitively, IPs by value."""
    text = str(name)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text.lower().rstrip(".")
