#!/usr/bin/env python3
"""Benchmark `qemuca issue` against the bare `cryptography` floor and an openssl loop.

Issue 2: one `qemuca issue --hosts-file` run over N hosts on a fresh store, per key
type, next to (a) the floor: the same profile built and signed with plain
`cryptography`, key and cert PEM written to files (no index, no fsync), in its own
process, and (b) a shell loop of `openssl genpkey + req + x509` per host with a SAN
extension file. All three sign with the same CA (the one `qemuca init` made), so the
only difference is the tool. Every side is a child process timed from outside (wall
and CPU), so interpreter start-up counts for Python as it counts for openssl.

    python3 bench/bench_issue.py            # 200 hosts, ecdsa-p256 rsa2048 rsa3072
    python3 bench/bench_issue.py --quick    # 20 hosts, smoke run

Results: a table on stdout and JSON in bench/results/ (git-ignored).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from qemuca.findings import FAIL

HERE = Path(__file__).resolve().parent
KEY_TYPES = ("ecdsa-p256", "rsa2048", "rsa3072")
RSA_FLOOR_RATIO = 1.3  # target: qemuca within 1.3x of the floor for RSA
P256_MS = 3.0  # target: at most 3 ms per P-256 certificate, index durably written
OPENSSL_GENPKEY = {
    "ecdsa-p256": "-algorithm EC -pkeyopt ec_paramgen_curve:P-256",
    "ecdsa-p384": "-algorithm EC -pkeyopt ec_paramgen_curve:P-384",
    "rsa2048": "-algorithm RSA -pkeyopt rsa_keygen_bits:2048",
    "rsa3072": "-algorithm RSA -pkeyopt rsa_keygen_bits:3072",
    "rsa4096": "-algorithm RSA -pkeyopt rsa_keygen_bits:4096",
}

# The openssl side: one process per step, as an admin's script would do it.
OPENSSL_LOOP = r"""set -eu
while read -r h; do
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:%s\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n' "$h" > "$h.ext"
  openssl genpkey $GENPKEY -out "$h-key.pem" 2>>openssl.log
  openssl req -new -key "$h-key.pem" -subj "/CN=$h" -out "$h.csr" 2>>openssl.log
  openssl x509 -req -in "$h.csr" -CA "$CA_CERT" -CAkey "$CA_KEY" -days 730 -sha256 \
    -extfile "$h.ext" -out "$h-cert.pem" 2>>openssl.log
done < "$HOSTS"
"""


# ---------------------------------------------------------------- the floor (child process)

def floor_worker(ca_dir: str, hosts_file: str, out_dir: str, key_type: str) -> None:
    """Per host: key, the qemuca host profile built and signed, two PEM files. Nothing else.

    Plain `cryptography` with its default API (qemuca is not imported), so it measures
    what issuing costs without qemuca's index, validation and output.
    """
    t0 = time.perf_counter()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    with open(os.path.join(ca_dir, "ca-cert.pem"), "rb") as f:
        ca_cert = x509.load_pem_x509_certificate(f.read())
    with open(os.path.join(ca_dir, "ca-key.pem"), "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), password=None)
    with open(hosts_file, encoding="utf-8") as f:
        hosts = [line.strip() for line in f if line.strip()]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    digest = (hashes.SHA384() if isinstance(ca_key, ec.EllipticCurvePrivateKey)
              and ca_key.curve.key_size >= 384 else hashes.SHA256())
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False,
                          crl_sign=False, encipher_only=False, decipher_only=False)
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    t1 = time.perf_counter()
    for host in hosts:
        if key_type.startswith("rsa"):
            key = rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[3:]))
        else:
            key = ec.generate_private_key(ec.SECP384R1() if key_type == "ecdsa-p384" else ec.SECP256R1())
        public = key.public_key()
        now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + dt.timedelta(days=730), ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(eku, critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                           critical=False)
            .sign(ca_key, digest)
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        with open(os.path.join(out_dir, f"{host}-key.pem"), "wb") as f:
            f.write(key_pem)
        with open(os.path.join(out_dir, f"{host}-cert.pem"), "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
    t2 = time.perf_counter()
    json.dump({"setup_s": t1 - t0, "loop_s": t2 - t1}, sys.stdout)


# ---------------------------------------------------------------- running and checking

def timed(cmd: List[str], **kw) -> dict:
    """Run a child to completion; its wall time and the CPU time of it and its children."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, **kw)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed ({proc.returncode}):\n"
                 f"{proc.stderr.decode(errors='replace')[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "stdout": proc.stdout}


def check_certs(paths: List[Path], ca_cert: Path, key_type: str, hosts: List[str]) -> None:
    """Outside the timing: the files exist, verify against the CA and carry the profile."""
    from cryptography import x509

    from qemuca import profile  # the same checks `qemuca inspect` applies

    if len(paths) != len(hosts):
        sys.exit(f"bench: expected {len(hosts)} certificates, found {len(paths)}")
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    for path in (paths[0], paths[-1]):
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        cert.verify_directly_issued_by(ca)
        bad = [f for f in profile.check_host(cert) if f.result is FAIL]
        if bad:
            sys.exit(f"bench: {path} fails the QEMU profile: {bad}")
        want = "RSA" if key_type.startswith("rsa") else "ECDSA"
        if not profile.describe_key(cert.public_key()).startswith(want):
            sys.exit(f"bench: {path} has a {profile.describe_key(cert.public_key())} key, not {key_type}")


def run_qemuca(qemuca: List[str], work: Path, hosts_file: Path, hosts: List[str], key_type: str,
               ca_key_type: str, env: dict) -> dict:
    home = work / "qemuca-home"
    timed(qemuca + ["--home", str(home), "init", "--no-passphrase", "--key-type", ca_key_type,
                    "--cn", "bench CA"], env=env, cwd=work)
    res = timed(qemuca + ["--home", str(home), "issue", "--hosts-file", str(hosts_file),
                          "--key-type", key_type], env=env, cwd=work)
    db = sqlite3.connect(str(home / "index.sqlite"))
    try:
        pems = db.execute("SELECT cert_pem FROM certificates WHERE status = 'valid' AND key_type = ? "
                          "AND key_pem IS NOT NULL ORDER BY host", (key_type,)).fetchall()
    finally:
        db.close()
    out = work / "qemuca-certs"
    out.mkdir()
    paths = []
    for i, (pem,) in enumerate(pems):
        paths.append(out / f"{i}.pem")
        paths[-1].write_text(pem)
    check_certs(paths, home / "ca" / "ca-cert.pem", key_type, hosts)
    res.pop("stdout")
    return res


def run_floor(work: Path, hosts_file: Path, hosts: List[str], key_type: str, ca_dir: Path,
              env: dict) -> dict:
    out = work / "floor"
    out.mkdir()
    res = timed([sys.executable, str(Path(__file__).resolve()), "--floor-worker", str(ca_dir),
                 str(hosts_file), str(out), key_type], env=env, cwd=work)
    inner = json.loads(res.pop("stdout"))
    res.update(inner)
    check_certs(sorted(out.glob("*-cert.pem")), ca_dir / "ca-cert.pem", key_type, hosts)
    return res


def run_openssl(work: Path, hosts_file: Path, hosts: List[str], key_type: str, ca_dir: Path,
                env: dict) -> dict:
    out = work / "openssl"
    out.mkdir()
    env = dict(env, GENPKEY=OPENSSL_GENPKEY[key_type], HOSTS=str(hosts_file),
               CA_CERT=str(ca_dir / "ca-cert.pem"), CA_KEY=str(ca_dir / "ca-key.pem"))
    res = timed(["bash", "-c", OPENSSL_LOOP], env=env, cwd=out)
    res.pop("stdout")
    check_certs(sorted(out.glob("*-cert.pem")), ca_dir / "ca-cert.pem", key_type, hosts)
    return res


def bench_key_type(qemuca: List[str], base: Path, n: int, key_type: str, ca_key_type: str,
                   env: dict, order: List[str]) -> Dict[str, dict]:
    work = base / key_type
    work.mkdir()
    hosts = [f"host-{i:04d}.bench.example" for i in range(1, n + 1)]
    hosts_file = work / "hosts.txt"
    hosts_file.write_text("\n".join(hosts) + "\n")
    ca_dir = work / "qemuca-home" / "ca"
    runs: Dict[str, dict] = {}
    for side in order:  # qemuca first: its init makes the CA the others sign with
        if side == "qemuca":
            runs[side] = run_qemuca(qemuca, work, hosts_file, hosts, key_type, ca_key_type, env)
        elif side == "floor":
            runs[side] = run_floor(work, hosts_file, hosts, key_type, ca_dir, env)
        else:
            runs[side] = run_openssl(work, hosts_file, hosts, key_type, ca_dir, env)
    return runs


# ---------------------------------------------------------------- reporting

def summarise(key_type: str, n: int, repeats: List[Dict[str, dict]]) -> dict:
    """Median over repeats of each side; per-certificate ms and the ratios."""
    sides = {}
    for side in repeats[0]:
        walls = [r[side]["wall_s"] for r in repeats]
        cpus = [r[side]["cpu_s"] for r in repeats]
        sides[side] = {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
                       "ms_per_cert": 1000 * statistics.median(walls) / n,
                       "cpu_ms_per_cert": 1000 * statistics.median(cpus) / n,
                       "runs_wall_s": walls}
        if side == "floor":
            sides[side]["loop_ms_per_cert"] = 1000 * statistics.median(
                r[side]["loop_s"] for r in repeats) / n
    q = sides["qemuca"]
    result = {"key_type": key_type, "hosts": n, "sides": sides,
              "qemuca_over_floor": q["wall_s"] / sides["floor"]["wall_s"],
              "qemuca_over_openssl": q["wall_s"] / sides["openssl"]["wall_s"],
              "cpu_qemuca_over_floor": q["cpu_s"] / sides["floor"]["cpu_s"],
              "cpu_qemuca_over_openssl": q["cpu_s"] / sides["openssl"]["cpu_s"]}
    if key_type.startswith("rsa"):
        result["target"] = f"qemuca/floor <= {RSA_FLOOR_RATIO}"
        result["target_met"] = result["qemuca_over_floor"] <= RSA_FLOOR_RATIO
    elif key_type == "ecdsa-p256":
        result["target"] = f"qemuca <= {P256_MS} ms/cert"
        result["target_met"] = q["ms_per_cert"] <= P256_MS
    return result


def print_table(results: List[dict], busy: bool) -> None:
    """Per-certificate ms as wall / CPU, then the ratios (wall / CPU) and the target."""
    def pair(a: float, b: float, fmt: str = ".2f") -> str:
        return f"{a:{fmt}} / {b:{fmt}}"

    head = (f"{'key type':<11} {'hosts':>5} {'qemuca ms':>15} {'floor ms':>15} {'openssl ms':>17}"
            f" {'qemuca/floor':>13} {'qemuca/openssl':>15}  target (on wall)")
    print(head)
    print("-" * len(head))
    for r in results:
        s = r["sides"]
        q, f, o = s["qemuca"], s["floor"], s["openssl"]
        met = "" if "target" not in r else f"{'MET' if r['target_met'] else 'MISSED'} ({r['target']})"
        print(f"{r['key_type']:<11} {r['hosts']:>5}"
              f" {pair(q['ms_per_cert'], q['cpu_ms_per_cert']):>15}"
              f" {pair(f['ms_per_cert'], f['cpu_ms_per_cert']):>15}"
              f" {pair(o['ms_per_cert'], o['cpu_ms_per_cert']):>17}"
              f" {pair(r['qemuca_over_floor'], r['cpu_qemuca_over_floor']):>13}"
              f" {pair(r['qemuca_over_openssl'], r['cpu_qemuca_over_openssl'], '.3f'):>15}  {met}")
    print("\nEach cell is wall / CPU: ms = time of the whole child process (start-up included)"
          " / hosts, median of repeats.")
    print("The floor's own loop (no start-up, no CA key load):",
          ", ".join(f"{r['key_type']} {r['sides']['floor']['loop_ms_per_cert']:.2f} ms"
                    for r in results))
    if busy:
        print("WARNING: the machine was busy (load average above the CPU count): wall times are"
              " inflated, compare the CPU figures.")


def environment(qemuca: List[str], env: dict, ca_key_type: str, cwd: Path) -> dict:
    import cryptography

    # From the children's working directory: from the checkout, `python -c` would find
    # ./qemuca before PYTHONPATH.
    where = subprocess.run([sys.executable, "-c", "import qemuca; print(qemuca.__file__)"],
                           env=env, cwd=cwd, capture_output=True, text=True).stdout.strip()
    ossl = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip()
    return {"python": sys.version.split()[0], "executable": sys.executable,
            "cryptography": cryptography.__version__, "openssl_cli": ossl,
            "qemuca_cmd": qemuca, "qemuca_module": where, "ca_key_type": ca_key_type,
            "cpus": os.cpu_count(), "machine": platform.machine(),
            "loadavg_start": os.getloadavg()}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=200, help="hosts per run (default 200)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 hosts")
    ap.add_argument("--key-types", default=",".join(KEY_TYPES),
                    help="comma-separated host key types (default %(default)s)")
    ap.add_argument("--ca-key-type", default="rsa3072",
                    help="key type of the CA made by `qemuca init` (default: qemuca's, rsa3072)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per side; medians are reported")
    ap.add_argument("--qemuca", default=None,
                    help="command running qemuca (default: this python -m qemuca)")
    ap.add_argument("--workdir", default=None, help="where temporary stores go (default: $TMPDIR)")
    ap.add_argument("--out", default=str(HERE / "results"), help="directory for the JSON results")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--floor-worker", nargs=4, metavar=("CA_DIR", "HOSTS", "OUT", "KEY_TYPE"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.floor_worker:
        floor_worker(*args.floor_worker)
        return 0
    n = 20 if args.quick else args.hosts
    if n < 1:
        ap.error("--hosts must be at least 1")
    if not shutil.which("openssl"):
        sys.exit("bench: the openssl CLI is needed")
    key_types = [k.strip() for k in args.key_types.split(",") if k.strip()]
    for k in key_types:
        if k not in OPENSSL_GENPKEY:
            ap.error(f"unknown key type {k}")
    qemuca = args.qemuca.split() if args.qemuca else [sys.executable, "-m", "qemuca"]
    env = dict(os.environ)
    for name in ("QEMUCA_HOME", "QEMUCA_PASSPHRASE_FILE"):
        env.pop(name, None)
    base = Path(tempfile.mkdtemp(prefix="qemuca-bench-", dir=args.workdir))
    results = []
    try:
        info = environment(qemuca, env, args.ca_key_type, base)
        print(f"qemuca from {info['qemuca_module']}; cryptography {info['cryptography']}; "
              f"{info['openssl_cli']}; CA {args.ca_key_type}; {n} hosts x {args.repeat}", flush=True)
        for key_type in key_types:
            repeats = []
            for i in range(args.repeat):
                order = ["qemuca", "floor", "openssl"]
                if i % 2:  # alternate the two non-qemuca sides to spread drift
                    order = ["qemuca", "openssl", "floor"]
                run_dir = base / f"run{i}"
                run_dir.mkdir(exist_ok=True)
                print(f"  {key_type} run {i + 1}/{args.repeat} ...", flush=True)
                repeats.append(bench_key_type(qemuca, run_dir, n, key_type, args.ca_key_type, env, order))
            results.append(summarise(key_type, n, repeats))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    info["loadavg_end"] = os.getloadavg()
    print()
    busy = max(info["loadavg_start"][0], info["loadavg_end"][0]) > (os.cpu_count() or 1)
    info["busy"] = busy
    print_table(results, busy)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"issue-{stamp}.json"
    path.write_text(json.dumps({"benchmark": "issue", "at": stamp, "environment": info,
                                "results": results}, indent=2) + "\n")
    print(f"\nresults: {path}")
    missed = [r["key_type"] for r in results if r.get("target_met") is False]
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
