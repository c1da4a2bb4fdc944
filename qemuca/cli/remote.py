"""Options shared by the commands that work on hosts over SSH, and their fleet output."""

from __future__ import annotations

import functools
import logging
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Tuple

import click

from qemuca.cli.output import JsonStream, print_table, say
from qemuca.cli.tables import Column
from qemuca.errors import InvalidInput
from qemuca.hosts import ssh
from qemuca.hosts.inventory import read_hosts_file, read_inventory
from qemuca.hosts.ssh_config import DEFAULT_COMMAND_TIMEOUT, SshOptions, load_ssh_config
from qemuca.names import host_name
from qemuca.ops.fleet import FleetInterrupted, run_fleet


def ssh_options(func):
    """--ssh-config, --known-hosts, --accept-new-host-key, --identity, --connect-timeout, --timeout."""
    options = [
        click.option("--ssh-config", type=click.Path(dir_okay=False), envvar="QEMUCA_SSH_CONFIG",
                     help="OpenSSH client config [default: ~/.ssh/config; also QEMUCA_SSH_CONFIG]. "
                          "Host, HostName, Port, User, IdentityFile, ProxyJump, HostKeyAlias, "
                          "UserKnownHostsFile apply."),
        click.option("--known-hosts", type=click.Path(dir_okay=False), envvar="QEMUCA_KNOWN_HOSTS",
                     help="known_hosts file [default: UserKnownHostsFile, else ~/.ssh/known_hosts; "
                          "also QEMUCA_KNOWN_HOSTS]."),
        click.option("--accept-new-host-key", is_flag=True,
                     help="Add unknown host keys to known_hosts (like StrictHostKeyChecking="
                          "accept-new). A changed key is always refused."),
        click.option("-i", "--identity", type=click.Path(dir_okay=False),
                     help="Private key to log in with (besides ssh-agent and IdentityFile)."),
        click.option("--connect-timeout", type=click.FloatRange(0.1, 600), default=None,
                     help="Seconds to wait for a connection [default: ConnectTimeout, else 10]."),
        click.option("--timeout", "command_timeout", type=click.FloatRange(0.1, 3600), default=None,
                     help="Seconds one remote command or SFTP operation may take [default: 60]. "
                          "A host silent that long is given up and reported failed "
                          "('timed out'); the other hosts go on."),
    ]
    for option in reversed(options):
        func = option(func)

    @functools.wraps(func)
    def wrapper(*args, ssh_config, known_hosts, accept_new_host_key, identity, connect_timeout,
                command_timeout, **kw):


        # paramiko logs a traceback from its own thread when a connection dies during the
        # handshake (a hung host's banner timeout); qemuca reports that host in one line.
        paramiko_log = logging.getLogger("paramiko")
        if not any(isinstance(h, logging.NullHandler) for h in paramiko_log.handlers):
            paramiko_log.addHandler(logging.NullHandler())
        kw["ssh"] = SshOptions(ssh_config=ssh_config, known_hosts=known_hosts,
                               accept_new_host_key=accept_new_host_key, identity_file=identity,
                               connect_timeout=connect_timeout,
                               command_timeout=command_timeout or DEFAULT_COMMAND_TIMEOUT)
        return func(*args, **kw)

    return wrapper


def host_selection(func):
    """HOST... plus --hosts-file, --inventory/--limit and --all (every host in the index)."""
    options = [
        click.argument("hosts", nargs=-1),
        click.option("--hosts-file", type=click.Path(dir_okay=False),
                     help="Read host names from FILE, one per line (# comments)."),
        click.option("--inventory", type=click.Path(dir_okay=False),
                     help="Ansible inventory (INI or YAML) to take hosts from."),
        click.option("--limit", metavar="PATTERN",
                     help="With --inventory: a group or host (comma-separated list allowed)."),
        click.option("--all", "all_hosts", is_flag=True,
                     help="Every host with a valid certificate in the index."),
    ]
    for option in reversed(options):
        func = option(func)

    @functools.wraps(func)
    def wrapper(*args, hosts, hosts_file, inventory, limit, all_hosts, **kw):
        kw["selection"] = HostSelection(tuple(hosts), hosts_file, inventory, limit, all_hosts)
        return func(*args, **kw)

    return wrapper


@dataclass(frozen=True)
class HostSelection:
    """The hosts a command was asked for, as given (select_hosts resolves them)."""

    hosts: Tuple[str, ...] = ()
    hosts_file: Optional[str] = None
    inventory: Optional[str] = None
    limit: Optional[str] = None
    all_hosts: bool = False

    @property
    def lists(self) -> bool:
        """Whether hosts come from a file, an inventory or the index (not only arguments)."""
        return bool(self.hosts_file or self.inventory or self.limit or self.all_hosts)

    @property
    def empty(self) -> bool:
        return not self.hosts and not self.lists


def select_hosts(app, selection: HostSelection):
    """The host names a command works on, normalised, de-duplicated, in order."""

    hosts, hosts_file, inventory, limit, all_hosts = (selection.hosts, selection.hosts_file, selection.inventory,
                                                      selection.limit, selection.all_hosts)
    names = list(hosts)
    if hosts_file:
        names += read_hosts_file(hosts_file)
    if inventory:
        for entry in read_inventory(inventory, limit):
            names.append(entry.name)
            app.addresses[host_name(entry.name)] = entry
    elif limit:
        raise InvalidInput("--limit goes with --inventory")
    if all_hosts:
        names += [r.host for r in app.store().valid()]
    if not names:
        raise InvalidInput("no host given (HOST..., --hosts-file, --inventory or --all)")
    out = []
    for name in names:
        name = host_name(name)
        if name not in out:
            out.append(name)
    return out


def connector(app, options):
    """host -> Connection, with ssh_config read once and an inventory's addresses applied."""

    config = load_ssh_config(options.ssh_config)

    def connect(host):
        entry = app.addresses.get(host)
        if entry is None:
            return ssh.connect(host, options, config)
        return ssh.connect(host, options, config, hostname=entry.ssh_host, port=entry.ssh_port,
                           user=entry.ssh_user)

    return connect


# Hosts worked on at once unless --parallel says otherwise (bench/bench_scale.py's sweep
# measured it; docs/scale.md).
DEFAULT_PARALLEL = 10


def parallel_option(func):
    return click.option("--parallel", type=click.IntRange(1, 256), default=DEFAULT_PARALLEL, show_default=True,
                        help="Hosts worked on at once.")(func)


@contextmanager
def json_output(as_json, key: str = "", summary=None):
    """The streamed --json of a fleet command (None without --json), ended on the way
    out whatever happens: after an error or Ctrl-C the array holds the hosts that finished.
    With `key`, the array is that member of an object ended by `summary()`'s members."""
    if not as_json:
        yield None
        return
    stream = JsonStream(as_json, key, summary=summary)
    try:
        yield stream
    finally:
        stream.close()


def run_with_progress(hosts, operation, parallel, label, output=None, record=None, to_json=None,
                      progress=True):
    """Run `operation` over hosts (ops.fleet.run_fleet): a progress bar on stderr when it is
    a terminal and no JSON is asked for; each result written to `output` (a JsonStream,
    as `to_json(result)`, default its as_dict()) as its host finishes: --json-lines in
    the order they finish, --json in input order (each as soon as the hosts before it are
    done); `record(results)` (the store's record_deployments) with what finished, also
    when Ctrl-C stops the run (then FleetInterrupted, exit 130, once the hosts in flight
    have finished)."""

    position = {host: i for i, host in enumerate(hosts)}
    waiting = {}  # --json: finished hosts whose predecessors are not all done yet
    written = [0]

    def write(result):
        output.write(to_json(result) if to_json else result.as_dict())

    def stream(host, result):
        if output.mode == "lines":
            write(result)
            return
        waiting[position[host]] = result
        while written[0] in waiting:
            write(waiting.pop(written[0]))
            written[0] += 1

    def run(on_done):
        try:
            results = run_fleet(hosts, operation, parallel, on_done)
        except FleetInterrupted as e:
            for i in sorted(waiting):  # behind a host that never started
                write(waiting.pop(i))
            if record is not None:
                record(e.results)
            raise
        if record is not None:
            record(results)
        return results

    if output is not None:
        return run(stream)
    if not progress or not sys.stderr.isatty():
        return run(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from qemuca.cli.output import console

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console(stderr=True), transient=True) as progress_bar:
        task = progress_bar.add_task(label, total=len(hosts))
        return run(lambda _h, _r: progress_bar.advance(task))


# Per host: its name whole, the result and any error always; the rest as width allows.
REPORT_COLUMNS = [Column("host", whole=True, essential=True), Column("result", essential=True),
                  Column("fingerprint (SHA-256)", whole=True, wide=True), Column("restart needed"),
                  Column("error", essential=True)]
# The summary lists failures first, then what needs a look; the counts line reads in this order.
RESULT_ORDER = ("failed", "would-change", "changed", "unchanged")
COUNT_ORDER = ("changed", "would-change", "unchanged", "failed")


def worst_first(reports, order, result=lambda r: r.result):
    """The reports sorted by `order` of their results (others last), input order within."""
    rank = {name: i for i, name in enumerate(order)}
    return sorted(reports, key=lambda r: rank.get(result(r), len(rank)))


def counts_line(reports, order, noun="host", result=lambda r: r.result) -> str:
    """'500 hosts: 497 changed, 3 failed': the results that occur, in `order`."""
    counts = Counter(result(r) for r in reports)
    names = [n for n in order if counts[n]] + sorted(n for n in counts if n not in order)
    total = len(reports)
    return (f"{total} {noun}{'' if total == 1 else 's'}: "
            + (", ".join(f"{counts[n]} {n}" for n in names) or "none"))


def without_host(host: str, text: str) -> str:
    """An error as a table cell beside its host: the 'HOST: ' it starts with is dropped
    (the host column says it), so narrow terminals wrap less."""
    return text[len(host) + 2:] if text.startswith(host + ": ") else text


def render_reports(reports, output, title):
    """The final table, failures first, and the counts line (with --json: nothing more,
    each host was written as it finished); exit code 1 when any host failed."""
    if output is None:
        shown = worst_first(reports, RESULT_ORDER)
        print_table(title, REPORT_COLUMNS,
                    [(r.host, r.result, (r.fingerprint_sha256 or "")[:16],
                      "yes" if r.restart_needed else ("done: " + r.restarted if r.restarted else "no"),
                      without_host(r.host, r.error or "")) for r in shown])
        for r in shown:
            if r.qemu_conf_diff and r.result == "would-change":
                say(f"--- {r.host}: qemu.conf\n{r.qemu_conf_diff}")
            for action in r.actions if r.result == "would-change" else ():
                say(f"{r.host}: would {action}")
        say(counts_line(reports, COUNT_ORDER))
    return 1 if any(r.result == "failed" for r in reports) else 0
