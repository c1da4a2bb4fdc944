"""`qemuca qemu-conf`: turn migration TLS on in libvirt's qemu.conf, undo it, show it."""

from __future__ import annotations

import os

import click

from qemuca.cli.options import cert_dir_option
from qemuca.cli.output import emit_json, json_option, note, print_fields
from qemuca.hosts import qemuconf
from qemuca.hosts.fs import LocalFS
from qemuca.text import printable_lines

RESTART_HINT = ("restart libvirt for this to take effect: systemctl try-restart virtqemud "
                "(modular daemons) or libvirtd (monolithic)")

file_option = click.option(
    "--file", "path", default=qemuconf.DEFAULT_PATH, show_default=True, type=click.Path(),
    help="The qemu.conf to edit.")


@click.group("qemu-conf")
def qemu_conf_group():
    """Edit libvirt's qemu.conf migration TLS settings.

    qemuca keeps its settings in one section between
    "## beginning of configuration section by qemuca" and
    "## end of configuration section by qemuca". libvirt uses the first
    occurrence of a key, so other active lines of the keys qemuca sets are
    disabled with a "#qemuca# " prefix; `remove` restores them byte for byte.
    Exit codes: 3 invalid input or syntax error, 4 not found, 10 local I/O.
    """


def _local_fs():

    return LocalFS()


def _report(edit: qemuconf.FileEdit, dry_run: bool, as_json: bool, **extra) -> None:
    diff = qemuconf.unified_diff(edit.before, edit.after, edit.path)
    restart = edit.changed and not dry_run
    if as_json:
        emit_json({"path": edit.path, "changed": edit.changed, "created": edit.created,
                   "written": edit.written, "backup": edit.backup, "dry_run": dry_run,
                   "restart_required": restart, **({"diff": diff} if dry_run else {}), **extra})
        return
    if dry_run:
        click.echo(printable_lines(diff), nl=False)
        note(f"dry run: {'would change' if edit.changed else 'unchanged'} {edit.path}; nothing written")
    elif not edit.changed:
        click.echo(f"unchanged: {edit.path}")
    else:
        done = "created" if edit.created else "updated"
        click.echo(f"{done}: {edit.path}" + (f" (previous content in {edit.backup})" if edit.backup else ""))
    if restart:
        note(RESTART_HINT)


@qemu_conf_group.command("apply")
@file_option
@cert_dir_option("Directory holding QEMU's TLS files (migrate_tls_x509_cert_dir).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="migrate_tls_x509_verify: the destination checks the source's client "
                   "certificate. --no-verify is insecure.")
@click.option("--force-tls/--no-force-tls", default=None,
              help="Set migrate_tls_force = 1 (libvirt >= 6.9): libvirt then REFUSES every "
                   "migration without --tls. --no-force-tls writes 0; by default the key is "
                   "left to the rest of the file.")
@click.option("--default-dir", is_flag=True,
              help="Also set default_tls_x509_cert_dir to --cert-dir (used by every TLS "
                   "service without its own directory).")
@click.option("--dry-run", is_flag=True, help="Print a unified diff; write nothing.")
@json_option
def apply_cmd(path, cert_dir, verify, force_tls, default_dir, dry_run, as_json):
    """Write the migration TLS settings into qemu.conf.

    Sets migrate_tls_x509_cert_dir and migrate_tls_x509_verify (and on request
    migrate_tls_force, default_tls_x509_cert_dir) in qemuca's section, and disables
    other lines of those keys. Applying the same options again changes nothing.
    The previous content is saved next to the file as FILE.qemuca-backup.
    """
    settings = qemuconf.TlsSettings(cert_dir, verify, force_tls, default_dir)
    settings.validate()
    if not verify:
        note("warning: migrate_tls_x509_verify = 0: destinations will accept migrations "
             "from clients without checking their certificate")
    edit = qemuconf.edit_file(_local_fs(), os.path.abspath(path),
                              lambda doc: qemuconf.apply_tls(doc, settings),
                              dry_run=dry_run, create=True)
    _report(edit, dry_run, as_json, settings=dict(settings.values()))


@qemu_conf_group.command("remove")
@file_option
@click.option("--dry-run", is_flag=True, help="Print a unified diff; write nothing.")
@json_option
def remove_cmd(path, dry_run, as_json):
    """Remove qemuca's section and restore the lines it disabled."""
    edit = qemuconf.edit_file(_local_fs(), os.path.abspath(path), qemuconf.remove_tls, dry_run=dry_run)
    _report(edit, dry_run, as_json)


@qemu_conf_group.command("show")
@file_option
@json_option
def show_cmd(path, as_json):
    """Show the migration TLS settings as libvirt resolves them, and where each comes from."""
    fs = _local_fs()
    doc = qemuconf.read_document(fs, os.path.abspath(path))

    def exists(p: str) -> bool:
        try:
            return fs.stat(p) is not None
        except OSError:
            return False

    tls = qemuconf.resolve_migration_tls(doc, exists)
    if as_json:
        emit_json({"path": doc.path, **tls.to_dict()})
        return
    yes_no = {True: "yes", False: "no"}
    section = f"lines {tls.section[0]}-{tls.section[1]}" if tls.section else "absent"
    print_fields(f"Migration TLS in {doc.path}", [
        ("cert dir", f"{tls.cert_dir.value}  ({tls.cert_dir.source})"),
        ("verify clients", f"{yes_no[tls.verify.value]}  ({tls.verify.source})"),
        ("force TLS", f"{yes_no[tls.force.value]}  ({tls.force.source})"),
        ("qemuca section", section),
    ])
    for w in tls.warnings:
        note(f"warning: {w}")
