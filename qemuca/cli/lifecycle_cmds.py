"""Lifecycle commands: renew, rekey, and the CA rollover (ca rollover start|finish, ca status)."""

from __future__ import annotations

import click

from qemuca.cli.deploy_cmds import host_layout_options
from qemuca.cli.options import (
    cert_dir_option,
    days_option,
    group_option,
    key_type_option,
    passphrase_file_option,
    passphrase_source,
    typed_options,
)
from qemuca.cli.output import emit_json, fleet_json_option, json_option, note, print_table
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
from qemuca.cli.tables import Column
from qemuca.errors import Conflict, InvalidInput
from qemuca.hosts.fs import read_user_file
from qemuca.names import subject_text
from qemuca.ops import lifecycle
from qemuca.ops.deploy import DeployOptions, refresh_host, run_on_host
from qemuca.pki import ca, profile


def _lifecycle_command(name, verb, doc):
    """renew and rekey share everything but the per-host operation."""

    @click.command(name, help=doc)
    @host_selection
    @click.option("--expiring-within", type=click.IntRange(0, 36500), metavar="DAYS",
                  help="Also take every host whose certificate ends within DAYS days.")
    @ssh_options
    @host_layout_options
    @days_option("Validity of the new certificates (never past the CA).", default=profile.DEFAULT_HOST_DAYS)
    @key_type_option("rekey only: type of the new keys [default: the old key's type].", default=None)
    @parallel_option
    @passphrase_file_option
    @fleet_json_option
    @click.pass_obj
    def command(app, selection, expiring_within, ssh, opts, days, key_type, parallel, passphrase_file,
                as_json):

        if key_type and name == "renew":
            raise InvalidInput("renew keeps each host's key: use rekey for a new key type")
        store = app.store()
        hosts = select_hosts(app, selection) if not selection.empty or expiring_within is None else []
        if expiring_within is not None:
            hosts += [h for h in lifecycle.hosts_expiring(store, expiring_within) if h not in hosts]
        if not hosts:
            with json_output(as_json) as out:
                if out is None:
                    note(f"No host expires within {expiring_within} days.")
            return 0
        authority = ca.CertificateAuthority(store, passphrase_source(passphrase_file))
        authority.unlock()  # once, before the workers start
        connect = connector(app, ssh)

        def operation(host):
            if name == "renew":
                work = lambda conn, fs: lifecycle.renew_host(conn, fs, authority, host, opts, days)  # noqa: E731
            else:
                work = lambda conn, fs: lifecycle.rekey_host(conn, fs, authority, host, opts, days, key_type)  # noqa: E731
            return run_on_host(host, connect, work)

        with json_output(as_json) as out:
            reports = run_with_progress(hosts, operation, parallel, verb, out, record=store.record_deployments)
            return render_reports(reports, out, name.capitalize())

    return command


renew_cmd = _lifecycle_command("renew", "renewing", """Renew hosts: a new certificate for the key each host already has.

    For keys qemuca made, the new certificate is signed here; for enrolled hosts a new
    CSR comes from the key on the host (it never leaves it). The new set is deployed
    atomically and checked like 'qemuca deploy'; only then is the certificate recorded
    and the old one marked superseded. Select hosts by name, --all, or
    --expiring-within DAYS (e.g. the hosts expiring this quarter). Run it for a host in
    maintenance mode; the running VMs are not touched.""")

rekey_cmd = _lifecycle_command("rekey", "rekeying", """Rekey hosts: a new key AND a new certificate for each host.

    The key is made where the old one was made: here for keys qemuca made, on the host
    for enrolled hosts. Then as renew: deployed atomically, checked, recorded, the old
    certificate superseded. During a CA rollover, rekey (or renew) re-issues hosts from
    the new CA.""")


@click.group("ca")
def ca_group():
    """The CA itself: status and rollover to a new CA without breaking migration."""


@ca_group.command("status")
@json_option
@click.pass_obj
def ca_status_cmd(app, as_json):
    """Show the CAs, the rollover stage, and where each host stands."""

    store = app.store()
    status = lifecycle.rollover_status(store, ca.CertificateAuthority(store))
    if as_json:
        emit_json(status)
        return
    note(f"Rollover stage: {status['stage']}")
    print_table("CAs", [Column("role", essential=True), "subject", "not after",
                        Column("fingerprint (SHA-256)", whole=True)],
                [(c["role"], c["subject"], c["not_after"], c["fingerprint_sha256"][:16]) for c in status["cas"]])
    print_table("Hosts", [Column("host", whole=True, essential=True), Column("issued by", essential=True),
                          "two-CA bundle", "deployed = current"],
                [(h["host"], h["issued_by"], "yes" if h["two_ca_bundle"] else "no",
                  "yes" if h["deployed_current"] else "no") for h in status["hosts"]])


@ca_group.group("rollover")
def rollover_group():
    """Replace the CA in stages; migration keeps working at every stage.

    \b
    1. qemuca ca rollover start           new CA; bundles become [new, old]
    2. qemuca deploy --bundle-only --all  every host trusts both CAs
    3. qemuca rekey --all (or renew)      every host gets a new-CA certificate
    4. qemuca ca rollover finish          bundle [new] pushed, old CA retired
    """


@rollover_group.command("start")
@click.option("--cn", "common_name", help="New CA common name [default: 'QEMU CA <FQDN> <year>'].")
@click.option("--org", "organization", help="Organisation (O) of the new CA.")
@key_type_option("Type of the new CA key.", default=profile.DEFAULT_CA_KEY_TYPE)
@days_option("Validity of the new CA in days.", default=profile.DEFAULT_CA_DAYS)
@click.option("--from-cert", "from_cert", type=click.Path(dir_okay=False),
              help="Take over from a foreign CA instead (oVirt's, certtool's...): its certificate "
                   "(no key needed) becomes the old CA; this store's CA is the new one.")
@passphrase_file_option
@json_option
@click.pass_obj
def rollover_start_cmd(app, common_name, organization, key_type, days, from_cert, passphrase_file, as_json):
    """Create the new CA. From now on it signs, and hosts must trust [new CA, old CA].

    The new key is encrypted with the same passphrase as the current one (or not,
    when the current key is not). Next: 'qemuca deploy --bundle-only --all'.

    With --from-cert FILE no CA is made: the hosts' existing CA, whose key qemuca
    never sees, becomes the old CA of the rollover and this store's CA the new one.
    Next: 'qemuca adopt HOST...' for every host (each keeps its certificate and gets
    the two-CA bundle), then 'qemuca renew' host by host, then 'ca rollover finish'.
    Migration works between moved and not-yet-moved hosts at every step.
    """

    if from_cert:
        given = typed_options("common_name", "organization", "key_type", "days")
        if given:
            raise click.UsageError(f"--from-cert makes no new CA: {', '.join(given)} do not apply")
        store = app.store()
        state = lifecycle.rollover_take_over(store, ca.CertificateAuthority(store),
                                             read_user_file(from_cert, "--from-cert"))
        if as_json:
            emit_json(state)
        else:
            note(f"Rollover started from the foreign CA {state['previous_fingerprint'][:16]}: this store's CA "
                 f"{state['new_fingerprint'][:16]} signs.")
            note("Next: qemuca adopt HOST...   (every host: its own certificate, the two-CA bundle)")
            note("Then: qemuca renew HOST...   (host by host: new-CA certificates, keys stay)")
            note("Last: qemuca ca rollover finish")
        return

    common_name = subject_text("--cn", common_name)
    organization = subject_text("--org", organization)
    store = app.store()
    authority = ca.CertificateAuthority(store, passphrase_source(passphrase_file))
    encrypted = b"ENCRYPTED" in open(store.ca_key_path, "rb").read(64)
    passphrase = passphrase_source(passphrase_file)() if encrypted else None
    if encrypted:
        authority.unlock()  # the passphrase must open the current key before it protects the new one
    if not common_name:
        year = profile.utcnow().year
        common_name = f"{ca.default_ca_common_name()} {year}"
    state = lifecycle.rollover_start(store, authority, key_type=key_type, days=days,
                                     common_name=common_name, organization=organization,
                                     passphrase=passphrase)
    if as_json:
        emit_json(state)
    else:
        note(f"Rollover started: new CA {state['new_fingerprint'][:16]} signs from now on.")
        note("Next: qemuca deploy --bundle-only --all   (every host trusts both CAs)")
        note("Then: qemuca rekey --all                  (new-CA certificates)")
        note("Last: qemuca ca rollover finish")


@rollover_group.command("finish")
@ssh_options
@cert_dir_option()
@group_option("Group owning the files (as deploy).")
@parallel_option
@passphrase_file_option
@fleet_json_option
@click.pass_obj
def rollover_finish_cmd(app, ssh, cert_dir, group, parallel, passphrase_file, as_json):
    """Drop the old CA: push the bundle [new CA] to every host, then retire the old CA.

    Refused while any host still holds a certificate from the old CA or has not
    received the two-CA bundle: finishing then would break its migrations. If some
    hosts cannot be reached, the old CA stays until a rerun reaches them all.
    """

    store = app.store()
    authority = ca.CertificateAuthority(store, passphrase_source(passphrase_file))
    problems = lifecycle.finish_problems(store, authority)
    if problems:
        raise Conflict(f"cannot finish the rollover: {problems[0]}"
                       + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    authority.unlock()
    lifecycle.rollover_begin_finish(store)
    authority = ca.CertificateAuthority(store, passphrase_source(passphrase_file))
    if store.revoked():
        authority.write_crl()

    opts = DeployOptions(cert_dir=cert_dir, group=group, qemu_conf=False)
    hosts = [r.host for r in store.valid()]
    connect = connector(app, ssh)
    with json_output(as_json) as out:
        reports = run_with_progress(
            hosts, lambda h: run_on_host(h, connect, lambda conn, fs: refresh_host(
                conn, fs, authority, h, opts, True, True)), parallel, "finishing", out,
            record=store.record_deployments)
        code = render_reports(reports, out, "Rollover finish")
    if code == 0:
        retired = lifecycle.rollover_complete(store)
        if not as_json:
            note(f"Rollover finished; the old CA is kept in {retired}.")
    elif not as_json:
        note("Some hosts did not get the new bundle: the old CA stays; rerun this command.")
    return code
