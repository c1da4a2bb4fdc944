"""qemu.conf parsing scales linearly: a file of 4N comment lines takes about 4x the time
of N (it once took 16x: every line number was counted from the file's start).

    .venv/bin/python bench/bench_qemuconf.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemuca.hosts import qemuconf  # noqa: E402


def best_of(text: str, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        qemuconf.apply_tls(qemuconf.parse(text), qemuconf.TlsSettings())
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    base = 20_000
    small = best_of("# a comment line of a large qemu.conf\n" * base + 'migrate_tls_x509_verify = 0\n')
    large = best_of("# a comment line of a large qemu.conf\n" * (4 * base) + 'migrate_tls_x509_verify = 0\n')
    print(f"parse + apply, {base} lines: {small * 1000:.1f} ms; {4 * base} lines: {large * 1000:.1f} ms; "
          f"ratio {large / small:.2f} (linear: 4)")


if __name__ == "__main__":
    main()
