"""Commands that change hosts over SSH: deploy, enroll, rollback."""

from __future__ import annotations

import dataclasses
import functools

import click

from qemuca.cli.options import (
    cert_dir_option,
    days_option,
    group_option,
    key_type_option,
    passphrase_file_option,
    passphrase_source,
    qemu_conf_option,
)
from qemuca.cli.output import fleet_json_option
from qemuca.cli.remote import (
    connector,
    host_selection,
    json_output,
    parallel_option,
    render_reports,
    run_with_progress,
    select_hosts,
    ssh_options,
)
from qemuca.errors import InvalidInput
from qemuca.names import san_value
from qemuca.ops.adopt import adopt_host
from qemuca.ops.deploy import DeployOptions, deploy_from_store, enroll_host, refresh_host, rollback_host, run_on_host
from qemuca.pki import ca, profile


def host_layout_options(func):
    """The options saying how credentials land on a host; the command gets `opts`."""
    options = [
        cert_dir_option("Where QEMU reads its credentials on the hosts (created 0755)."),
        group_option("Group owning the files [default: the group libvirt runs QEMU as: qemu.conf's "
                     "'group', else libvirt's default on that host; see docs/commands/deploy.md]."),
        click.option("--no-qemu-conf", is_flag=True, help="Leave qemu.conf alone."),
        qemu_conf_option(),
        click.option("--force-tls/--no-force-tls", default=None,
                     help="Set migrate_tls_force = 1 (libvirt >= 6.9 then REFUSES every "
                          "unencrypted migration) or 0 [default: leave it]."),
        click.option("--default-dir", is_flag=True,
                     help="Also set default_tls_x509_cert_dir to the cert dir."),
        click.option("--restart", is_flag=True,
                     help="Restart virtqemud (or libvirtd) when qemu.conf changed. Running VMs "
                          "keep running; without it the change applies at the next restart."),
        click.option("--force", is_flag=True,
                     help="Replace layout files qemuca did not write (kept for rollback)."),
    ]
    for option in reversed(options):
        func = option(func)

    @functools.wraps(func)
    def wrapper(*args, cert_dir, group, no_qemu_conf, qemu_conf_path, force_tls, default_dir,
                restart, force, **kw):

        kw["opts"] = DeployOptions(cert_dir=cert_dir, group=group, qemu_conf=not no_qemu_conf,
                                   qemu_conf_path=qemu_conf_path, force_tls=force_tls,
                                   default_dir=default_dir, restart=restart, force=force)
        kw["opts"].tls_settings()  # validate --cert-dir before any connection
        return func(*args, **kw)

    return wrapper


@click.command("deploy")
@host_selection
@ssh_options
@host_layout_options
@click.option("--issue", "issue_missing", is_flag=True,
              help="Issue a certificate (key made here) for hosts that have none.")
@key_type_option("Key type for --issue.")
@click.option("--crl-only", is_flag=True,
              help="Only renew ca-crl.pem on the hosts (revocation rollout); certificates stay.")
@click.option("--bundle-only", is_flag=True,
              help="Only renew ca-cert.pem, the CA bundle (CA rollover); certificates stay.")
@click.option("--dry-run", is_flag=True,
              help="Connect and show per host what would change (files, modes, qemu.conf diff); "
                   "write nothing anywhere.")
@parallel_option
@passphrase_file_option
@fleet_json_option
@click.pass_obj
def deploy_cmd(app, selection, ssh, opts, issue_missing, key_type, crl_only, bundle_only, dry_run,
               parallel, passphrase_file, as_json):
    """Put each host's QEMU credentials and qemu.conf TLS settings in place over SSH.

    Per host, over one SSH connection: ca-cert.pem, server-cert.pem, client-cert.pem
    (0644) and server-key.pem, client-key.pem (0640), owner root, group QEMU's, plus
    ca-crl.pem when the CA has revocations, switched in atomically inside --cert-dir;
    read back and checked; then migrate_tls_x509_cert_dir and migrate_tls_x509_verify
    = 1 in qemu.conf (as 'qemuca qemu-conf apply'). On any failure the host keeps its
    previous set. Deploying what is there already changes nothing. Hosts are checked
    against known_hosts like OpenSSH does (unknown keys refused). An enrolled host
    keeps the key it made.

    Exit 0 when every host succeeded, 1 when any failed (see the table or --json:
    one object per host with host, result, fingerprint_sha256, restart_needed, error).
    """

    if issue_missing and (crl_only or bundle_only):
        raise InvalidInput("--issue does not go with --crl-only or --bundle-only")
    opts = dataclasses.replace(opts, dry_run=dry_run)
    hosts = select_hosts(app, selection)
    store = app.store()
    authority = ca.CertificateAuthority(store, passphrase_source(passphrase_file))
    missing = [h for h in hosts if store.valid_for_host(h) is None]
    if issue_missing and missing and not dry_run:
        authority.issue(missing, [], profile.DEFAULT_HOST_DAYS, key_type, force=False)
    connect = connector(app, ssh)
    if crl_only or bundle_only:
        def work(host):
            return lambda conn, fs: refresh_host(conn, fs, authority, host, opts, bundle_only, crl_only)
    else:
        def work(host):
            return lambda conn, fs: deploy_from_store(conn, fs, authority, host, opts)

    with json_output(as_json) as out:
        reports = run_with_progress(hosts, lambda h: run_on_host(h, connect, work(h)), parallel, "deploying",
                                    out, record=None if dry_run else store.record_deployments)
        return render_reports(reports, out, "Deploy" + (" (dry run: nothing written)" if dry_run else ""))


@click.command("enroll")
@host_selection
@ssh_options
@host_layout_options
@key_type_option("Type of the key made on the host.")
@click.option("--san", "sans", multiple=True, metavar="NAME_OR_IP",
              help="Extra subjectAltName for every host (DNS name or IP; repeatable).")
@days_option("Validity in days (never past the CA's own).", default=profile.DEFAULT_HOST_DAYS)
@click.option("--replace", "replace_valid", is_flag=True,
              help="Enroll hosts that already have a valid certificate (it becomes superseded).")
@parallel_option
@passphrase_file_option
@fleet_json_option
@click.pass_obj
def enroll_cmd(app, selection, ssh, opts, key_type, sans, days, replace_valid, parallel,
               passphrase_file, as_json):
    """Enroll hosts: the key is made ON the host and never leaves it (recommended).

    Per host, over SSH: the host's openssl makes the key in a directory only root can
    enter inside --cert-dir, a CSR comes back, qemuca signs it with the same profile
    as 'qemuca sign', and the set is switched in atomically as by 'qemuca deploy'
    (modes, group, qemu.conf, --restart alike). The certificate is recorded in the
    index once it is in place; any failure leaves the host with its previous set.
    """

    for value in sans:
        san_value(value)  # refuse a bad --san before touching any host
    hosts = select_hosts(app, selection)
    store = app.store()
    authority = ca.CertificateAuthority(store, passphrase_source(passphrase_file))
    authority.unlock()  # once, before the workers start
    connect = connector(app, ssh)

    def operation(host):
        return run_on_host(host, connect, lambda conn, fs: enroll_host(
            conn, fs, authority, host, opts, key_type, sans, days, replace_valid))

    with json_output(as_json) as out:
        reports = run_with_progress(hosts, operation, parallel, "enrolling", out, record=store.record_deployments)
        return render_reports(reports, out, "Enroll")


@click.command("adopt")
@host_selection
@ssh_options
@host_layout_options
@click.option("--replace", "replace_valid", is_flag=True,
              help="Record the host's certificate even if the index holds another valid one for it.")
@parallel_option
@fleet_json_option
@click.pass_obj
def adopt_cmd(app, selection, ssh, opts, replace_valid, parallel, as_json):
    """Take over the sets already on hosts, made by another tool (brownfield).

    Per host, over SSH: the certificate in --cert-dir is read (the key never leaves the
    host: it is matched on the host by its public half), checked as verify checks it,
    and when it chains to this store's CA (or to the previous CA of a rollover: 'ca
    rollover start --from-cert' takes a foreign CA over) it is recorded in the index
    (key on the host, as if enrolled) and the same certificate and key are switched in
    as a qemuca set, with this store's CA bundle and CRL, owners and modes; the files
    found are kept for rollback. From then on list, check, renew, rekey, revoke and the
    CA rollover cover the host. A set from another CA is reported with the way out.
    """

    hosts = select_hosts(app, selection)
    store = app.store()
    authority = ca.CertificateAuthority(store)
    connect = connector(app, ssh)

    def operation(host):
        return run_on_host(host, connect, lambda conn, fs: adopt_host(conn, fs, authority, host, opts,
                                                                        replace_valid))

    with json_output(as_json) as out:
        reports = run_with_progress(hosts, operation, parallel, "adopting", out, record=store.record_deployments)
        return render_reports(reports, out, "Adopt")


@click.command("rollback")
@host_selection
@ssh_options
@cert_dir_option()
@parallel_option
@fleet_json_option
@click.pass_obj
def rollback_cmd(app, selection, ssh, cert_dir, parallel, as_json):
    """Switch each host back to the credential set it had before the last deploy.

    The current set becomes the previous one, so a second rollback undoes the first.
    qemu.conf is not changed.
    """

    hosts = select_hosts(app, selection)
    connect = connector(app, ssh)

    def work(conn, fs):
        return rollback_host(conn, fs, cert_dir)

    with json_output(as_json) as out:  # recorded: what each host runs now
        reports = run_with_progress(hosts, lambda h: run_on_host(h, connect, work), parallel, "rolling back",
                                    out, record=app.store().record_deployments)
        return render_reports(reports, out, "Rollback")
