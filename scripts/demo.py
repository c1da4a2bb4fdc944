"""qemuca's main job end to end on a throwaway fleet on loopback (run by scripts/demo.sh).

Three fake hypervisors, exactly like the test suite's (a real sshd and a real libvirtd
each, in its own mount and UTS namespaces, with its own /etc): a QEMU CA with an
encrypted key, keys made on the hosts (enroll), qemu.conf's TLS settings and libvirtd
restarted, every check verify makes, a real encrypted QEMU migration (probe), a guest
moved by `virsh migrate --live --tls`, the monitoring check, and a rotation (renew)
while libvirt keeps migrating the guest back and forth. Each step is printed as you
would type it, then its output. Everything is removed at the end, on failure and on
Ctrl-C too; --keep leaves the fleet up (until Ctrl-C) and says how to use it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.fakehosts import DEFAULT_QEMU_CONF, start_fleet  # noqa: E402
from tests.support.libvirt import Libvirtd, start_libvirtds  # noqa: E402

HOSTS = ["hv1.demo.test", "hv2.demo.test", "hv3.demo.test"]
STOCK_QEMU_CONF = ROOT / "tests" / ".cache" / "qemu.conf"  # Debian's, by fetch-stock-qemu-conf.sh
QEMUCA = [sys.executable, "-m", "qemuca"]
LOOPBACK = ("--address", "127.0.0.1")  # every fake host listens on loopback: the migration network


class DemoFailed(Exception):
    pass


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def qemuca(*args: str, env: dict, show: bool = True, check: bool = True) -> subprocess.CompletedProcess:
    """Run `qemuca ARGS` as a user would type it; its output goes straight to the terminal."""
    if show:
        print(f"$ qemuca {' '.join(shlex.quote(a) for a in args)}", flush=True)
    proc = subprocess.run([*QEMUCA, *args], env=env, stdin=subprocess.DEVNULL,
                          capture_output=not show, text=True)
    if check and proc.returncode != 0:
        raise DemoFailed(f"'qemuca {' '.join(args)}' exited {proc.returncode}")
    return proc


def probe_once(env: dict, src: str, dst: str) -> dict:
    proc = qemuca("probe", src, dst, *LOOPBACK, "--json", env=env, show=False, check=False)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        report = None
    if not isinstance(report, dict):
        return {"result": "fail", "error": (proc.stderr or proc.stdout).strip()[:500]}
    return report


def virsh_migrate(src: Libvirtd, dst: Libvirtd, guest: str, show: bool = True) -> subprocess.CompletedProcess:
    """`virsh migrate --live --tls` as an admin types it (the socket URIs of the fake hosts)."""
    args = ["migrate", "--live", "--tls", guest, dst.uri]
    if show:
        print(f"$ virsh -c '{src.uri}' {' '.join(shlex.quote(a) for a in args)}", flush=True)
    proc = src.virsh(*args, timeout=120)
    if show:
        print((proc.stdout + proc.stderr).strip() or f"{guest}: now running on {dst.name}", flush=True)
    return proc


def rotate_while_migrating(env: dict, a: Libvirtd, b: Libvirtd, guest: str) -> None:
    """renew every host while libvirt keeps migrating the guest a -> b and back."""
    results: List[subprocess.CompletedProcess] = []
    stop = threading.Event()

    def migrate_back_and_forth() -> None:
        src, dst = a, b
        while not stop.is_set() or len(results) < 2:
            proc = virsh_migrate(src, dst, guest, show=False)
            results.append(proc)
            if proc.returncode == 0:
                src, dst = dst, src
            else:
                time.sleep(0.5)

    worker = threading.Thread(target=migrate_back_and_forth)
    worker.start()
    try:
        qemuca("renew", "--all", env=env)
    finally:
        stop.set()
        worker.join()
    failed = [r for r in results if r.returncode != 0]
    print(f"{len(results)} live TLS migrations by libvirt ran during the rotation, {len(failed)} failed",
          flush=True)
    if failed:
        raise DemoFailed(f"a migration failed during the rotation: {failed[0].stderr.strip()}")


def run_demo(work: Path, keep: bool) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QEMUCA_")}
    passphrase = work / "passphrase"
    passphrase.write_text(os.urandom(18).hex() + "\n")
    passphrase.chmod(0o600)
    say("three throwaway hypervisors on loopback: real sshd, own namespaces and /etc")
    qemu_conf = STOCK_QEMU_CONF.read_text() if STOCK_QEMU_CONF.is_file() else DEFAULT_QEMU_CONF
    fleet = start_fleet(len(HOSTS), work / "fleet", names=HOSTS, qemu_conf=qemu_conf)
    try:
        daemons = start_libvirtds(list(fleet))
        for h, d in zip(fleet, daemons):
            print(f"{h.name}: sshd on 127.0.0.1:{h.port}, libvirtd (migrations on {d.address})")
        env.update(QEMUCA_HOME=str(work / "ca"), QEMUCA_PASSPHRASE_FILE=str(passphrase),
                   QEMUCA_SSH_CONFIG=str(fleet.ssh_config), QEMUCA_KNOWN_HOSTS=str(fleet.known_hosts))
        print("export QEMUCA_HOME QEMUCA_PASSPHRASE_FILE  # the store and its passphrase file\n"
              "export QEMUCA_SSH_CONFIG QEMUCA_KNOWN_HOSTS  # the fleet's ssh_config, known_hosts")
        say("the QEMU CA, its key encrypted with the passphrase file")
        qemuca("init", "--org", "qemuca demo", env=env)
        say("enroll: keys made on the hosts, CSRs signed here; sets and qemu.conf placed, libvirtd restarted")
        qemuca("enroll", *HOSTS, "--force-tls", "--restart", env=env)
        say("verify: every check QEMU and libvirt make, per host")
        qemuca("verify", "--all", env=env)
        say("probe: a real encrypted QEMU migration between two hosts; a plain one refused")
        qemuca("probe", HOSTS[0], HOSTS[1], *LOOPBACK, env=env)
        say("libvirt: a guest on hv1 moved live over TLS, as admins do it")
        one, two = daemons[0], daemons[1]
        created = one.create_guest("guest1")
        if created.returncode != 0:
            raise DemoFailed(f"virsh create: {created.stderr.strip()}")
        if virsh_migrate(one, two, "guest1").returncode != 0:
            raise DemoFailed("virsh migrate --live --tls failed")
        plain = two.virsh("migrate", "--live", "guest1", one.uri)
        print(f"without --tls (migrate_tls_force = 1): {(plain.stderr or plain.stdout).strip()}", flush=True)
        if plain.returncode == 0:
            raise DemoFailed("a plain migration went through despite migrate_tls_force")
        say("monitoring: OK / WARNING / CRITICAL")
        qemuca("check", env=env)
        say("rotation: renew every host while libvirt keeps migrating the guest back and forth")
        rotate_while_migrating(env, two, one, "guest1")
        qemuca("list", env=env)
        qemuca("verify", "--all", env=env, show=False)
        print("\nqemuca demo: OK (CA, enrolled hosts, qemu.conf, verify, encrypted migrations by\n"
              "QEMU and by libvirt, check, and a rotation without a failed migration)", flush=True)
        if keep:
            print("\nThe fleet stays up until Ctrl-C. In another shell:\n"
                  f"  export QEMUCA_HOME={env['QEMUCA_HOME']} QEMUCA_PASSPHRASE_FILE={passphrase}\n"
                  f"  export QEMUCA_SSH_CONFIG={fleet.ssh_config} QEMUCA_KNOWN_HOSTS={fleet.known_hosts}\n"
                  f"  {ROOT}/.venv/bin/qemuca probe --matrix --all\n"
                  f"  virsh -c '{daemons[0].uri}' list --all\n"
                  f"  ssh -F {fleet.ssh_config} {HOSTS[0]} ls -l /etc/pki/qemu", flush=True)
            while True:
                time.sleep(3600)
    finally:
        fleet.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="leave the fleet up until Ctrl-C")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qd-"))  # short: unix socket paths live below it
    started = time.monotonic()
    try:
        run_demo(work, args.keep)
    except DemoFailed as e:
        print(f"\nqemuca demo: FAILED: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nqemuca demo: interrupted; the fleet is stopped and removed", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"({time.monotonic() - started:.0f} s; the fleet and every file of the demo are removed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
