"""The qemuca command line: parse, call the core, render.

Commands are loaded lazily from the table below so that `qemuca --help` and
`qemuca --version` cost little more than importing click: cryptography, paramiko and
rich are imported only by the command that needs them. This module is also the one
place where core errors become exit codes.
"""

from __future__ import annotations

import os
import sys
from importlib import import_module

import click

from qemuca import __version__

# name -> (module, attribute, one-line help shown by `qemuca --help`)
COMMANDS = {
    "init": ("qemuca.cli.ca_cmds", "init_cmd", "Create the dedicated QEMU CA."),
    "issue": ("qemuca.cli.ca_cmds", "issue_cmd", "Issue host certificates (key made here)."),
    "sign": ("qemuca.cli.ca_cmds", "sign_cmd", "Sign a CSR made on a host (key stays there)."),
    "revoke": ("qemuca.cli.ca_cmds", "revoke_cmd", "Revoke a host's certificate."),
    "crl": ("qemuca.cli.ca_cmds", "crl_cmd", "Write the CA's certificate revocation list."),
    "export": ("qemuca.cli.export_cmd", "export_cmd", "Write a host's QEMU credential files."),
    "list": ("qemuca.cli.inventory", "list_cmd", "List issued certificates."),
    "show": ("qemuca.cli.inventory", "show_cmd", "Show one certificate from the index."),
    "inspect": ("qemuca.cli.inventory", "inspect_cmd", "Inspect a PEM file against QEMU's checks."),
    "qemu-conf": ("qemuca.cli.qemu_conf", "qemu_conf_group", "Edit libvirt's qemu.conf TLS settings."),
    "deploy": ("qemuca.cli.deploy_cmds", "deploy_cmd", "Deploy credentials and qemu.conf to hosts over SSH."),
    "enroll": ("qemuca.cli.deploy_cmds", "enroll_cmd", "Make keys on hosts, sign their CSRs, deploy."),
    "adopt": ("qemuca.cli.deploy_cmds", "adopt_cmd", "Take over sets already on hosts (brownfield)."),
    "renew": ("qemuca.cli.lifecycle_cmds", "renew_cmd", "New certificates for the hosts' existing keys."),
    "rekey": ("qemuca.cli.lifecycle_cmds", "rekey_cmd", "New keys and certificates for hosts."),
    "ca": ("qemuca.cli.lifecycle_cmds", "ca_group", "CA status and rollover to a new CA."),
    "rollback": ("qemuca.cli.deploy_cmds", "rollback_cmd", "Switch hosts back to their previous credentials."),
    "verify": ("qemuca.cli.verify_cmd", "verify_cmd", "Check hosts' QEMU TLS set-up, or a migration pair."),
    "probe": ("qemuca.cli.probe_cmd", "probe_cmd", "Run a real encrypted test migration between hosts."),
    "check": ("qemuca.cli.monitor_cmds", "check_cmd", "Monitoring check: exit 0/1/2 (OK/WARNING/CRITICAL)."),
    "metrics": ("qemuca.cli.monitor_cmds", "metrics_cmd", "Write Prometheus metrics for node_exporter."),
    "doctor": ("qemuca.cli.doctor_cmd", "doctor_cmd", "Check the store's integrity (index, files, CA)."),
}

_debug = False


class LazyGroup(click.Group):
    """A group whose subcommands are imported only when invoked."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, cmd_name):
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module, attr, _ = entry
        return getattr(import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def default_home() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "qemuca")


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="qemuca")
@click.option(
    "--home",
    envvar="QEMUCA_HOME",
    type=click.Path(file_okay=False),
    default=default_home,
    show_default="$XDG_DATA_HOME/qemuca, i.e. ~/.local/share/qemuca",
    help="The CA store directory (also QEMUCA_HOME).",
)
@click.option("--debug", is_flag=True, help="Show a traceback on errors.")
@click.pass_context
def cli(ctx, home, debug):
    """A dedicated certificate authority for QEMU migration TLS.

    qemuca keeps a CA used only by QEMU, issues one certificate per hypervisor
    (named by its host name), writes the files QEMU reads from /etc/pki/qemu and the
    libvirt qemu.conf settings that turn migration TLS on.

    Exit codes: 0 ok, 1 a check or host failed, 2 usage, 3 invalid input, 4 not
    found, 5 conflict (needs --force), 6 passphrase, 7 store, 8 remote, 9 host key,
    10 local I/O, 70 internal error, 130 interrupted. See docs/exit-codes.md.
    """
    global _debug
    _debug = debug
    from qemuca.cli.context import AppContext

    ctx.obj = AppContext(home=home, debug=debug)


def _one_line(message: str) -> str:
    """The message as one printable line: a newline becomes a space, other control and
    invisible characters (CR, ESC, bidi overrides...) are shown escaped, so a hostile
    name or path can neither split the line nor drive the terminal."""
    import unicodedata

    def shown(c: str) -> str:
        if c == "\n":
            return " "
        if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Cs"):
            return c.encode("unicode_escape", "backslashreplace").decode("ascii")
        return c

    return "".join(map(shown, message))


def _fail(message: str, code: int):
    click.echo(f"qemuca: error: {_one_line(message)}", err=True)
    sys.exit(code)


def _traceback_if_debug() -> None:
    """With --debug, the traceback goes first; the exit code stays the documented one."""
    if _debug:
        import traceback

        traceback.print_exc()


def main(argv=None):
    from qemuca import errors

    if not sys.warnoptions:
        import warnings

        from cryptography.utils import CryptographyDeprecationWarning

        # cryptography warns about oddities of the certificates and keys it parses (a
        # negative serial, a non-canonical encoding) and about ciphers paramiko still
        # offers: the checks report what matters, and one-line output stays one line.
        warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning)
    try:
        rv = cli.main(args=argv, prog_name="qemuca", standalone_mode=False)
    except errors.QemucaError as e:
        _traceback_if_debug()
        _fail(str(e), e.exit_code)
    except click.exceptions.Abort:
        _fail("aborted", errors.EXIT_INTERRUPTED)
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        _fail(" ".join(e.format_message().split()) + hint, e.exit_code)
    except click.ClickException as e:
        _fail(" ".join(e.format_message().split()), e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", errors.EXIT_INTERRUPTED)
    except OSError as e:
        _traceback_if_debug()
        where = f": {e.filename}" if e.filename else ""
        _fail(f"{e.strerror or e}{where}", errors.EXIT_IO)
    except Exception as e:  # a bug: still one line, the traceback only with --debug
        _traceback_if_debug()
        _fail(f"internal error: {type(e).__name__}: {e} (rerun with --debug and report it)",
              errors.EXIT_INTERNAL)
    sys.exit(rv if isinstance(rv, int) else 0)
