"""qemuca export: a host's credential set into a local directory."""

from __future__ import annotations

import os

import click

from qemuca.cli.options import passphrase_file_option, passphrase_source
from qemuca.cli.output import emit_json, json_option, note
from qemuca.hosts import install
from qemuca.hosts.fs import LocalFS
from qemuca.hosts.layout import EXPORT_MODES
from qemuca.pki import ca


@click.command("export")
@click.argument("host")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False),
              help="Directory to write the QEMU layout into (created 0755 if missing).")
@click.option("--force", is_flag=True,
              help="Replace layout files qemuca did not write (they are kept for rollback).")
@passphrase_file_option
@json_option
@click.pass_obj
def export_cmd(app, host, directory, force, passphrase_file, as_json):
    """Write HOST's QEMU credentials into a directory, the layout QEMU reads.

    ca-cert.pem (the CA bundle), server-cert.pem, server-key.pem, client-cert.pem,
    client-key.pem (the same certificate and key: one certificate serves QEMU as
    migration destination and source) and ca-crl.pem when anything is revoked.
    Keys are 0600. The key is kept in the store encrypted under the CA's passphrase,
    so exporting it asks for that passphrase (a store made with --no-passphrase does
    not). The names are links into a hidden .qemuca/ set directory, so a
    new export switches every file at once; exporting the same set again changes
    nothing. Use it with QEMU's -object tls-creds-x509,dir=DIR.
    """

    store = app.store()
    authority = ca.CertificateAuthority(store, passphrase_source(passphrase_file))
    creds = ca.credential_set(store, authority, host)
    path = os.path.abspath(directory)
    result = install.install(LocalFS(), path, creds, EXPORT_MODES, force=force)
    info = {"host": creds.host, "dir": path, "result": "changed" if result.changed else "unchanged",
            "fingerprint_sha256": creds.fingerprint_sha256, "files": sorted(creds.files),
            "adopted": result.adopted}
    if as_json:
        emit_json(info)
    else:
        note(f"{creds.host}: {info['result']} in {path} ({', '.join(info['files'])})")
