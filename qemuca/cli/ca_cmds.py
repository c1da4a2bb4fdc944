"""Commands that change the CA store: init, issue, sign, revoke, crl."""

from __future__ import annotations

import errno
import os
import sys

import click
from cryptography import x509

from qemuca.cli.options import (
    days_option,
    hosts_file_option,
    hosts_from,
    key_type_option,
    passphrase_file_option,
    passphrase_source,
    read_passphrase,
    typed_options,
)
from qemuca.cli.output import emit_json, json_option, note, print_table
from qemuca.errors import InvalidInput, PassphraseError
from qemuca.hosts.fs import LocalFS, read_user_file
from qemuca.names import subject_text
from qemuca.pki import ca, profile
from qemuca.pki.certinfo import MAX_PEM
from qemuca.pki.checks import is_encrypted_pem
from qemuca.pki.import_ca import load_foreign_ca


def _open_ca(app, passphrase_file):
    return ca.CertificateAuthority(app.store(), passphrase_source(passphrase_file))


def _check_out(out):
    """Refuse an --out whose directory is missing or not writable, before any change."""
    if not out:
        return
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise OSError(errno.ENOENT, "no such directory", parent)
    if not os.access(parent, os.W_OK):
        raise OSError(errno.EACCES, "directory not writable", parent)


def _write_out(out, data: bytes):

    path = os.path.abspath(out)
    try:
        LocalFS().write_atomic(path, data, 0o644)
    except OSError as e:  # name the file asked for, not the temp file beside it
        raise OSError(e.errno, e.strerror, path) from None


@click.command("init")
@click.option("--cn", "common_name", help="CA common name [default: 'QEMU CA <this host's FQDN>'].")
@click.option("--org", "organization", help="Organisation (O) of the CA subject.")
@key_type_option("Type of the CA key.", default=profile.DEFAULT_CA_KEY_TYPE)
@days_option("Validity of the CA in days.", default=profile.DEFAULT_CA_DAYS)
@passphrase_file_option
@click.option("--no-passphrase", is_flag=True,
              help="Store the CA key unencrypted (protected by file mode 0600 only).")
@click.option("--force", is_flag=True,
              help="Replace an existing CA; the old CA and index are kept in HOME/retired/.")
@click.option("--import-cert", type=click.Path(dir_okay=False), metavar="FILE",
              help="Take over an existing CA: its certificate (PEM), e.g. oVirt's qemu-ca.pem.")
@click.option("--import-key", type=click.Path(dir_okay=False), metavar="FILE",
              help="With --import-cert: the CA's private key (PEM, maybe encrypted).")
@click.option("--import-passphrase-file", type=click.Path(dir_okay=False), metavar="FILE",
              help="With --import-key: file whose first line decrypts the imported key "
                   "(mode 0600) [default: asked on the terminal when the key is encrypted].")
@json_option
@click.pass_obj
def init_cmd(app, common_name, organization, key_type, days, passphrase_file, no_passphrase,
             force, import_cert, import_key, import_passphrase_file, as_json):
    """Create the dedicated QEMU CA in the store (HOME, see qemuca --help).

    The CA signs QEMU's certificates only (OU=qemu): keep it apart from the CA of
    libvirt and your management daemons, so a compromised QEMU process can never
    authenticate to them. The key is encrypted with a passphrase unless
    --no-passphrase is given: from --passphrase-file, QEMUCA_PASSPHRASE_FILE, or
    asked twice on the terminal.

    --import-cert/--import-key take over a CA you already have (oVirt's QEMU CA, one
    made with certtool per libvirt's TLS guide): it must be a CA (CA:TRUE), able to
    sign (keyCertSign), valid now, and the key must be its own. Its key is then stored
    like a new one (encrypted with the store's passphrase), and the audit log records
    where it came from. Hosts holding its certificates can then be adopted.
    """

    subject_text("--cn", common_name)  # before anything is made: the CA's name is final
    subject_text("--org", organization)
    imported = _imported_ca(import_cert, import_key, import_passphrase_file)
    if no_passphrase and passphrase_file:
        source = click.get_current_context().get_parameter_source("passphrase_file")
        if source != click.core.ParameterSource.ENVIRONMENT:
            raise InvalidInput("--no-passphrase and --passphrase-file exclude each other")
        passphrase_file = None  # an explicit --no-passphrase wins over QEMUCA_PASSPHRASE_FILE
    passphrase = None
    if passphrase_file:
        passphrase = read_passphrase(passphrase_file)
    elif not no_passphrase:
        if not sys.stdin.isatty():
            raise PassphraseError("no terminal to ask for a passphrase: give --passphrase-file, "
                                  "QEMUCA_PASSPHRASE_FILE or --no-passphrase")
        passphrase = click.prompt("New CA key passphrase", hide_input=True,
                                  confirmation_prompt=True, err=True).encode()
    store = ca.init_ca(app.home, common_name=common_name or ca.default_ca_common_name(),
                       organization=organization, key_type=key_type, days=days,
                       passphrase=passphrase, force=force, imported=imported)
    authority = ca.CertificateAuthority(store)
    info = {
        "home": store.home,
        "subject": authority.cert.subject.rfc4514_string(),
        "fingerprint_sha256": authority.fingerprint,
        "not_after": authority.cert.not_valid_after_utc.isoformat(),
        "key_type": authority.key_type,
        "key_encrypted": passphrase is not None,
        "imported": imported is not None,
    }
    if as_json:
        emit_json(info)
    else:
        note(f"{'Took over' if imported else 'Created'} QEMU CA '{info['subject']}' in {store.home}")
        note(f"  SHA-256 fingerprint {authority.fingerprint}")
        note(f"  valid until {info['not_after']}; key {'encrypted' if passphrase else 'NOT encrypted'}")
        if passphrase is None:
            note(f"  warning: without a passphrase, {store.home} holds the CA key and every host key "
                 "qemuca makes (issue, deploy --issue) unencrypted: whoever reads it can sign "
                 "certificates and pose as any such host. Keep it on an encrypted disk, or use "
                 "'enroll' (keys made on the hosts, never stored here).")


def _imported_ca(cert_file, key_file, passphrase_file):
    """The CA that --import-cert/--import-key name, checked; None without them."""

    if not cert_file and not key_file:
        if passphrase_file:
            raise InvalidInput("--import-passphrase-file goes with --import-key")
        return None
    if not (cert_file and key_file):
        raise InvalidInput("--import-cert and --import-key go together")
    given = typed_options("common_name", "organization", "key_type", "days")
    if given:
        raise InvalidInput(f"{', '.join(given)} describe a new CA: an imported "
                           "CA keeps its own name, key and validity")
    cert_data = read_user_file(cert_file, "CA certificate", MAX_PEM)
    key_data = read_user_file(key_file, "CA key", MAX_PEM)
    secret = None
    if is_encrypted_pem(key_data):
        if passphrase_file:
            secret = read_passphrase(passphrase_file)
        elif sys.stdin.isatty():
            secret = click.prompt(f"Passphrase of {key_file}", hide_input=True, err=True).encode()
        else:
            raise PassphraseError(f"{key_file} is encrypted and there is no terminal to ask: "
                                  "give --import-passphrase-file")
    cert, key = load_foreign_ca(cert_data, cert_file, key_data, key_file, secret)
    return ca.ImportedCA(cert, key, os.path.abspath(cert_file), os.path.abspath(key_file))


def _issued_rows(issued):
    return [(i.record.host, i.record.serial, i.record.not_after, i.record.fingerprint_sha256[:16],
             i.replaced or "") for i in issued]


def _render_issued(issued, as_json):
    if as_json:
        emit_json([dict(i.record.as_dict(), replaced=i.replaced) for i in issued])
    else:
        print_table(f"Issued {len(issued)} certificate(s)",
                    ["host", "serial", "not after", "fingerprint (SHA-256)", "replaces"],
                    _issued_rows(issued))


@click.command("issue")
@click.argument("hosts", nargs=-1)
@hosts_file_option
@click.option("--san", "sans", multiple=True, metavar="NAME_OR_IP",
              help="Extra subjectAltName for every host issued (DNS name or IP; repeatable).")
@days_option()
@key_type_option("Type of the host key generated here.")
@click.option("--force", is_flag=True, help="Replace a host's valid certificate (it becomes superseded).")
@passphrase_file_option
@json_option
@click.pass_obj
def issue_cmd(app, hosts, hosts_file, sans, days, key_type, force, passphrase_file, as_json):
    """Issue a QEMU certificate for each HOST, with a key generated here.

    Each certificate names the host (CN and dNSName SAN = HOST, which QEMU's
    migration source checks against the destination) and serves QEMU as both
    migration server and client. For keys that never leave the host, use
    'qemuca sign' with a CSR (or 'qemuca enroll').
    """
    authority = _open_ca(app, passphrase_file)
    issued = authority.issue(hosts_from(hosts, hosts_file), sans, days or profile.DEFAULT_HOST_DAYS,
                             key_type, force)
    _render_issued(issued, as_json)


@click.command("sign")
@click.argument("csr_file", type=click.Path(dir_okay=False))
@click.option("--host", help="Host name to certify [default: the CSR's CN].")
@click.option("--san", "sans", multiple=True, metavar="NAME_OR_IP",
              help="Extra subjectAltName (DNS name or IP; repeatable).")
@days_option()
@click.option("--force", is_flag=True, help="Replace the host's valid certificate.")
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the certificate to FILE.")
@passphrase_file_option
@json_option
@click.pass_obj
def sign_cmd(app, csr_file, host, sans, days, force, out, passphrase_file, as_json):
    """Sign CSR_FILE (PEM or DER) made on a host, so its key never leaves it.

    The CSR's signature must verify and its key be RSA >= 2048, P-256 or P-384.
    Extensions requested in the CSR are ignored: the QEMU profile decides them.
    The certificate is printed (PEM) unless --json or --out is given.
    """

    data = read_user_file(csr_file, "CSR file", MAX_PEM)
    _check_out(out)  # before signing: a bad --out must not leave a recorded certificate behind
    issued = _open_ca(app, passphrase_file).sign(data, host, sans, days or profile.DEFAULT_HOST_DAYS, force)
    if out:
        _write_out(out, issued.record.cert_pem.encode())
    if as_json:
        emit_json(dict(issued.record.as_dict(with_pem=True), replaced=issued.replaced))
    elif not out:
        click.echo(issued.record.cert_pem, nl=False)
    else:
        _render_issued([issued], False)


@click.command("revoke")
@click.argument("host_or_serial")
@click.option("--reason", default="unspecified", show_default=True,
              type=click.Choice(["unspecified", "key-compromise", "ca-compromise",
                                 "affiliation-changed", "superseded", "cessation-of-operation",
                                 "privilege-withdrawn"]))
@click.option("--crl-days", type=click.IntRange(1, 3650), default=30, show_default=True,
              help="Next update of the CRL written after revoking.")
@passphrase_file_option
@json_option
@click.pass_obj
def revoke_cmd(app, host_or_serial, reason, crl_days, passphrase_file, as_json):
    """Revoke the current certificate of a host (or the certificate with a serial).

    The CRL is re-signed at once (HOME/crl.pem); hosts only learn of it once it is
    deployed as ca-crl.pem. Note QEMU reads ca-crl.pem only on the migration
    DESTINATION: a revoked host can no longer send migrations to hosts holding the
    CRL, but can still receive one it is sent. To cut it off completely, roll the
    CA over without it.
    """
    record = _open_ca(app, passphrase_file).revoke(host_or_serial, reason, crl_days)
    if as_json:
        emit_json(record.as_dict())
    else:
        note(f"Revoked {record.host} (serial {record.serial}, reason {reason}); CRL updated.")
        note("Deploy the CRL to every host (ca-crl.pem). QEMU checks it only on the destination side:")
        note(f"{record.host} can still RECEIVE migrations until the CA is rolled over without it.")


@click.command("crl")
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the CRL to FILE.")
@days_option("Days until the CRL's next update.", default=30, maximum=3650)
@passphrase_file_option
@json_option
@click.pass_obj
def crl_cmd(app, out, days, passphrase_file, as_json):
    """Sign a fresh CRL of every revoked certificate (HOME/crl.pem).

    Re-run before the next update date and redeploy it: a CRL past its next update
    is reported by 'qemuca verify'. Prints the PEM unless --out or --json is given.
    """

    _check_out(out)  # before signing: a bad --out must not change the store
    pem = _open_ca(app, passphrase_file).write_crl(days)
    if out:
        _write_out(out, pem)
    crl = x509.load_pem_x509_crl(pem)
    if as_json:
        emit_json({"path": app.store().crl_path, "revoked": len(crl),
                   "last_update": crl.last_update_utc.isoformat(),
                   "next_update": crl.next_update_utc.isoformat(), "pem": pem.decode()})
    elif out:
        note(f"Wrote CRL ({len(crl)} revoked, next update {crl.next_update_utc.isoformat()}) to {out}")
    else:
        click.echo(pem.decode(), nl=False)
