"""Facts about processes and sockets from a place's /proc, read over its FS (so the same
code looks at this machine or at a host over SFTP): what runs with which argv, when a
daemon started, whether a port listens. How qemuca finds exactly what it started, to
kill it by PID, never by name.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

CLK_TCK = 100  # USER_HZ: /proc/PID/stat start times are in 1/100 s on every Linux ABI


def argv_of(fs, proc: str, pid: str) -> Optional[List[str]]:
    try:
        raw = fs.read_bytes(f"{proc}/{pid}/cmdline")
    except OSError:
        return None
    return raw.decode("utf-8", "replace").split("\0")[:-1] if raw else None


def find_pids(fs, argv: Sequence[str], proc: str = "/proc", first: bool = False) -> List[int]:
    """PIDs whose command line is exactly argv (how we find what we started, to kill it).
    Newest (highest) PIDs are looked at first: what we just started is found at once."""
    wanted = list(argv)
    out: List[int] = []
    try:
        pids = sorted((int(e) for e in fs.listdir(proc) if e.isdigit()), reverse=True)
    except OSError:
        return out
    for pid in pids:
        if argv_of(fs, proc, str(pid)) == wanted:
            out.append(pid)
            if first:
                break
    return out


def listening(fs, port: int, proc: str = "/proc") -> bool:
    for table in ("tcp", "tcp6"):
        try:
            text = fs.read_bytes(f"{proc}/net/{table}", limit=64 << 20).decode("ascii", "replace")
        except OSError:
            continue
        for line in text.splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def proc_start(fs, proc: str, pid: int, name: str) -> Optional[float]:
    """Start time (epoch) of pid when it runs `name`, else None."""
    try:
        stat = fs.read_bytes(f"{proc}/{pid}/stat").decode("ascii", "replace")
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if comm != name[:15] or fields[0] in ("Z", "X"):
            return None
        start_ticks = int(fields[19])
        btime = next(int(line.split()[1]) for line in fs.read_bytes(f"{proc}/stat").decode().splitlines()
                     if line.startswith("btime "))
        return btime + start_ticks / CLK_TCK
    except (OSError, ValueError, IndexError, StopIteration):
        return None
