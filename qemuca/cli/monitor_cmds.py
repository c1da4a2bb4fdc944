"""Monitoring commands: check (a monitoring plugin) and metrics (Prometheus textfile)."""

from __future__ import annotations

import click

from qemuca.cli.output import emit_json, json_option, print_table
from qemuca.cli.tables import Column
from qemuca.ops import monitor


@click.command("check")
@click.option("--warn-days", type=int, default=30, show_default=True, metavar="DAYS",
              help="WARNING when a CA or host certificate has fewer days left.")
@click.option("--crit-days", type=int, default=7, show_default=True, metavar="DAYS",
              help="CRITICAL when fewer days are left (at most --warn-days).")
@click.option("--crl-warn-days", type=int, default=7, show_default=True, metavar="DAYS",
              help="WARNING when a CRL's next update is this close (CRITICAL once overdue).")
@json_option
@click.pass_obj
def check_cmd(app, warn_days, crit_days, crl_warn_days, as_json):
    """Check the CA store for a monitoring system: exit 0 OK, 1 WARNING, 2 CRITICAL.

    Checks each trusted CA's expiry, every current host certificate, each CRL's next
    update once anything is revoked (its own threshold: CRLs last 30 days), a CA
    rollover in progress (at least WARNING; CRITICAL/WARNING when the previous CA
    expires within --crit-days/--warn-days) and hosts whose last deployment is not
    their current certificate or CA bundle (WARNING "not deployed").

    The first line is the monitoring-plugin status line with performance data; a
    table of the problems follows. --json prints {"status", "exit_code", "summary",
    "warn_days", "crit_days", "crl_warn_days", "checks": [{"kind", "subject", "state", "detail",
    "not_after", "days_left"}]}. Errors exit 3 or more (UNKNOWN for a monitoring
    system): bad --warn-days/--crit-days/--crl-warn-days is exit 3.
    """

    monitor.validate_days(warn_days, crit_days, crl_warn_days)  # bad input first, then the store
    report = monitor.run_checks(app.store(), warn_days, crit_days, crl_warn_days)
    if as_json:
        emit_json(report.as_dict())
        return report.exit_code
    click.echo(report.summary())
    problems = report.problems()
    if problems:

        print_table(f"{len(problems)} problem(s)",
                    [Column("subject", whole=True), Column("state", essential=True), "kind", "detail"],
                    [(c.subject, c.state, c.kind, c.detail) for c in problems])
    return report.exit_code


@click.command("metrics")
@click.option("--out", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write FILE atomically (mode 0644), e.g. "
                   "/var/lib/prometheus/node-exporter/qemuca.prom; default: stdout.")
@click.pass_obj
def metrics_cmd(app, out):
    """Write Prometheus metrics of the CA store for node_exporter's textfile collector.

    Certificate, CA and CRL dates as unix times, deployment drift, rollover state and
    certificate counts. Run it from a timer (see scripts/systemd/) and alert on
    qemuca_metrics_generated_seconds getting old.
    """

    store = app.store()
    if out is None:
        click.echo(monitor.metrics_text(store), nl=False)
        return 0
    try:
        monitor.write_metrics(store, out)
    except OSError as e:
        # Name the target, not write_atomic's hidden temp file.
        raise OSError(e.errno, e.strerror, out) from None
    return 0
