"""Options and argument helpers shared by several commands."""

from __future__ import annotations

import os
import stat
import sys
from typing import List

import click

from qemuca.errors import PassphraseError
from qemuca.hosts.inventory import read_hosts_file
from qemuca.hosts.layout import DEFAULT_CERT_DIR
from qemuca.hosts.qemuconf import DEFAULT_PATH as DEFAULT_QEMU_CONF
from qemuca.pki.ca import read_passphrase_file
from qemuca.pki.profile import DEFAULT_HOST_KEY_TYPE, KEY_TYPES

passphrase_file_option = click.option(
    "--passphrase-file",
    envvar="QEMUCA_PASSPHRASE_FILE",
    type=click.Path(dir_okay=True),
    help="File whose first line is the CA key's passphrase; must be mode 0600 "
         "(also QEMUCA_PASSPHRASE_FILE). Without it, qemuca asks on the terminal.",
)


def read_passphrase(path) -> bytes:
    """The passphrase from a file, refusing a FIFO or device first: reading one would
    block (or never end) before any mode check could help."""


    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None  # missing or unreadable: read_passphrase_file says which
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise PassphraseError(f"passphrase file {path} is not a regular file")
    return read_passphrase_file(path)


def passphrase_source(path):
    """A callable giving the CA passphrase: from the file, else asked on the terminal."""

    def get() -> bytes:
        if path:
            return read_passphrase(path)
        if not sys.stdin.isatty():
            raise PassphraseError("the CA key is encrypted and there is no terminal to ask: "
                                  "give --passphrase-file or QEMUCA_PASSPHRASE_FILE")
        return click.prompt("CA key passphrase", hide_input=True, err=True).encode()

    return get


def hosts_from(args, hosts_file):
    """Host arguments plus the names in --hosts-file."""
    hosts = list(args)
    if hosts_file:

        hosts.extend(read_hosts_file(hosts_file))
    return hosts


hosts_file_option = click.option(
    "--hosts-file", type=click.Path(dir_okay=False),
    help="Read host names from FILE, one per line (# starts a comment).")


# Options that several commands take, each declared once; only the help (what the value
# means for that command) and, where it differs, the default are given per command.

def cert_dir_option(help: str = "Where QEMU reads its credentials on the hosts."):
    return click.option("--cert-dir", default=DEFAULT_CERT_DIR, show_default=True, help=help)


def qemu_conf_option(help: str = "libvirt's QEMU driver configuration on the hosts."):
    return click.option("--qemu-conf", "qemu_conf_path", default=DEFAULT_QEMU_CONF, show_default=True,
                        help=help)


def group_option(help: str = "Group owning the files [default: the group QEMU runs as on the host]."):
    return click.option("--group", help=help)


def key_type_option(help: str, default=DEFAULT_HOST_KEY_TYPE):
    return click.option("--key-type", type=click.Choice(KEY_TYPES), default=default,
                        show_default=default is not None, help=help)


def days_option(help: str = "Validity in days [default: 730, never past the CA's own].", default=None,
                maximum: int = 36500):
    return click.option("--days", type=click.IntRange(1, maximum), default=default,
                        show_default=default is not None, help=help)


def typed_options(*params: str) -> List[str]:
    """Those of `params` (parameter names) the user typed rather than left at their
    default, spelt as on the command line (`--cn`): for options that exclude others."""
    ctx = click.get_current_context()
    spelt = {p.name: p.opts[0] for p in ctx.command.params}
    return [spelt[n] for n in params if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]
