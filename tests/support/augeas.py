"""libvirt's two readers of qemu.conf, for tests of files we write.

- `lens_read`: augtool with libvirt's lens `libvirtd_qemu.aug` (what config-management
  tools use). augtool exits 0 on a parse error, so errors are read from /augeas//error.
- `virconf_read`: the daemon's own parser, virConfReadFile in libvirt.so (a private but
  exported symbol), called with ctypes: the final word on what libvirt accepts.
"""

from __future__ import annotations

import codecs
import ctypes
import ctypes.util
import functools
import os
import re
import subprocess
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from tests.support.tools import missing, require_file, require_tool

LENS = "/usr/share/augeas/lenses/libvirtd_qemu.aug"


@dataclass
class LensResult:
    error: Optional[str] = None
    entries: List[Tuple[str, Optional[str]]] = field(default_factory=list)  # top-level, in order

    def all(self, key: str) -> List[Optional[str]]:
        return [v for k, v in self.entries if k == key]

    def first(self, key: str) -> Optional[str]:
        values = self.all(key)
        return values[0] if values else None


def _quote(path: str) -> str:
    assert '"' not in path and "\n" not in path
    return f'"{path}"'


def lens_read(paths: Sequence[str]) -> Dict[str, LensResult]:
    """Parse each file with libvirt's lens in one augtool run."""
    augtool = require_tool("augtool")
    require_file(LENS)
    paths = [os.path.abspath(p) for p in paths]
    script = ["set /augeas/load/Qemuca/lens Libvirtd_qemu.lns"]
    script += [f"set /augeas/load/Qemuca/incl[last()+1] {_quote(p)}" for p in paths]
    script += ["load", "print /files", "print /augeas//error"]
    out = subprocess.run([augtool, "-A", "-r", "/"], input="\n".join(script) + "\n",
                         capture_output=True, text=True, timeout=60, check=True).stdout
    results = {}
    for p in paths:
        res = LensResult()
        errors = dict(re.findall(rf'^/augeas/files{re.escape(p)}/error(/\w+)? = "(.*)"$', out, re.M))
        if errors:
            res.error = (f"{errors.get('/message', errors.get(''))} "
                         f"(line {errors.get('/line')}, char {errors.get('/char')})")
        elif f"/files{p}" not in out.splitlines():
            raise AssertionError(f"augtool neither loaded nor rejected {p}:\n{out}")
        for key, value in re.findall(rf'^/files{re.escape(p)}/([^/\[\s]+)(?:\[\d+\])?(?: = "(.*)")?$',
                                     out, re.M):
            if not key.startswith("#"):
                res.entries.append((key, _unescape(value)))
        results[p] = res
    return results


def _unescape(value: str) -> str:
    """augtool prints C escapes (octal for non-ASCII bytes)."""
    return codecs.escape_decode(value.encode())[0].decode("utf-8", "surrogateescape")


def lens_read_one(path: str) -> LensResult:
    return lens_read([path])[os.path.abspath(path)]


@functools.cache
def _libvirt():
    name = ctypes.util.find_library("virt") or "libvirt.so.0"
    try:
        lib = ctypes.CDLL(name)
        _ = lib.virConfReadFile  # AttributeError when this libvirt lacks it
    except (OSError, AttributeError):
        return None
    lib.virInitialize()  # sets up libvirt's error reporting
    lib.virConfReadFile.restype = ctypes.c_void_p
    lib.virConfReadFile.argtypes = [ctypes.c_char_p, ctypes.c_uint]
    lib.virConfReadString.restype = ctypes.c_void_p
    lib.virConfReadString.argtypes = [ctypes.c_char_p, ctypes.c_uint]
    lib.virGetLastErrorMessage.restype = ctypes.c_char_p
    lib.virConfGetValueString.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.virConfGetValueBool.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_bool)]
    lib.virConfFree.argtypes = [ctypes.c_void_p]
    return lib


def require_libvirt():
    lib = _libvirt()
    if lib is None:
        missing("libvirt.so.0 with virConfReadFile (package libvirt0)")
    return lib


@dataclass
class VirconfResult:
    error: Optional[str] = None  # libvirt's message, e.g. "...: FILE:3: expecting a name"
    values: Dict[str, object] = field(default_factory=dict)  # None when the key is absent


def _read_conf(lib, conf, strings, bools) -> VirconfResult:
    res = VirconfResult()
    if not conf:
        res.error = lib.virGetLastErrorMessage().decode("utf-8", "replace")
        return res
    try:
        for name in strings:
            out = ctypes.c_void_p()
            if lib.virConfGetValueString(conf, name.encode(), ctypes.byref(out)) < 0:
                raise ValueError(lib.virGetLastErrorMessage().decode())
            res.values[name] = ctypes.string_at(out.value).decode("utf-8", "surrogateescape") if out.value else None
        for name in bools:
            out = ctypes.c_bool()
            rv = lib.virConfGetValueBool(conf, name.encode(), ctypes.byref(out))
            if rv < 0:
                raise ValueError(lib.virGetLastErrorMessage().decode())
            res.values[name] = out.value if rv == 1 else None
    finally:
        lib.virConfFree(conf)
    return res


def virconf_read(path: str, strings: Sequence[str] = (), bools: Sequence[str] = ()) -> VirconfResult:
    """Read a file with libvirt's virConfReadFile and fetch keys the way qemu_conf.c does."""
    lib = require_libvirt()
    return _read_conf(lib, lib.virConfReadFile(os.fsencode(path), 0), strings, bools)


def virconf_parse(data: bytes, strings: Sequence[str] = (), bools: Sequence[str] = ()) -> VirconfResult:
    """virConfReadString on data (no NUL bytes); errors name the file 'memory conf'."""
    assert b"\0" not in data
    lib = require_libvirt()
    return _read_conf(lib, lib.virConfReadString(data, 0), strings, bools)
