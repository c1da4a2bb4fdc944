# qemuca.qemu_tls.host_credentials: runs on the controller, where qemuca and its CA store live.
#
# One host per task invocation (Ansible's forks give the parallelism). The host work is
# qemuca's own core (qemuca.ops.converge -> qemuca.ops.deploy / lifecycle), over qemuca's
# SSH transport with known_hosts checked: this file only maps Ansible's options and
# connection variables onto it and qemuca's report onto an Ansible result.
# Documentation: plugins/modules/host_credentials.py and docs/ansible.md.

from __future__ import annotations

import logging
import os
import re

from ansible.errors import AnsibleError
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
from ansible.plugins.action import ActionBase

try:
    from qemuca.errors import PassphraseError, QemucaError
    from qemuca.hosts import ssh as qemuca_ssh
    from qemuca.hosts.ssh_config import load_ssh_config
    from qemuca.names import host_name
    from qemuca.ops.ansible_target import AnsibleConnection, ssh_target
    from qemuca.ops.converge import NewCertOptions, converge_host
    from qemuca.ops.deploy import DeployOptions, HostReport, run_on_host
    from qemuca.ops.fleet import failure
    from qemuca.pki import profile
    from qemuca.pki.ca import CertificateAuthority
    from qemuca.store.index import Store
    from qemuca.text import one_line, printable_lines

    QEMUCA_IMPORT_ERROR = None
except ImportError as e:  # reported as the task's failure, not as a traceback
    QEMUCA_IMPORT_ERROR = e

# Each option is also read from the host variable of the same name (group_vars,
# host_vars) when the task does not give it; plugins/modules/host_credentials.py
# documents them (tests/ansible check that both say the same).
ARGUMENT_SPEC = {
    "qemuca_home": {"type": "path"},
    "qemuca_passphrase_file": {"type": "path", "no_log": False},
    "qemuca_known_hosts": {"type": "path"},
    "qemuca_ssh_config": {"type": "path"},
    "qemuca_accept_new_host_key": {"type": "bool", "default": False},
    "qemuca_timeout": {"type": "float", "default": 60.0},
    "qemu_tls_hostname": {"type": "str"},
    "qemu_tls_cert_dir": {"type": "str", "default": "/etc/pki/qemu"},
    "qemu_tls_group": {"type": "str"},
    "qemu_tls_force": {"type": "bool", "aliases": ["migrate_tls_force"]},
    "qemu_tls_default_dir": {"type": "bool", "default": False},
    "qemu_tls_restart": {"type": "bool", "default": False},
    "qemu_tls_manage_qemu_conf": {"type": "bool", "default": True},
    "qemu_tls_qemu_conf": {"type": "str", "default": "/etc/libvirt/qemu.conf"},
    "qemu_tls_replace_foreign": {"type": "bool", "default": False},
    "qemu_tls_key_type": {"type": "str", "default": "ecdsa-p256",
                          "choices": ["rsa2048", "rsa3072", "rsa4096", "ecdsa-p256", "ecdsa-p384"]},
    "qemu_tls_days": {"type": "int", "default": 730},
    "qemu_tls_sans": {"type": "list", "elements": "str", "default": []},
    "qemu_tls_renew_before_days": {"type": "int"},
}


# qemuca's messages name its command-line options; in a task the option is the module's.
CLI_OPTIONS = (("--accept-new-host-key", "qemuca_accept_new_host_key: true"), ("--home", "qemuca_home"),
               ("--passphrase-file", "qemuca_passphrase_file"),
               ("--no-qemu-conf", "qemu_tls_manage_qemu_conf: false"), ("--group", "qemu_tls_group"),
               ("use --force to replace them", "use qemu_tls_replace_foreign: true to replace them"))


def _for_ansible(text):
    for cli, option in CLI_OPTIONS:
        text = re.sub(re.escape(cli) + r"(?![\w-])", option, text)
    return one_line(text)


def _names(spec):
    for name, option in spec.items():
        yield name
        yield from option.get("aliases", ())


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False  # qemuca connects itself
    _supports_check_mode = True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        task_vars = task_vars or {}
        if QEMUCA_IMPORT_ERROR is not None:
            return self._failed(result, f"qemuca is not importable by the Python running Ansible "
                                        f"({QEMUCA_IMPORT_ERROR}): install qemuca into the same environment "
                                        "as ansible-core (docs/ansible.md)")
        try:
            args = self._arguments(task_vars)
        except AnsibleError as e:
            return self._failed(result, str(e))
        name = str(args["qemu_tls_hostname"] or task_vars.get("inventory_hostname"))
        warnings = []
        if self._play_context.become or self._task.become:
            warnings.append("become is not used: qemuca logs in over SSH as ansible_user, which must be root")
        try:
            host = host_name(name)
            report, operation, notes = self._converge(host, args, task_vars)
        except (QemucaError, OSError, ValueError) as e:  # options, store: before any host is touched
            return self._failed(result, _for_ansible(failure(name, e)[0]))
        warnings.extend(one_line(n) for n in notes)
        if warnings:
            result.setdefault("warnings", []).extend(warnings)
        result.update(self._result(report, operation))
        if report.result == "failed":
            return self._failed(result, _for_ansible(report.error or "failed"))
        return result

    # -- options

    def _arguments(self, task_vars):
        """Task arguments, else the host variables of the same names, validated."""
        given = dict(self._task.args)
        for name in _names(ARGUMENT_SPEC):
            if name not in given and name in task_vars:
                given[name] = self._templar.template(task_vars[name])
        if "migrate_tls_force" in given and "qemu_tls_force" in given:
            given.pop("migrate_tls_force")  # the task's or host's qemu_tls_force wins over the alias
        validation = ArgumentSpecValidator(ARGUMENT_SPEC).validate(given)
        errors = list(validation.errors.errors)  # the "Multiple" object itself is always true
        if errors:
            raise AnsibleError(one_line(str(errors[0])))
        return validation.validated_parameters

    def _connection_value(self, option, variables, task_vars):
        """What Ansible resolved for the host (connection plugin option), else its variables."""
        try:
            value = self._connection.get_option(option)
        except (AnsibleError, KeyError, AttributeError):
            value = None
        if value in (None, ""):
            for name in variables:
                if task_vars.get(name) not in (None, ""):
                    value = self._templar.template(task_vars[name])
                    break
        return None if value in (None, "") else value

    def _target(self, args, task_vars):
        get = self._connection_value
        ssh_args = " ".join(str(v) for v in (
            get("ssh_common_args", ("ansible_ssh_common_args",), task_vars),
            get("ssh_extra_args", ("ansible_ssh_extra_args",), task_vars)) if v)
        host = get("host", ("ansible_host", "ansible_ssh_host"), task_vars)
        if host == task_vars.get("inventory_hostname"):
            host = None  # no ansible_host: ssh_config's HostName applies, as with `ssh NAME`
        port = get("port", ("ansible_port", "ansible_ssh_port"), task_vars)
        user = get("remote_user", ("ansible_user", "ansible_ssh_user"), task_vars)
        key = get("private_key_file", ("ansible_ssh_private_key_file", "ansible_private_key_file"), task_vars)
        conn = AnsibleConnection(host=str(host) if host is not None else None,
                                 port=port,
                                 user=str(user) if user is not None else None,
                                 private_key_file=os.path.expanduser(str(key)) if key else None,
                                 ssh_args=ssh_args)
        return ssh_target(conn, known_hosts=args["qemuca_known_hosts"], ssh_config=args["qemuca_ssh_config"],
                          accept_new_host_key=args["qemuca_accept_new_host_key"],
                          command_timeout=args["qemuca_timeout"])

    # -- the work: qemuca's core, as `qemuca enroll` / `deploy` / `renew` run it

    def _converge(self, host, args, task_vars):
        from qemuca.cli import default_home
        from qemuca.cli.options import read_passphrase

        check = bool(self._task.check_mode)
        opts = DeployOptions(cert_dir=args["qemu_tls_cert_dir"], group=args["qemu_tls_group"],
                             qemu_conf=args["qemu_tls_manage_qemu_conf"],
                             qemu_conf_path=args["qemu_tls_qemu_conf"], force_tls=args["qemu_tls_force"],
                             default_dir=args["qemu_tls_default_dir"], restart=args["qemu_tls_restart"],
                             dry_run=check, force=args["qemu_tls_replace_foreign"])
        opts.tls_settings()  # a bad cert dir is refused before any connection
        new = NewCertOptions(key_type=args["qemu_tls_key_type"] or profile.DEFAULT_HOST_KEY_TYPE,
                             sans=tuple(args["qemu_tls_sans"] or ()), days=args["qemu_tls_days"],
                             renew_before_days=args["qemu_tls_renew_before_days"])
        new.validate()
        target = self._target(args, task_vars)
        passphrase_file = args["qemuca_passphrase_file"] or os.environ.get("QEMUCA_PASSPHRASE_FILE")

        def passphrase():
            if not passphrase_file:
                raise PassphraseError("the CA key is encrypted: give qemuca_passphrase_file "
                                      "(or QEMUCA_PASSPHRASE_FILE) to the task")
            return read_passphrase(passphrase_file)

        # paramiko logs a traceback from its own thread when a connection dies during the
        # handshake; qemuca reports that host in one line (as the CLI's ssh options do).
        paramiko_log = logging.getLogger("paramiko")
        if not any(isinstance(h, logging.NullHandler) for h in paramiko_log.handlers):
            paramiko_log.addHandler(logging.NullHandler())
        home = args["qemuca_home"] or os.environ.get("QEMUCA_HOME") or default_home()
        store = Store.open(home)
        try:
            authority = CertificateAuthority(store, passphrase)
            config = load_ssh_config(target.options.ssh_config)
            outcome = {}

            alias = str(task_vars.get("inventory_hostname") or host)  # what Ansible connects to

            def connect(_host):
                return qemuca_ssh.connect(alias, target.options, config, hostname=target.hostname,
                                          port=target.port, user=target.user)

            def work(conn, fs):
                converged = converge_host(conn, fs, authority, host, opts, new)
                outcome["converged"] = converged
                return converged.report

            report = run_on_host(host, connect, work)
            if not check:
                store.record_deployments([report])
        finally:
            store.close()
        converged = outcome.get("converged")
        return report, converged.operation if converged else None, converged.notes if converged else []

    # -- the result

    @staticmethod
    def _result(report: HostReport, operation):
        data = {k: v for k, v in report.as_dict().items() if k not in ("error",)}
        data["qemuca_result"] = data.pop("result")
        data["operation"] = operation
        data["changed"] = report.result in ("changed", "would-change")
        data["qemu_conf_diff"] = printable_lines(report.qemu_conf_diff)
        data["actions"] = [one_line(a) for a in report.actions]
        if report.qemu_group:
            data["qemu_group"] = dict(report.qemu_group, source=_for_ansible(report.qemu_group["source"]))
        diff = []
        if report.qemu_conf_diff:
            diff.append({"prepared": data["qemu_conf_diff"]})
        if data["changed"] and data["actions"]:
            verb = "would " if report.result == "would-change" else ""
            diff.append({"prepared": "\n".join(f"{report.host}: {verb}{a}" for a in data["actions"]) + "\n"})
        if diff:
            data["diff"] = diff
        return data

    @staticmethod
    def _failed(result, message):
        result["failed"] = True
        result["msg"] = message
        return result
