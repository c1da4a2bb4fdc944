"""`qemuca probe`: a real encrypted test migration between hosts, one pair or a matrix."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Callable, Dict, Optional, Union

import click
from rich.table import Table
from rich.text import Text

from qemuca.cli.options import cert_dir_option, qemu_conf_option
from qemuca.cli.output import RESULT_STYLE, console, emit_one, fleet_json_option, note, print_checks, print_table, say
from qemuca.cli.remote import (
    connector,
    counts_line,
    host_selection,
    json_output,
    parallel_option,
    run_with_progress,
    select_hosts,
    ssh_options,
    worst_first,
)
from qemuca.cli.tables import Column
from qemuca.errors import InvalidInput, NotFound
from qemuca.findings import FAIL
from qemuca.names import host_name
from qemuca.ops import probe
from qemuca.ops.probe import Revocations, rate
from qemuca.ops.probe.libvirt import probe_pair_libvirt
from qemuca.ops.probe.report import DEFAULT_RAM_MIB
from qemuca.text import printable


@click.command("probe")
@host_selection
@ssh_options
@click.option("--matrix", is_flag=True,
              help="Probe every ordered pair of the hosts given (HOST..., --hosts-file, --inventory, --all).")
@click.option("--pairs", "pairs_file", type=click.Path(dir_okay=False),
              help="Probe the pairs listed in FILE ('SOURCE DESTINATION' per line, # comments).")
@click.option("--tls-destination", metavar="NAME",
              help="The name the source checks in the destination's certificate, as libvirt's "
                   "tls.destination [default: the destination's hostname -f].")
@click.option("--address", metavar="ADDR",
              help="Where the source connects, and the destination listens [default: NAME as the "
                   "source resolves it]. With --matrix/--pairs it applies to every pair.")
@click.option("--port", type=click.IntRange(1, 65535),
              help="Port of the destination's listener [default: the first free one of libvirt's "
                   "migration range 49152-49215].")
@click.option("--ram", "ram_mib", type=click.IntRange(8, 65536), default=DEFAULT_RAM_MIB, show_default=True,
              help="Guest RAM in MiB (filled with data, so the throughput means something).")
@click.option("--compare-plain", is_flag=True,
              help="Also migrate the same guest without TLS and report the throughput ratio TLS / plain.")
@click.option("--libvirt", "use_libvirt", is_flag=True,
              help="Migrate with libvirt itself: a throwaway guest moved by 'virsh migrate --live "
                   "--tls' between the hosts' daemons (virsh here, over the same SSH connections).")
@cert_dir_option("Where the hosts keep their QEMU credentials.")
@qemu_conf_option("libvirt's QEMU driver configuration on the destination (reported, not changed).")
@click.option("--strict", is_flag=True, help="Warnings fail too (exit 1), as with verify and doctor.")
@parallel_option
@fleet_json_option
@click.pass_obj
def probe_cmd(app, selection, ssh, matrix, pairs_file, tls_destination, address, port, ram_mib,
              compare_plain, use_libvirt, cert_dir, qemu_conf_path, strict, parallel, as_json):
    """Run a real encrypted test migration from SRC to DST, with QEMU, over SSH.

    \b
    qemuca probe SRC DST [options]
    qemuca probe --matrix HOST... [options]
    qemuca probe --pairs FILE [options]

    On DST a throwaway QEMU (no disk, no NIC, QMP over the SSH channel) listens with the
    deployed server credentials (tls-creds-x509, verify-peer=on); on SRC the same small
    guest migrates to it with the client credentials and tls-hostname = NAME, as
    'virsh migrate --tls --tls-destination NAME' would. The probe shows that a plain
    migration to the TLS listener is refused, that the TLS migration completes (time,
    bytes, throughput; with --compare-plain the ratio to a plain migration), whether
    DST's certificate is revoked by the CA's current CRL (QEMU's source never checks),
    and what DST's qemu.conf makes libvirt enforce. Failures come with QEMU's exact
    message and what to fix. Nothing stays on the hosts: QEMU is bounded by 'timeout',
    tied to the SSH session, and killed by PID at the end.

    --timeout (default 60 s) bounds one whole probe; QEMU is killed on the hosts 10 s
    after that in any case.

    With --libvirt the migration is libvirt's own: a 32 MiB transient guest is started
    through SRC's daemon, moved by 'virsh migrate --live --tls' (with --tls-destination
    and --address as --migrateuri when given) to DST's daemon, checked there, and
    destroyed on both hosts in any case. That proves what libvirt adds: qemu.conf as the
    daemons read it, QEMU's user and group, the migration address and ports. It needs
    virsh here and virt-ssh-helper on the hosts (both Debian's libvirt packages).

    Exit 0 when every probe passes, 1 when any fails (a host that cannot be reached is
    a failed probe), or with --strict when any warns.
    """

    many = matrix or pairs_file
    if matrix and pairs_file:
        raise click.UsageError("--matrix and --pairs exclude each other")
    if many and tls_destination:
        raise click.UsageError("--tls-destination goes with one SRC DST pair")
    if many and port and parallel > 1:
        raise click.UsageError("--port with --matrix/--pairs needs --parallel 1 (probes to one "
                               "host at once would need the same port)")
    opts = probe.ProbeOptions(tls_destination=probe.tls_name(tls_destination) if tls_destination else None,
                              address=address, port=port, ram_mib=ram_mib, compare_plain=compare_plain,
                              cert_dir=cert_dir, qemu_conf_path=qemu_conf_path,
                              timeout=ssh.command_timeout)
    opts.validate()
    if pairs_file:
        if not selection.empty:
            raise click.UsageError("--pairs FILE takes no other hosts")
        pairs = probe.read_pairs(pairs_file)
    elif matrix:
        hosts = select_hosts(app, selection)
        if len(hosts) < 2:
            raise InvalidInput("--matrix needs at least two hosts")
        pairs = probe.all_pairs(hosts)
    else:
        if selection.lists or len(selection.hosts) != 2:
            raise click.UsageError("give SRC DST (or --matrix HOST..., or --pairs FILE)")

        src, dst = (host_name(h) for h in selection.hosts)
        if src == dst:
            raise InvalidInput(f"SRC and DST are the same host ({src})")
        pairs = [(src, dst)]

    if use_libvirt and compare_plain:
        raise click.UsageError("--compare-plain goes with QEMU probes, not --libvirt")
    revocations = None if use_libvirt else _revocations(app)
    connect = connector(app, ssh)
    cancel = threading.Event()
    if use_libvirt:
        def one(p):
            return probe_pair_libvirt(p[0], p[1], connect, opts, cancel)
    else:
        def one(p):
            return probe.probe_pair(p[0], p[1], connect, opts, revocations, cancel)
    hosts = list(dict.fromkeys(h for p in pairs for h in p))
    with _cancel_on_signals(cancel), json_output(as_json if many else None, "pairs",
                                                 lambda: _summary(hosts, finished)) as out:
        finished = []  # as they finish: the streamed --json's summary counts them

        def to_json(report):
            finished.append(report)
            return report.as_dict()

        reports = run_with_progress(pairs, one, parallel, "probing", out, to_json=to_json, progress=bool(many))
        if cancel.is_set():
            raise probe.Interrupted("interrupted: the probes stopped and removed what they had started")
        if many and out is None:
            _render_matrix(hosts, reports)
    if not many and as_json:
        emit_one(reports[0].as_dict(), as_json)
    elif not many:
        _render_one(reports[0])
    return 1 if any(r.failed(strict) for r in reports) else 0


def _revocations(app):
    """The CA's revocations when qemuca runs where the store is (else None: not checked)."""

    try:
        store = app.store()
    except NotFound:
        note(f"qemuca: no CA store in {app.home}: revocation is not checked")
        return None
    return Revocations.from_store(store)


# What signal.signal() takes and gives back: a handler, SIG_DFL/SIG_IGN, or None.
_Handler = Union[Callable[[int, Optional[FrameType]], object], int, signal.Handlers, None]


class _cancel_on_signals:
    """Ctrl-C / SIGTERM: tell every probe to stop (each cleans up its hosts), then exit 130."""

    def __init__(self, cancel: threading.Event):
        self.cancel = cancel
        self.saved: Dict[signal.Signals, _Handler] = {}

    def __enter__(self):
        def handler(signum, frame):
            self.cancel.set()

        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach the main thread only
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.saved[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self.saved.items():
            signal.signal(sig, old)


def _render_one(report) -> None:
    title = f"{report.source} -> {report.destination}"
    if report.tls_destination:
        title += (f" (name {report.tls_destination}"
                  + (f", {report.address}:{report.port}" if report.port else "") + ")")
    print_checks(title, report.result, report.findings)


def _cell(report) -> str:

    if report.passed:
        if not report.ram_filled_bytes:
            return "ok"  # an empty guest: its throughput says nothing
        text = f"ok {rate(report.tls.throughput)}"
        return text + (f" (x{report.ratio:.2f} plain)" if report.ratio else "")
    return "FAIL: " + ", ".join(report.labels())


def _summary(hosts, reports) -> dict:
    """--matrix/--pairs --json beside "pairs": the hosts (input order) and the counts."""
    passed = sum(r.passed for r in reports)
    return {"hosts": hosts, "passed": passed, "failed": len(reports) - passed}


PAIR_ORDER = ("failed", "passed")


def _passed(report) -> str:
    return "passed" if report.passed else "failed"


def _render_matrix(hosts, reports) -> None:
    """The matrix when it fits the terminal with every host name whole, else one line per
    pair (failures first); then the failed checks with their fixes, and the counts."""
    out = console()
    cells = {r.pair: r for r in reports}
    passed = sum(r.passed for r in reports)
    title = f"Probe matrix: {passed}/{len(reports)} pairs passed"
    corner = "source \\ destination"
    width = max(len(h) for h in hosts + [corner]) + 3 + sum(
        3 + max([len(dst)] + [len(_cell(cells[(src, dst)])) for src in hosts if (src, dst) in cells])
        for dst in hosts)
    if width < out.width:  # rich's outer edge takes one more
        table = Table(title=title + " (rows: source, columns: destination)", title_justify="left")
        table.add_column(corner, no_wrap=True)
        for h in hosts:
            table.add_column(h, no_wrap=True)
        for src in hosts:
            row = [Text(src)]
            for dst in hosts:
                r = cells.get((src, dst))
                row.append(Text("-" if src == dst or r is None else _cell(r),
                                style="" if r is None else RESULT_STYLE[r.result]))
            table.add_row(*row)
        out.print(table)
    else:
        print_table(title, [Column("source", whole=True, essential=True),
                            Column("destination", whole=True, essential=True), Column("result", essential=True)],
                    [(r.source, r.destination, _cell(r)) for r in worst_first(reports, PAIR_ORDER, _passed)])
    failed = [r for r in reports if not r.passed]
    if failed:
        print_table("Failed pairs", [Column("pair", whole=True, essential=True), Column("check", essential=True),
                                     Column("detail", essential=True)],
                    [(f"{r.source} -> {r.destination}", f.check,
                      printable(f.detail) + (f" (fix: {printable(f.fix)})" if f.fix else ""))
                     for r in failed for f in r.findings if f.result is FAIL])
    say(counts_line(reports, ("passed", "failed"), noun="pair", result=_passed))
