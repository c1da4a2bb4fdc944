"""`qemuca verify`: check hosts over SSH, this host (--local), or a migration pair (--pair)."""

from __future__ import annotations

import click

from qemuca.cli.options import cert_dir_option, group_option, qemu_conf_option
from qemuca.cli.output import emit_one, fleet_json_option, note, print_checks, print_table, say
from qemuca.cli.remote import (
    connector,
    counts_line,
    host_selection,
    json_output,
    parallel_option,
    run_with_progress,
    select_hosts,
    ssh_options,
    without_host,
    worst_first,
)
from qemuca.cli.tables import Column
from qemuca.errors import NotFound
from qemuca.findings import FAIL, WARN
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
@fleet_json_option
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
        with json_output(as_json) as out:
            if out is not None:
                out.write(report.as_dict())
            return _finish([report], out, strict)

    reference = _reference(app)
    connect = connector(app, ssh)
    if pair:

        src, dst = (host_name(h) for h in pair)
        popts = verify.PairOptions(cert_dir=cert_dir, tls_destination=tls_destination,
                                   warn_days=warn_days, handshake=handshake, address=address, port=port)
        report = verify.verify_pair_remote(src, dst, connect, popts, reference)
        if as_json:
            emit_one(report.as_dict(), as_json)
        else:
            _table(f"{report.source} -> {report.destination}"
                   + (f" (name {report.tls_destination})" if report.tls_destination else ""), report)
        return _exit([report], strict)

    hosts = select_hosts(app, selection)
    with json_output(as_json) as out:
        reports = run_with_progress(hosts, lambda h: verify.verify_remote(h, connect, opts, reference),
                                    parallel, "verifying", out)
        return _finish(reports, out, strict)


def _reference(app):
    """What the store knows, when qemuca runs where the CA is (else None)."""

    try:
        store = app.store()
    except NotFound:
        return None
    return Reference.from_store(store)




# Hosts that need a look first; the counts line in the order of a healthy fleet.
RESULT_ORDER = ("fail", "warn", "skip", "pass")
COUNT_ORDER = ("pass", "skip", "warn", "fail")


def _result(report) -> str:
    return report.result.value


def _finish(reports, output, strict):
    """Without --json: one host's table; for several, the tables of the hosts that did
    not pass (failures first), then one line per host and the counts."""
    if output is None and len(reports) == 1:
        _table(reports[0].host, reports[0])
    elif output is None:
        shown = worst_first(reports, RESULT_ORDER, _result)
        for r in shown:
            if _result(r) in ("fail", "warn"):
                _table(r.host, r)
        print_table("Verify", [Column("host", whole=True, essential=True), Column("result", essential=True),
                               Column("problems", essential=True)],
                    [(r.host, _result(r), without_host(r.host, r.error or "") or ", ".join(
                        f.check for f in r.findings if f.result in (FAIL, WARN))) for r in shown])
        say(counts_line(reports, COUNT_ORDER, result=_result))
    return _exit(reports, strict)


def _exit(reports, strict):
    if len(reports) == 1 and reports[0].error:
        note(f"qemuca: error: {one_line(reports[0].error)}")
        return reports[0].exit_code or 1
    return 1 if any(r.failed(strict) for r in reports) else 0


def _table(title, report):
    print_checks(title, report.result, report.findings)
