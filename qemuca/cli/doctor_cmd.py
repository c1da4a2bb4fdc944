"""`qemuca doctor`: check the store's integrity; --repair removes leftovers only."""

from __future__ import annotations

import click

from qemuca.cli.options import passphrase_file_option
from qemuca.cli.output import RESULT_STYLE, console, emit_json, json_option, note, print_checks
from qemuca.pki import ca
from qemuca.store import doctor


@click.command("doctor")
@click.option("--repair", is_flag=True,
              help="First remove the leftovers of interrupted commands (.ca-new-* staging "
                   "directories, .*.qemuca-tmp-* temp files); nothing else is changed.")
@click.option("--strict", is_flag=True, help="Warnings fail too (exit 1).")
@passphrase_file_option
@json_option
@click.pass_obj
def doctor_cmd(app, repair, strict, passphrase_file, as_json):
    """Check the store's integrity: the index, the certificates, the CA files, the CRL.

    \b
    - SQLite integrity_check and foreign_key_check, the schema version;
    - each certificate row: the PEM parses and matches the row (serial, fingerprint,
      validity, host, SANs), it chains to a CA of this store (current, previous during
      a rollover, or one kept in retired/), the key held here matches it, its audit row
      exists; at most one valid certificate per host; 'replaces' points at a row;
      revoked rows have revoked_at;
    - the CA key: mode 0600 and matching the CA certificate (an encrypted key only
      with --passphrase-file); the store directory 0700, the index 0600;
    - crl.pem: parses, signed by a trusted CA, lists every revoked certificate;
    - leftovers of interrupted commands (warnings; --repair removes them).

    Exit 0 when nothing fails (warnings too unless --strict), 1 when something does.
    A command killed half-way is undone when the store is next opened (by any
    command); doctor reports what was put back.
    """

    passphrase = ca.read_passphrase_file(passphrase_file) if passphrase_file else None
    removed = doctor.repair(app.home) if repair else []
    report = doctor.diagnose(app.home, passphrase)
    report.removed = removed
    if as_json:
        emit_json(report.as_dict())
    else:
        for path in removed:
            note(f"removed {path}")
        _print(report)
    return 1 if report.failed(strict) else 0


def _print(report) -> None:
    print_checks(f"Store {report.home}", report.result, report.findings)
    counts = {r: sum(1 for f in report.findings if f.result == r) for r in RESULT_STYLE}
    console().print(f"{report.result.upper()}: " + ", ".join(f"{n} {r}" for r, n in counts.items() if n))
