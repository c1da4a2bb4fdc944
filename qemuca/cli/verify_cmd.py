"""`qemuca verify`: check hosts over SSH, this host (--local), or a migration pair (--pair)."""

from __future__ import annotations

import click

from qemuca.cli.options import cert_dir_option, group_option, qemu_conf_option
from qemuca.cli.output import emit_json, json_option, note, print_checks
from qemuca.cli.remote import connector, host_selection, parallel_option, run_with_progress, select_hosts, ssh_options
from qemuca.errors import NotFound
from qemuca.hosts.fs import LocalFS
from qemuca.hosts.runner import LocalRunner
from qemuca.names import host_name
from qemuca.ops import verify
from qemuca.ops.verify import Reference
from qemuca.ops.verify.report import DEFAULT_PORT, DEFAULT_WARN_DAYS
from qemuca.text import one_line


@click.command("verify")
@host_selection
@ssh_options
@click.option("--local", is_flag=True,
              help="Check this machine itself (for scripts on a hypervisor); needs no CA store.")
@click.option("--pair", nargs=2, metavar="SRC DST",
              help="Will an encrypted migration from SRC to DST work? (both over SSH)")
@click.option("--tls-destination", metavar="NAME",
              help="With --pair: the name the source checks [default: DST's hostname -f].")
@click.option("--handshake", is_flag=True,
              help="With --pair: also run a real TLS handshake between the hosts "
                   "(openssl s_server on DST, s_client on SRC).")
@click.option("--address", metavar="ADDR",
              help="With --handshake: where SRC connects to DST [default: NAME]; an IP is "
                   "also the address s_server binds, a name binds every address.")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True,
              help="With --handshake: the temporary TCP port on DST.")
@cert_dir_option("Where QEMU reads its credentials on the host(s).")
@qemu_conf_option("libvirt's QEMU driver configuration on the host(s).")
@group_option("Group that must own the files [default: the group libvirt runs QEMU as, found as "
              "deploy finds it].")
@click.option("--hostname", metavar="NAME",
              help="With --local: the name that must be in the SANs [default: hostname -f].")
@click.option("--warn-days", type=click.IntRange(0, 36500), default=DEFAULT_WARN_DAYS,
              show_default=True, help="Warn when a certificate has fewer days left.")
@click.option("--strict", is_flag=True, help="Warnings fail too (exit 1).")
@parallel_option
@json_option
@click.pass_obj
def verify_cmd(app, selection, ssh, local, pair, tls_destination, handshake, address, port, cert_dir,
               qemu_conf_path, group, hostname, warn_days, strict, parallel, as_json):
    """Check that hosts hold a working, safe QEMU TLS set-up.

    Per host: every layout file present (a file or a link staying inside the cert dir),
    owner root, group QEMU's, certificates 0644, keys 0640; each PEM parses and each key
    matches its certificate; the certificate chains to ca-cert.pem (and, run where the
    CA store is, to this CA with the fingerprint last deployed); QEMU's checks and
    qemuca's (basicConstraints, keyUsage, EKU serverAuth+clientAuth); validity and
    --warn-days; the host's name (hostname -f) in the SANs; revocation and the CRL's
    signature and next update; at most 16 CAs in the bundle, none expired; the QEMU CA
    kept apart from libvirt's; qemu.conf as libvirt resolves it; and whether the
    running virtqemud/libvirtd predates qemu.conf's last change.

    Exit 0 when nothing fails, 1 when something fails (warnings too with --strict). A
    host that cannot be reached is reported failed; with one host the exit code is the
    error's (8 remote, 9 host key).
    """

    if local and (pair or not selection.empty):
        raise click.UsageError("--local checks this machine: give no HOST, --pair or host list")
    if pair and not selection.empty:
        raise click.UsageError("--pair SRC DST takes no other hosts")
    if not pair and (tls_destination or handshake or address):
        raise click.UsageError("--tls-destination, --handshake and --address go with --pair")
    if hostname and not local:
        raise click.UsageError("--hostname goes with --local (over SSH the host's hostname -f is used)")
    opts = verify.VerifyOptions(cert_dir=cert_dir, qemu_conf_path=qemu_conf_path, group=group,
                                hostname=hostname, warn_days=warn_days)
    opts.validate()

    if local:

        report = verify.verify_host(None, LocalFS(), LocalRunner(), opts)
        return _finish([report], as_json, strict)

    reference = _reference(app)
    connect = connector(app, ssh)
    if pair:

        src, dst = (host_name(h) for h in pair)
        popts = verify.PairOptions(cert_dir=cert_dir, tls_destination=tls_destination,
                                   warn_days=warn_days, handshake=handshake, address=address, port=port)
        report = verify.verify_pair_remote(src, dst, connect, popts, reference)
        if as_json:
            emit_json(report.as_dict())
        else:
            _table(f"{report.source} -> {report.destination}"
                   + (f" (name {report.tls_destination})" if report.tls_destination else ""), report)
        return _exit([report], strict)

    hosts = select_hosts(app, selection)
    reports = run_with_progress(hosts, lambda h: verify.verify_remote(h, connect, opts, reference),
                                parallel, "verifying", as_json)
    return _finish(reports, as_json, strict)


def _reference(app):
    """What the store knows, when qemuca runs where the CA is (else None)."""

    try:
        store = app.store()
    except NotFound:
        return None
    return Reference.from_store(store)




def _finish(reports, as_json, strict):
    if as_json:
        emit_json([r.as_dict() for r in reports])
    else:
        for r in reports:
            _table(r.host, r)
    return _exit(reports, strict)


def _exit(reports, strict):
    if len(reports) == 1 and reports[0].error:
        note(f"qemuca: error: {one_line(reports[0].error)}")
        return reports[0].exit_code or 1
    return 1 if any(r.failed(strict) for r in reports) else 0


def _table(title, report):
    print_checks(title, report.result, report.findings)
