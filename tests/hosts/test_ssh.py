"""The parts of qemuca.hosts.ssh that need no server: ssh_config, known_hosts policy, argv quoting.

ssh-keygen and /bin/sh are the references: fingerprints and hashed names must be what
OpenSSH computes, and quoted argv must reach a real POSIX shell's program unchanged.
"""

from __future__ import annotations

import getpass
import io
import os
import stat
import subprocess
import threading

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from qemuca.errors import EXIT_HOST_KEY, HostKeyError, InvalidInput
from qemuca.hosts.known_hosts import (
    KnownHost,
    check_host_key,
    fingerprint,
    host_key_status,
    known_hosts_line,
    read_known_hosts,
)
from qemuca.hosts.ssh import COMMANDS, PROGRAMS, command, command_line
from qemuca.hosts.ssh_config import HostTarget, SshOptions, load_ssh_config, parse_jump, resolve
from tests.support.tools import require_tool

HOSTILE = ["a b", "it's", 'say "hi"', "$(touch /tmp/pwned)", "`id`", "; rm -rf /", "x\ny",
           "*", "-n", "", "\\", "$HOME", "a|b&c>d", "\t", "é ü"]


def ed25519() -> paramiko.PKey:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    return paramiko.Ed25519Key.from_private_key(io.StringIO(pem.decode()))


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def target(tmp_path, name="127.0.0.1", port=2222, alias=None, hashed=False) -> HostTarget:
    return HostTarget(alias="h1", hostname=name, port=port, user="root", host_key_alias=alias,
                      known_hosts_files=(str(tmp_path / "known_hosts"),), hash_known_hosts=hashed)


# ---------------------------------------------------------------- ssh_config


def test_resolve_applies_host_block(tmp_path):
    cfg = write(tmp_path / "config", f"""
Host web1 web2
    HostName 192.0.2.%h
    Port 2200
    User deploy
    IdentityFile ~/keys/a
    IdentityFile {tmp_path}/b
    IdentitiesOnly yes
    ProxyJump jumper
    ConnectTimeout 3
    UserKnownHostsFile {tmp_path}/kh1 {tmp_path}/kh2
    HostKeyAlias web-alias
Host *
    User nobody
    Port 22
""")
    t = resolve("web1", SshOptions(ssh_config=cfg))
    assert (t.hostname, t.port, t.user) == ("192.0.2.web1", 2200, "deploy")
    assert t.identity_files == (os.path.expanduser("~/keys/a"), f"{tmp_path}/b")
    assert t.identities_only and t.proxy_jump == "jumper" and t.connect_timeout == 3
    assert t.known_hosts_files == (f"{tmp_path}/kh1", f"{tmp_path}/kh2")
    assert t.known_hosts_name == "web-alias"  # HostKeyAlias: no [host]:port form


def test_resolve_defaults_like_openssh(tmp_path):
    t = resolve("Plain.Example", SshOptions(ssh_config=write(tmp_path / "config", "")))
    assert (t.hostname, t.port, t.user) == ("Plain.Example", 22, getpass.getuser())
    assert t.connect_timeout == 10 and t.proxy_jump is None and t.proxy_command is None
    assert t.known_hosts_files[0] == os.path.expanduser("~/.ssh/known_hosts")
    assert t.global_known_hosts_files[0] == "/etc/ssh/ssh_known_hosts"
    assert t.identity_files[0] == os.path.expanduser("~/.ssh/id_rsa")
    assert t.known_hosts_name == "plain.example"  # OpenSSH lowercases the host name


def test_command_line_options_override_config(tmp_path):
    cfg = write(tmp_path / "config", "Host h\n User deploy\n IdentityFile /k/cfg\n ConnectTimeout 30\n"
                                     " UserKnownHostsFile /k/kh\n")
    opts = SshOptions(ssh_config=cfg, user="root", identity_file="/k/cli", connect_timeout=2.5,
                      known_hosts=str(tmp_path / "kh"))
    t = resolve("h", opts)
    assert t.user == "root" and t.identity_files == ("/k/cli", "/k/cfg")
    assert t.connect_timeout == 2.5
    assert t.known_hosts_files == (str(tmp_path / "kh"),) and t.global_known_hosts_files == ()


def test_known_hosts_name_uses_bracket_form_for_other_ports(tmp_path):
    assert target(tmp_path, port=22).known_hosts_name == "127.0.0.1"
    assert target(tmp_path, port=2222).known_hosts_name == "[127.0.0.1]:2222"
    assert target(tmp_path, port=2222, alias="Box").known_hosts_name == "box"


def test_include_is_expanded_in_place(tmp_path):
    (tmp_path / "conf.d").mkdir()
    write(tmp_path / "conf.d" / "10-a.conf", "Host a\n HostName 10.0.0.1\n")
    write(tmp_path / "conf.d" / "20-b.conf", "Host b\n Port 2022\n")
    cfg = write(tmp_path / "config", f"Include {tmp_path}/conf.d/*.conf\nHost *\n User u\n")
    config = load_ssh_config(cfg)
    assert resolve("a", config=config).hostname == "10.0.0.1"
    assert resolve("b", config=config).port == 2022
    assert resolve("b", config=config).user == "u"


def test_proxyjump_none_and_bad_values(tmp_path):
    cfg = write(tmp_path / "config", "Host a\n ProxyJump none\nHost b\n Port x22\nHost *\n ProxyJump j\n")
    assert resolve("a", SshOptions(ssh_config=cfg)).proxy_jump is None
    with pytest.raises(InvalidInput, match="Port"):
        resolve("b", SshOptions(ssh_config=cfg))
    with pytest.raises(InvalidInput, match="no such file"):
        load_ssh_config(str(tmp_path / "missing"))


@pytest.mark.parametrize("spec, expected", [
    ("jump", (None, "jump", None)),
    ("admin@jump", ("admin", "jump", None)),
    ("admin@jump:2200", ("admin", "jump", 2200)),
    ("[::1]:2200", (None, "::1", 2200)),
    ("ssh://admin@jump:2200", ("admin", "jump", 2200)),
])
def test_parse_jump(spec, expected):
    assert parse_jump(spec) == expected


@pytest.mark.parametrize("spec", ["@jump", "jump:port", "a:b:c", ""])
def test_parse_jump_rejects(spec):
    with pytest.raises(InvalidInput):
        parse_jump(spec)


# ---------------------------------------------------------------- known_hosts


def test_fingerprint_matches_ssh_keygen(tmp_path):
    keygen = require_tool("ssh-keygen")
    key = ed25519()
    pub = write(tmp_path / "k.pub", f"{key.get_name()} {key.get_base64()}\n")
    out = subprocess.run([keygen, "-l", "-E", "sha256", "-f", pub], capture_output=True,
                         text=True, check=True).stdout
    assert out.split()[1] == fingerprint(key.asbytes())


def entry(hosts, key, keytype=None, marker=None):
    return KnownHost("kh", 1, hosts, keytype or key.get_name(), key.asbytes(), marker)


@pytest.mark.parametrize("hosts, name, hit", [
    ("[127.0.0.1]:2222", "[127.0.0.1]:2222", True),  # brackets are literal, not a class
    ("[127.0.0.1]:2222", "1", False),
    ("127.0.0.1", "[127.0.0.1]:2222", False),
    ("a.example,b.example", "B.EXAMPLE", True),
    ("*.example", "x.example", True),
    ("host?", "host1", True),
    ("host?", "host12", False),
    ("*.example,!bad.example", "bad.example", False),
])
def test_host_patterns(hosts, name, hit):
    assert entry(hosts, ed25519()).matches(name) is hit


def test_hashed_entries_written_by_ssh_keygen_match(tmp_path):
    keygen = require_tool("ssh-keygen")
    key = ed25519()
    kh = write(tmp_path / "kh", known_hosts_line("[127.0.0.1]:2222", key.get_name(), key.asbytes()) + "\n")
    subprocess.run([keygen, "-H", "-f", kh], capture_output=True, check=True)
    (e,) = read_known_hosts(kh)
    assert e.hosts.startswith("|1|") and e.matches("[127.0.0.1]:2222") and not e.matches("127.0.0.1")


def test_our_hashed_line_is_found_by_ssh_keygen(tmp_path):
    keygen = require_tool("ssh-keygen")
    key = ed25519()
    kh = write(tmp_path / "kh", known_hosts_line("[h]:2", key.get_name(), key.asbytes(), hashed=True) + "\n")
    out = subprocess.run([keygen, "-F", "[h]:2", "-f", kh], capture_output=True, text=True)
    assert out.returncode == 0 and key.get_base64() in out.stdout


def test_read_known_hosts_skips_comments_and_junk(tmp_path):
    key = ed25519()
    kh = write(tmp_path / "kh", f"# comment\n\ngarbage\nh ssh-ed25519 !!notbase64\n"
                                f"@revoked * {key.get_name()} {key.get_base64()}\n"
                                f"h {key.get_name()} {key.get_base64()} a comment\n")
    entries = read_known_hosts(kh)
    assert [(e.lineno, e.marker, e.hosts) for e in entries] == [(5, "@revoked", "*"), (6, None, "h")]
    assert read_known_hosts(str(tmp_path / "missing")) == []


def test_host_key_status_decisions():
    key, other, rsa = ed25519(), ed25519(), paramiko.RSAKey.generate(1024)
    blob, kt = key.asbytes(), key.get_name()
    assert host_key_status([entry("h", key)], "h", kt, blob)[0] == "ok"
    assert host_key_status([], "h", kt, blob) == ("unknown", None)
    assert host_key_status([entry("other", other)], "h", kt, blob)[0] == "unknown"
    assert host_key_status([entry("h", other)], "h", kt, blob)[0] == "changed"
    assert host_key_status([entry("h", rsa)], "h", kt, blob)[0] == "other-type"
    revoked = [entry("*", key, marker="@revoked"), entry("h", key)]
    assert host_key_status(revoked, "h", kt, blob)[0] == "revoked"
    assert host_key_status([entry("h", key, marker="@cert-authority")], "h", kt, blob)[0] == "unknown"
    # A second, matching line wins over an older different key of the same type (as in ssh).
    assert host_key_status([entry("h", other), entry("h", key)], "h", kt, blob)[0] == "ok"


def test_unknown_key_refused_with_fingerprint_and_line(tmp_path):
    key = ed25519()
    with pytest.raises(HostKeyError) as err:
        check_host_key(target(tmp_path), key)
    msg = str(err.value)
    assert err.value.exit_code == EXIT_HOST_KEY and "\n" not in msg and msg.startswith("h1: ")
    assert fingerprint(key.asbytes()) in msg and "=" not in fingerprint(key.asbytes())
    assert f"[127.0.0.1]:2222 ssh-ed25519 {key.get_base64()}" in msg
    assert not (tmp_path / "known_hosts").exists()


def test_accept_new_adds_once_then_strict_passes(tmp_path):
    key = ed25519()
    check_host_key(target(tmp_path), key, accept_new=True)
    kh = tmp_path / "known_hosts"
    assert kh.read_text() == f"[127.0.0.1]:2222 ssh-ed25519 {key.get_base64()}\n"
    assert stat.S_IMODE(kh.stat().st_mode) == 0o600
    check_host_key(target(tmp_path), key)  # strict now
    check_host_key(target(tmp_path), key, accept_new=True)
    assert len(kh.read_text().splitlines()) == 1


def test_changed_key_refused_even_with_accept_new(tmp_path):
    old, new = ed25519(), ed25519()
    kh = tmp_path / "known_hosts"
    kh.write_text("# mine\n" + known_hosts_line("[127.0.0.1]:2222", old.get_name(), old.asbytes()))
    before = kh.read_bytes()
    with pytest.raises(HostKeyError, match="CHANGED") as err:
        check_host_key(target(tmp_path), new, accept_new=True)
    assert fingerprint(new.asbytes()) in str(err.value) and fingerprint(old.asbytes()) in str(err.value)
    assert f"{kh}:2" in str(err.value)
    assert kh.read_bytes() == before


def test_other_key_type_is_not_accepted_as_new(tmp_path):
    rsa, key = paramiko.RSAKey.generate(1024), ed25519()
    line = known_hosts_line("[127.0.0.1]:2222", "ssh-rsa", rsa.asbytes())
    (tmp_path / "known_hosts").write_text(line + "\n")
    with pytest.raises(HostKeyError):
        check_host_key(target(tmp_path), key, accept_new=True)


def test_accept_new_keeps_mode_and_hashing_of_the_file(tmp_path):
    keygen = require_tool("ssh-keygen")
    a, b = ed25519(), ed25519()
    kh = tmp_path / "known_hosts"
    kh.write_text(known_hosts_line("other", a.get_name(), a.asbytes()))  # no final newline
    subprocess.run([keygen, "-H", "-f", str(kh)], capture_output=True, check=True)
    os.chmod(kh, 0o644)
    check_host_key(target(tmp_path), b, accept_new=True)
    lines = kh.read_text().splitlines()
    assert len(lines) == 2 and all(line.startswith("|1|") for line in lines)
    assert stat.S_IMODE(kh.stat().st_mode) == 0o644
    found = subprocess.run([keygen, "-F", "[127.0.0.1]:2222", "-f", str(kh)], capture_output=True, text=True)
    assert b.get_base64() in found.stdout
    check_host_key(target(tmp_path), b)


def test_accept_new_never_replaces_dev_null(tmp_path):
    t = HostTarget(alias="h1", hostname="h", known_hosts_files=("/dev/null",))
    check_host_key(t, ed25519(), accept_new=True)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_parallel_accept_new_writes_every_host_once(tmp_path):
    keys = [ed25519() for _ in range(8)]
    errors = []

    def accept(i):
        try:
            for _ in range(3):  # the same host from several threads, several times
                check_host_key(target(tmp_path, port=2000 + i % 4), keys[i % 4], accept_new=True)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=accept, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    lines = (tmp_path / "known_hosts").read_text().splitlines()
    assert sorted(lines) == sorted(known_hosts_line(f"[127.0.0.1]:{2000 + i}", "ssh-ed25519",
                                                    keys[i].asbytes()) for i in range(4))


# ---------------------------------------------------------------- commands


def run_in_sh(argv):
    """What a real POSIX shell hands to the program for our command line."""
    sh = require_tool("sh")
    line = command_line(["printf", "%s\\0", *argv[1:]]) if argv[0] == "printf" else command_line(argv)
    out = subprocess.run([sh, "-c", line], capture_output=True, check=True).stdout
    return out.decode().split("\0")[:-1]


def test_hostile_arguments_reach_the_program_literally(tmp_path):
    assert run_in_sh(["printf", *HOSTILE]) == HOSTILE
    assert not os.path.exists("/tmp/pwned")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\0",
                                                blacklist_categories=("Cs",))), max_size=5))
def test_quoting_round_trips(args):
    import shlex

    assert shlex.split(command_line(["printf", *args])) == ["printf", *args]


@pytest.mark.parametrize("argv", [["sh", "-c", "id"], ["/bin/cat"], "hostname -f", [], ["cat", "a\0b"],
                                  ["cat", b"bytes"]])
def test_commands_outside_the_allowlist_or_malformed_are_refused(argv):
    with pytest.raises(InvalidInput):
        command_line(argv)


def test_templates_fill_one_item_per_value():
    assert command("hostname_f") == ["hostname", "-f"]
    assert command("getent_group", group="x; rm -rf / #") == ["getent", "group", "x; rm -rf / #"]
    assert all(tpl[0] in PROGRAMS for tpl in COMMANDS.values())
    with pytest.raises(InvalidInput):
        command("getent_group")
    with pytest.raises(InvalidInput):
        command("no_such_template")


def test_an_include_or_known_hosts_that_is_no_regular_file_is_refused_at_once(tmp_path):
    """A FIFO would block forever and /dev/zero would never end: both are refused."""
    from qemuca.hosts.known_hosts import read_known_hosts

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target in (fifo, "/dev/zero"):
        config = tmp_path / "config"
        config.write_text(f"Host *\n    Include {target}\n")
        with pytest.raises(InvalidInput, match="not a regular file"):
            load_ssh_config(str(config))
    with pytest.raises(InvalidInput, match="not a regular file"):
        read_known_hosts(str(fifo))
    assert read_known_hosts("/dev/null") == []


def test_config_lookups_match_paramikos_own_with_host_and_match_blocks(tmp_path, monkeypatch):
    """qemuca skips paramiko's user lookup for Host blocks (it made a generated
    one-block-per-host config quadratic): every lookup must still equal paramiko's."""
    monkeypatch.delenv("USER", raising=False)
    monkeypatch.delenv("LOGNAME", raising=False)
    text = "\n".join([f"Host h{i}.example\n  Port {2200 + i}\n  User u{i}" for i in range(30)]
                     + ["Match host h3*\n  IdentityFile ~/.ssh/three",
                        "Match originalhost other.example\n  HostName 127.0.0.9",
                        "Host *\n  ConnectTimeout 7"])
    cfg = tmp_path / "config"
    cfg.write_text(text + "\n")
    ours = load_ssh_config(str(cfg))
    stock = paramiko.SSHConfig.from_text(text)
    for name in ["h0.example", "h3.example", "h29.example", "other.example", "nowhere.example"]:
        assert ours.lookup(name) == stock.lookup(name), name
    assert ours.lookup("h3.example")["port"] == "2203"
    assert ours.lookup("h3.example")["identityfile"][0].endswith("/.ssh/three")
    assert ours.lookup("other.example")["hostname"] == "127.0.0.9"
