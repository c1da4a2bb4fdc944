"""What the fleet benchmarks share: the child's environment, the machine's facts, the results file."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Dict, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def qemuca_env() -> Dict[str, str]:
    """This environment without QEMUCA_* settings, with this checkout first on PYTHONPATH
    (so `python -m qemuca` children run the code beside the bench)."""
    env = {k: v for k, v in os.environ.items() if k not in ("QEMUCA_HOME", "QEMUCA_PASSPHRASE_FILE")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def environment(load0: Tuple[float, float, float]) -> dict:
    """Python, CPUs and the load average at the start and now (a busy machine's wall
    times include waiting for a CPU)."""
    return {"python": sys.version.split()[0], "cpus": os.cpu_count(), "machine": platform.machine(),
            "loadavg_start": load0, "loadavg_end": os.getloadavg()}


def busy(info: dict) -> bool:
    return max(info["loadavg_start"][0], info["loadavg_end"][0]) > (os.cpu_count() or 1)


def write_results(out: str, benchmark: str, data: dict) -> Path:
    """bench/results/<benchmark>-<UTC stamp>.json (git-ignored); returns its path."""
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = directory / f"{benchmark}-{stamp}.json"
    path.write_text(json.dumps({"benchmark": benchmark, "at": stamp, **data}, indent=2, default=str) + "\n")
    return path
