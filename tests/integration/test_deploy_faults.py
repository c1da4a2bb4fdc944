"""Faults during `qemuca deploy` other than a killed sshd (issue 7.2).

test_deploy.py kills the host at chosen steps. Here the host lives on and something
else goes wrong, each at exact steps (tests/support/faults.py explains why a step can be
hit exactly, without sleeps):

- the TCP connection drops (FIN or RST) after each writing SFTP operation of a deploy
  in turn, sshd staying up;
- the disk fills: a 64 KiB tmpfs over /etc/pki/qemu (or /etc/libvirt) left with 0, 1,
  2 ... free pages, so the new set runs out of space at each of its files in turn;
- a read-only file system (a read-only bind mount), for the certificates or for
  qemu.conf, and the connection dropping during the switch back that follows;
- the host hangs (every process stopped), before the SSH banner or mid-deploy.

After every fault the host must hold the old set or the new one whole (never a mix, see
test_deploy.host_set) and a qemu.conf libvirt reads; the error must name the cause; the
other hosts must not care; a rerun once the fault is gone must converge.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time
from typing import Dict, List, Optional, Tuple

import pytest

from tests.integration.test_deploy import (
    CERT_DIR,
    FAULTS,
    KILL_MATRIX_OUTCOMES,
    QEMU_CONF,
    arm_all,
    conf_state,
    host_set,
    reports_of,
    ssh_args,
    store_fp,
    tree,
    two_sets,
)
from tests.support.augeas import lens_read
from tests.support.fakehosts import FakeHost, process_gone
from tests.support.faults import FaultProxy, close_all, write_proxy_client_files
from tests.support.pki import assert_ok, issue, make_store, run_qemuca

pytestmark = [pytest.mark.sshd]

# sftp-server's log line of every operation that changes something on the host.
WRITING = r'^(open "[^"]*" flags WRITE|set "|fsync "|posix-rename |rename |symlink |mkdir |remove |rmdir )'
# (no "$": sftp-server ends its log lines with CR LF)
SWITCH = r'^posix-rename old "[^"]*" new "[^"]*/\.qemuca/current"'
CONF_RENAMED = r'^posix-rename old "[^"]*" new "/etc/libvirt/qemu\.conf"'
POINTER = r'^(symlink old "sets/[^"]+" new|posix-rename old "[^"]*" new "[^"]*/\.qemuca/(current|previous)")'
PAGE = 4096


class ActionProxy(FaultProxy):
    """A FaultProxy whose trigger does something other than killing the host:
    "drop" closes both TCP connections (FIN), "reset" aborts them (RST), "freeze"
    stops every process of the host (SIGSTOP) and holds the reply: a hung host."""

    def __init__(self, host: FakeHost, action: str = "drop"):
        assert action in ("drop", "reset", "freeze")
        self.action = action
        super().__init__(host)

    def _fire(self, src: socket.socket, dst: socket.socket) -> bool:
        if self.action == "freeze":
            self.host.freeze()
            return True  # the client waits for a reply that never comes
        if self.action == "reset":
            for s in (src, dst):  # linger 0: close() sends RST, not FIN
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            for s in (src, dst):
                try:  # wakes the other direction's recv(), which holds the socket
                    s.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
                s.close()
        return False  # "drop": the pump closes both (FIN)

    def ops_after_fault(self, timeout: float = 20.0) -> List[str]:
        """Writing operations the host ran after the one the fault hit, once its SFTP
        session has ended (call it after thaw(): requests queued while the host was
        frozen run then)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.log_lines()
            after = lines[lines.index(self.fired.rstrip("\r")) + 1:]
            if any(ln.startswith("session closed") for ln in after):
                return [ln for ln in after if re.search(WRITING, ln)]
            assert time.monotonic() < deadline, f"{self.host.name}: SFTP session never ended"
            time.sleep(0.05)


# --------------------------------------------------------------------- helpers


def deploy(home, names, ssh, *extra) -> Tuple[int, Dict[str, dict]]:
    proc = run_qemuca(home, "deploy", *names, *ssh, "--json", "--parallel", "25", *extra)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, reports_of(proc)


def deploy_ok(home, names, ssh, *extra) -> Dict[str, dict]:
    proc = assert_ok(run_qemuca(home, "deploy", *names, *ssh, "--json", "--parallel", "25", *extra))
    return reports_of(proc)


def pointers(host: FakeHost) -> Tuple[Optional[str], Optional[str]]:
    """(current, previous) set ids in the host's cert dir."""
    out = []
    for which in ("current", "previous"):
        link = host.path(f"{CERT_DIR}/.qemuca/{which}")
        out.append(os.path.basename(os.readlink(link)) if os.path.islink(link) else None)
    return out[0], out[1]


def litter(host: FakeHost) -> Tuple[int, int]:
    """(temp files and sets no pointer names in the cert dir, temp files by qemu.conf)."""
    temps = sum("qemuca-tmp" in k for k in tree(host, CERT_DIR))
    sets = host.path(f"{CERT_DIR}/.qemuca/sets")
    stray = [n for n in os.listdir(sets) if n not in pointers(host)] if sets.is_dir() else []
    return temps + len(stray), sum("qemuca-tmp" in k for k in tree(host, "/etc/libvirt"))


def which_set(host: FakeHost, old: Optional[str], new: str) -> str:
    """'old' / 'new' / 'none' for the set QEMU would load (host_set fails on a mix)."""
    fp = host_set(host)
    if fp is None:
        return "none"
    assert fp in (old, new), f"{host.name}: a set that is neither the old nor the new one"
    return "new" if fp == new else "old"


def short(line: str) -> str:
    """A log line as a matrix label: set ids and temp suffixes shortened."""
    line = re.sub(r"/etc/pki/qemu/", "", line.rstrip("\r"))
    line = re.sub(r"\.qemuca/sets/[0-9a-f]{16}", "<set>", line)
    line = re.sub(r"sets/[0-9a-f]{16}", "<set>", line)
    line = re.sub(r"\.qemuca-tmp-[0-9a-f]+", ".tmp", line)
    line = re.sub(r" (flags|mode|owner|group) .*$", lambda m: " " + m.group(0).split()[0] + "…", line)
    return line[:72]


def print_matrix(title: str, head: Tuple[str, ...], rows: List[tuple], controls: int = 0) -> None:
    """The matrix, and its totals. Every row passed host_set (which fails on a mix), so
    the mixed count is 0 by the time this prints."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    print(f"\n{title}")
    for row in (head, *rows):
        print(" | ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    print(f"fault points tried: {len(rows) - controls}" + (f" (+{controls} without fault)" if controls else "")
          + "; hosts left with a mixed set: 0")


def conf_check(hosts) -> None:
    """libvirt's lens reads every qemu.conf."""
    lens = lens_read([str(h.path(QEMU_CONF)) for h in hosts])
    assert all(res.error is None for res in lens.values()), lens


# ------------------------------------------- (a) the connection drops at every step


@pytest.mark.augeas
def test_connection_dropped_after_each_writing_step(fleet_factory, tmp_path):
    """Set B over A (A0 still kept, so old-set clean-up runs too) with a qemu.conf change:
    the connection drops after the 1st, 2nd, ... Nth writing SFTP operation, one host per
    step, sshd staying up. Each host holds A or B whole, exactly as far as the step went,
    and a rerun (nothing restarted) converges."""
    fleet = fleet_factory(1)
    reference = fleet[0]
    home = make_store(tmp_path)
    proxies: List[ActionProxy] = []
    try:
        # The reference host runs the same sequence without a fault: its log says how many
        # writing steps a deploy has and which step switches (so the sweep follows the code).
        ref_proxy = ActionProxy(reference)
        proxies.append(ref_proxy)
        _, ssh = proxied_fleet_config(proxies, fleet, tmp_path)
        deploy_ok(home, [reference.name], ssh, "--issue")
        issue(home, reference.name, force=True)
        deploy_ok(home, [reference.name], ssh)
        issue(home, reference.name, force=True)
        start = len(ref_proxy.log_lines())
        deploy_ok(home, [reference.name], ssh, "--force-tls")
        steps = [ln for ln in ref_proxy.log_lines()[start:] if re.search(WRITING, ln)]
        switch = next(i for i, ln in enumerate(steps, 1) if re.search(SWITCH, ln))
        conf = next(i for i, ln in enumerate(steps, 1) if re.search(CONF_RENAMED, ln))
        assert 30 <= len(steps) <= 200 and 1 < switch < conf <= len(steps), steps

        hosts = fleet.add_hosts([f"drop{i:02d}.qemu.test" for i in range(1, len(steps) + 1)])
        for i, h in enumerate(hosts, 1):
            proxies.append(ActionProxy(h, "reset" if i % 2 == 0 else "drop"))
        names, ssh = proxied_fleet_config(proxies, fleet, tmp_path)
        sweep = [h.name for h in hosts]
        deploy_ok(home, sweep, ssh, "--issue")
        issue(home, *sweep, force=True)
        deploy_ok(home, sweep, ssh)
        set_a = {n: store_fp(home, n) for n in sweep}
        conf_a = {h.name: h.read(QEMU_CONF) for h in hosts}
        issue(home, *sweep, force=True)
        set_b = {n: store_fp(home, n) for n in sweep}

        for i, proxy in enumerate(proxies[1:], 1):
            proxy.arm(short(steps[i - 1]), WRITING, nth=i)
        code, got = deploy(home, names, ssh, "--force-tls")
        assert code == 1
        assert got[reference.name]["result"] == "unchanged", got[reference.name]

        rows, state = [], {}
        for i, (host, proxy) in enumerate(zip(hosts, proxies[1:]), 1):
            assert proxy.fired, f"{host.name}: step {i} never came"
            assert short(proxy.fired) == proxy.label, (proxy.fired, proxy.label)
            assert not process_gone(host.pid), f"{host.name}: sshd died: a drop must leave it running"
            r = got[host.name]
            assert r["result"] == "failed" and host.name in r["error"], r
            assert "connection closed" in r["error"] or "reset" in r["error"].lower(), r["error"]
            state[host.name] = (which_set(host, set_a[host.name], set_b[host.name]),
                                conf_state(host, conf_a[host.name]))
            expected = ("new" if i >= switch else "old", "new" if i >= conf else "old")
            assert state[host.name] == expected, (i, proxy.label, state[host.name])
        conf_check(hosts)

        rerun = deploy_ok(home, sweep, ssh, "--force-tls")
        for i, (host, proxy) in enumerate(zip(hosts, proxies[1:]), 1):
            want = "unchanged" if state[host.name] == ("new", "new") else "changed"
            assert rerun[host.name]["result"] == want, (proxy.label, rerun[host.name])
            assert host_set(host) == set_b[host.name]
            assert conf_state(host, conf_a[host.name]) == "new"
            certs_litter, conf_litter = litter(host)
            assert certs_litter == 0, f"{proxy.label}: the rerun left old sets or temp files"
            rows.append((i, proxy.action, proxy.label, *state[host.name], rerun[host.name]["result"],
                         conf_litter))
    finally:
        close_all(proxies)
    print_matrix("connection dropped after writing step N (sshd alive)",
                 ("N", "how", "step", "set after", "qemu.conf", "rerun", "temp files by qemu.conf"), rows)


def proxied_fleet_config(proxies, fleet, tmp_path):
    """Names and ssh args reaching every proxied host of `fleet`."""
    config, known = write_proxy_client_files(proxies, fleet.identity, tmp_path)
    return [p.host.name for p in proxies], ssh_args(config, known)


@pytest.mark.augeas
def test_connection_dropped_at_the_kill_matrix_points(fleet_factory, tmp_path):
    """The fault points of test_deploy's kill matrix, the connection dropping instead:
    the same outcomes, and the rerun needs no restart."""
    fleet = fleet_factory(len(FAULTS))
    hosts = list(fleet)
    had_a = [h.name for h, f in zip(hosts, FAULTS) if f[3]]
    home = make_store(tmp_path)
    proxies = [ActionProxy(h, "drop") for h in hosts]
    rows = []
    try:
        names, ssh = proxied_fleet_config(proxies, fleet, tmp_path)
        set_a, conf_a, set_b = two_sets(home, hosts, had_a, lambda: deploy_ok(home, had_a, ssh, "--issue"))
        arm_all(proxies, FAULTS)
        code, got = deploy(home, names, ssh, "--force-tls")
        assert code == 1
        state = {}
        for host, proxy in zip(hosts, proxies):
            assert proxy.fired and not process_gone(host.pid), proxy.label
            assert got[host.name]["result"] == "failed", got[host.name]
            state[host.name] = (which_set(host, set_a.get(host.name), set_b[host.name]),
                                conf_state(host, conf_a[host.name]))
        conf_check(hosts)
        rerun = deploy_ok(home, names, ssh, "--force-tls")
        for host, proxy in zip(hosts, proxies):
            want = "unchanged" if state[host.name] == ("new", "new") else "changed"
            assert rerun[host.name]["result"] == want, (proxy.label, rerun[host.name])
            assert host_set(host) == set_b[host.name]
            rows.append((proxy.label, *state[host.name], rerun[host.name]["result"]))
    finally:
        close_all(proxies)
    print_matrix("connection dropped at the kill matrix's points",
                 ("fault point", "set after", "qemu.conf", "rerun"), rows)
    # As test_deploy's kill matrix: the host's files cannot tell the two apart.
    assert {label: (w, c) for label, w, c, _ in rows} == KILL_MATRIX_OUTCOMES


# -------------------------------------------------------------- (b) disk full


def fill(host: FakeHost, mount: str, pages_left: int) -> None:
    """Fill the tmpfs on `mount` until exactly `pages_left` pages are free."""
    st = os.statvfs(host.path(mount))
    free = st.f_bavail * st.f_frsize - pages_left * PAGE
    assert free >= 0, f"{host.name}: only {st.f_bavail} pages free on {mount}"
    host.write(f"{mount}/filler", b"\0" * free, 0o600)
    st = os.statvfs(host.path(mount))
    assert st.f_bavail == pages_left, (host.name, st.f_bavail, pages_left)


def small_tmpfs(host: FakeHost, mount: str, keep: Optional[str] = None) -> None:
    """A 64 KiB tmpfs over `mount` inside the host; `keep`: a file carried over."""
    data = host.read(keep) if keep else None
    host.run(["mkdir", "-p", mount])
    host.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=755", "qemuca-test-small", mount])
    if keep:
        host.write(keep, data, 0o600)


def test_disk_full_at_each_file_of_the_new_set(fleet_factory, tmp_path):
    """A full disk fails the host with ENOSPC named, before or after the switch, and the
    host keeps its previous set (and qemu.conf); the others are unaffected; a rerun
    after space is freed converges."""
    pages = list(range(0, 6))  # free pages left on the cert dir's tmpfs
    fleet = fleet_factory(len(pages) + 2)
    certs_full = fleet.hosts[:len(pages)]
    conf_full, healthy = fleet.hosts[len(pages)], fleet.hosts[-1]
    for h in certs_full:
        small_tmpfs(h, CERT_DIR)
    small_tmpfs(conf_full, "/etc/libvirt", keep=QEMU_CONF)
    home = make_store(tmp_path)
    ssh = ssh_args(fleet.ssh_config, fleet.known_hosts)
    deploy_ok(home, fleet.names, ssh, "--issue")
    set_a = {n: store_fp(home, n) for n in fleet.names}
    conf_a = {h.name: h.read(QEMU_CONF) for h in fleet}
    for h, left in zip(certs_full, pages):
        fill(h, CERT_DIR, left)
    fill(conf_full, "/etc/libvirt", 0)
    issue(home, *fleet.names, force=True)
    set_b = {n: store_fp(home, n) for n in fleet.names}

    code, got = deploy(home, fleet.names, ssh, "--force-tls")
    assert code == 1
    assert got[healthy.name]["result"] == "changed" and host_set(healthy) == set_b[healthy.name]
    rows, outcomes = [], []
    for h, left in [*zip(certs_full, pages), (conf_full, 0)]:
        r = got[h.name]
        state = (which_set(h, set_a[h.name], set_b[h.name]), conf_state(h, conf_a[h.name]))
        where = "qemu.conf dir" if h is conf_full else "cert dir"
        if r["result"] == "failed":
            assert "No space left on device (ENOSPC)" in r["error"], r["error"]
            assert state == ("old", "old"), (h.name, state)
            hit = re.search(r"\(\S+:(\S+)\)$", r["error"]).group(1)
        else:
            assert r["result"] == "changed" and state == ("new", "new"), (r, state)
            hit = "-"
        if h is not conf_full:
            outcomes.append(r["result"])
        rows.append((where, left, r["result"], *state, short(hit)))
    # Each extra free page lets the set get one file further; enough pages let it through.
    assert outcomes[0] == "failed" and outcomes[-1] == "changed", outcomes
    assert outcomes == sorted(outcomes, key=lambda x: x != "failed"), outcomes
    failed_at = [row[-1] for row in rows[:len(pages)] if row[2] == "failed"]
    assert len(set(failed_at)) == len(failed_at) >= 3, failed_at  # a different file each time
    assert got[conf_full.name]["result"] == "failed"  # after the switch: switched back
    assert "qemu.conf" in got[conf_full.name]["error"]

    for h in [*certs_full, conf_full]:
        mount = "/etc/libvirt" if h is conf_full else CERT_DIR
        os.unlink(h.path(f"{mount}/filler"))
    rerun = deploy_ok(home, fleet.names, ssh, "--force-tls")
    for h in fleet:
        want = "unchanged" if h is healthy or got[h.name]["result"] == "changed" else "changed"
        assert rerun[h.name]["result"] == want, rerun[h.name]
        assert host_set(h) == set_b[h.name]
        assert conf_state(h, conf_a[h.name]) == "new"
    print_matrix("disk full (64 KiB tmpfs, N free 4 KiB pages left)",
                 ("full", "pages free", "result", "set after", "qemu.conf", "ENOSPC at"), rows,
                 controls=sum(r[2] == "changed" for r in rows))


# ------------------------------------------------------- (c) read-only file system


def read_only(host: FakeHost, path: str) -> None:
    host.run(["mount", "--bind", path, path])
    host.run(["mount", "-o", "remount,bind,ro", path])


def test_read_only_dirs_and_a_drop_during_the_switch_back(fleet_factory, tmp_path):
    """Read-only cert dir: refused before anything changes (EROFS named). Read-only
    /etc/libvirt: the set is switched in, qemu.conf cannot be written, the host is
    switched back, and the connection dropping at each step of that switch back still
    leaves one whole set in use with the previous one reachable (as current or as
    previous, for `qemuca rollback`)."""
    drop_steps = [None, 5, 6, 7, 8]  # pointer operations 1-4 are the install's own
    fleet = fleet_factory(len(drop_steps) + 2)
    ro_certs, healthy = fleet.hosts[0], fleet.hosts[-1]
    ro_conf = fleet.hosts[1:-1]
    home = make_store(tmp_path)
    proxies = [ActionProxy(h, "drop") for h in fleet]
    rows = []
    try:
        names, ssh = proxied_fleet_config(proxies, fleet, tmp_path)
        deploy_ok(home, names, ssh, "--issue")
        set_a = {n: store_fp(home, n) for n in names}
        id_a = {h.name: pointers(h)[0] for h in fleet}
        conf_a = {h.name: h.read(QEMU_CONF) for h in fleet}
        read_only(ro_certs, CERT_DIR)
        for h in ro_conf:
            read_only(h, "/etc/libvirt")
        issue(home, *names, force=True)
        set_b = {n: store_fp(home, n) for n in names}
        for _h, proxy, step in zip(ro_conf, proxies[1:], drop_steps):
            if step is not None:
                proxy.arm(f"switch back, pointer step {step}", POINTER, nth=step)

        code, got = deploy(home, names, ssh, "--force-tls")
        assert code == 1
        assert got[healthy.name]["result"] == "changed" and host_set(healthy) == set_b[healthy.name]
        r = got[ro_certs.name]
        assert r["result"] == "failed" and "Read-only file system (EROFS)" in r["error"], r
        assert (which_set(ro_certs, set_a[ro_certs.name], set_b[ro_certs.name]),
                conf_state(ro_certs, conf_a[ro_certs.name])) == ("old", "old")
        rows.append(("cert dir read-only", "-", "old", "old", pointers(ro_certs)[0] == id_a[ro_certs.name]))
        for h, proxy, step in zip(ro_conf, proxies[1:], drop_steps):
            r = got[h.name]
            assert r["result"] == "failed", r
            assert "Read-only file system (EROFS)" in r["error"] and "qemu.conf" in r["error"], r
            assert step is None or proxy.fired, proxy.label
            use = which_set(h, set_a[h.name], set_b[h.name])
            assert conf_state(h, conf_a[h.name]) == "old"
            current, previous = pointers(h)
            reachable = id_a[h.name] in (current, previous)
            assert reachable, f"{h.name}: {proxy.label}: the previous set is no longer reachable " \
                              f"(current {current}, previous {previous}, old {id_a[h.name]})"
            if step is None:
                assert use == "old", "not switched back"
            rows.append(("qemu.conf dir read-only", step or "none", use, "old", reachable))
        conf_check(list(fleet))

        ro_certs.run(["umount", CERT_DIR])
        for h in ro_conf:
            h.run(["umount", "/etc/libvirt"])
        rerun = deploy_ok(home, names, ssh, "--force-tls")
        for h in fleet:
            assert rerun[h.name]["result"] == ("unchanged" if h is healthy else "changed"), rerun[h.name]
            assert host_set(h) == set_b[h.name] and conf_state(h, conf_a[h.name]) == "new"
    finally:
        close_all(proxies)
    print_matrix("read-only file systems (EROFS), drops during the switch back",
                 ("read-only", "drop at", "set after", "qemu.conf", "old set reachable"), rows)


# ----------------------------------------------------------------- (d) hung hosts

HANGS = [  # (label, trigger: sftp log regex or "connect" or None for a healthy host)
    ("hung before the SSH banner", "connect"),
    ("hung at the 1st upload (before the switch)", r'^open "[^"]*/\.qemuca/sets/[^"]+/[^"]*" flags WRITE'),
    ("hung right after the switch", SWITCH),
    ("hung during the qemu.conf write", r'^open "/etc/libvirt/\.qemu\.conf\.qemuca-tmp'),
    ("healthy", None),
]
CONNECT_TIMEOUT, COMMAND_TIMEOUT = 2, 3


@pytest.mark.augeas
def test_hung_hosts_time_out_and_the_others_finish(fleet_factory, tmp_path):
    """Frozen hosts (every process SIGSTOPped: TCP still accepts, nothing answers) fail
    with "timed out" after --connect-timeout / --timeout; the healthy host is deployed;
    the run ends in bounded time; a hung host gets no request after the batch it hung
    in; once thawed, the hosts hold a whole set and a rerun converges."""
    fleet = fleet_factory(len(HANGS))
    hosts = list(fleet)
    home = make_store(tmp_path)
    proxies = [ActionProxy(h, "freeze") for h in hosts]
    rows = []
    try:
        names, ssh = proxied_fleet_config(proxies, fleet, tmp_path)
        deploy_ok(home, names, ssh, "--issue")
        set_a = {n: store_fp(home, n) for n in names}
        conf_a = {h.name: h.read(QEMU_CONF) for h in hosts}
        issue(home, *names, force=True)
        set_b = {n: store_fp(home, n) for n in names}
        for proxy, (label, trigger) in zip(proxies, HANGS):
            if trigger == "connect":
                proxy.arm_connect(label)
            elif trigger:
                proxy.arm(label, trigger)
        t0 = time.monotonic()
        code, got = deploy(home, names, ssh, "--force-tls", "--connect-timeout", str(CONNECT_TIMEOUT),
                           "--timeout", str(COMMAND_TIMEOUT))
        elapsed = time.monotonic() - t0
        assert code == 1
        assert elapsed < 60, f"a run with hung hosts took {elapsed:.1f} s"
        for host, proxy, (label, trigger) in zip(hosts, proxies, HANGS):
            r = got[host.name]
            if trigger is None:
                assert r["result"] == "changed", r
                continue
            assert proxy.fired, label
            assert r["result"] == "failed" and "timed out after" in r["error"], (label, r)
            want = CONNECT_TIMEOUT if trigger == "connect" else COMMAND_TIMEOUT
            assert f"timed out after {want}s" in r["error"], (label, r["error"])
        for host in hosts:
            host.thaw()
        for proxy, (label, trigger) in zip(proxies, HANGS):
            if trigger not in (None, "connect"):  # hung up at once: nothing more was asked
                # (but the rest of the batch it hung in: requests of the same kind, sent with it)
                assert [op for op in proxy.ops_after_fault() if not re.match(trigger, op)] == [], label
        for host, _proxy, (label, _trigger) in zip(hosts, proxies, HANGS):
            state = (which_set(host, set_a[host.name], set_b[host.name]), conf_state(host, conf_a[host.name]))
            rows.append([label, got[host.name]["result"], *state])
        conf_check(hosts)
        rerun = deploy_ok(home, names, ssh, "--force-tls")
        for row, host in zip(rows, hosts):
            row.append(rerun[host.name]["result"])
            assert host_set(host) == set_b[host.name] and conf_state(host, conf_a[host.name]) == "new"
    finally:
        for h in hosts:
            h.thaw()
        close_all(proxies)
    print_matrix(f"hung hosts (--connect-timeout {CONNECT_TIMEOUT} --timeout {COMMAND_TIMEOUT}); "
                 f"whole run {elapsed:.1f} s", ("hang", "result", "set after", "qemu.conf", "rerun"),
                 [tuple(r) for r in rows], controls=1)
    assert [tuple(r[2:4]) for r in rows] == [("old", "old"), ("old", "old"), ("new", "old"),
                                            ("new", "old"), ("new", "new")]
