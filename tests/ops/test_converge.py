"""qemuca.ops.converge (what the store decides per host) and qemuca.ops.ansible_target (an
Ansible host's connection variables as qemuca's SSH target), plus the collection's option
table against its documentation. The host work itself runs against fake hosts in
tests/integration/test_ansible.py.
"""

from __future__ import annotations

import ast
import datetime as dt
from pathlib import Path

import pytest
import yaml

from qemuca.errors import InvalidInput
from qemuca.ops.ansible_target import AnsibleConnection, ssh_target
from qemuca.ops.converge import DEPLOY, ENROLL, RENEW, NewCertOptions, _notes, decide
from qemuca.pki import profile
from qemuca.store.index import Store, parse_iso
from tests.support.pki import issue, make_store

COLLECTION = Path(__file__).resolve().parents[2] / "ansible" / "qemuca" / "qemu_tls"


# ---------------------------------------------------------------- decide


def test_decide_enroll_renew_deploy_from_the_index(tmp_path):
    home = make_store(tmp_path)
    (new,) = issue(home, "hv1.example", days=100)
    store = Store.open(home)
    try:
        assert decide(store, "hv2.example", None) == (ENROLL, None)
        op, record = decide(store, "hv1.example", None)
        assert (op, record.serial) == (DEPLOY, new.record.serial)
        ends = parse_iso(new.record.not_after)
        # renew_before_days: due when the end falls within the window, else deploy
        assert decide(store, "hv1.example", 99)[0] == DEPLOY
        assert decide(store, "hv1.example", 101)[0] == RENEW
        # an ended certificate is renewed even without renew_before_days
        assert decide(store, "hv1.example", None, now=ends + dt.timedelta(seconds=1))[0] == RENEW
    finally:
        store.close()


def test_settings_that_differ_from_the_record_are_noted(tmp_path):
    home = make_store(tmp_path)
    (new,) = issue(home, "hv1.example", sans=["10.0.0.1"], key_type="ecdsa-p256")
    record = new.record
    assert _notes(record, NewCertOptions(sans=("10.0.0.1",))) == []
    assert _notes(record, NewCertOptions()) == []  # no SANs asked: nothing to compare
    (note,) = _notes(record, NewCertOptions(sans=("10.0.0.2",)))
    assert "10.0.0.1" in note and "qemuca rekey hv1.example" in note
    (note,) = _notes(record, NewCertOptions(key_type="rsa3072"))
    assert "--key-type rsa3072" in note


@pytest.mark.parametrize("options, needle", [
    (NewCertOptions(key_type="dsa1024"), "unknown key type"),
    (NewCertOptions(sans=("not a name!",)), "invalid host name"),
    (NewCertOptions(renew_before_days=-1), "negative"),
])
def test_new_cert_options_are_validated(options, needle):
    with pytest.raises(InvalidInput, match=needle):
        options.validate()


# ---------------------------------------------------------------- ansible_target


def test_connection_variables_become_the_ssh_target():
    t = ssh_target(AnsibleConnection(host="192.0.2.7", port=2222, user="root", private_key_file="/k",
                                     ssh_args="-o ControlMaster=auto -o UserKnownHostsFile=/kh -o ConnectTimeout=7"))
    assert (t.hostname, t.port, t.user) == ("192.0.2.7", 2222, "root")
    o = t.options
    assert (o.known_hosts, o.identity_file, o.connect_timeout, o.accept_new_host_key) == ("/kh", "/k", 7.0, False)
    # -o key value, attached -oKey=value, -F/-i/-p/-l; the first value given wins (OpenSSH)
    t = ssh_target(AnsibleConnection(ssh_args="-o 'UserKnownHostsFile /a /b' -oUserKnownHostsFile=/c -F /cfg "
                                              "-i /id -p 2200 -l admin"))
    assert (t.options.known_hosts, t.options.ssh_config, t.options.identity_file) == ("/a", "/cfg", "/id")
    assert (t.port, t.user) == (2200, "admin")
    # explicit options win over the arguments; accept-new maps to accept_new_host_key
    t = ssh_target(AnsibleConnection(ssh_args="-o UserKnownHostsFile=/kh -o StrictHostKeyChecking=accept-new"),
                   known_hosts="/mine")
    assert (t.options.known_hosts, t.options.accept_new_host_key) == ("/mine", True)
    assert ssh_target(AnsibleConnection()).options.known_hosts is None  # qemuca's own default


@pytest.mark.parametrize("conn, needle", [
    (AnsibleConnection(ssh_args="-o StrictHostKeyChecking=no"), "always checks host keys"),
    (AnsibleConnection(ssh_args="-o UserKnownHostsFile=/dev/null"), "/dev/null"),
    (AnsibleConnection(ssh_args="-J bastion"), "ssh_config"),
    (AnsibleConnection(ssh_args="-o ProxyCommand='nc %h %p'"), "ssh_config"),
    (AnsibleConnection(ssh_args="-o 'unbalanced"), "ansible_ssh_common_args"),
    (AnsibleConnection(ssh_args="-o"), "no value"),
    (AnsibleConnection(port="ssh"), "not a number"),
    (AnsibleConnection(port=70000), "not a TCP port"),
])
def test_arguments_qemuca_cannot_honour_are_refused(conn, needle):
    with pytest.raises(InvalidInput, match=needle):
        ssh_target(conn)


# ---------------------------------------------------------------- the collection's options


def _literal(path: Path, name: str):
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name:
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not in {path}")


def test_the_action_plugin_takes_exactly_the_documented_options():
    spec = _literal(COLLECTION / "plugins/action/host_credentials.py", "ARGUMENT_SPEC")
    doc = yaml.safe_load(_literal(COLLECTION / "plugins/modules/host_credentials.py", "DOCUMENTATION"))
    options = doc["options"]
    assert set(spec) == set(options)
    for name, option in spec.items():
        documented = options[name]
        assert documented["type"] == option["type"], name
        assert documented.get("default") == option.get("default"), name
        assert documented.get("aliases", []) == option.get("aliases", []), name
        assert documented.get("choices") == option.get("choices"), name
    assert options["qemu_tls_key_type"]["choices"] == list(profile.KEY_TYPES)
    assert options["qemu_tls_days"]["default"] == profile.DEFAULT_HOST_DAYS
    for name in ("RETURN", "EXAMPLES"):
        yaml.safe_load(_literal(COLLECTION / "plugins/modules/host_credentials.py", name))
