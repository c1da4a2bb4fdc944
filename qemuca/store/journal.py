"""The crash journal of the CA store: files a transaction changes outside SQLite.

Files changed inside a transaction (the CA directories of a rollover, crl.pem) cannot
commit with it. So such a transaction first writes a journal (.journal-<token>.json:
which CA sits in ca/ and ca-previous/, the bytes of crl.pem) and records its token in
the index. A process killed before COMMIT leaves a journal whose token the index does
not hold: the next Store.open puts the files back as the journal says. A journal whose
token the index holds belongs to a transaction that committed: it is just removed.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import secrets
import sqlite3
from typing import TYPE_CHECKING, List, Optional

from cryptography import x509

from qemuca.hosts.fs import make_dirs
from qemuca.pki.checks import fingerprint

if TYPE_CHECKING:  # the store calls this module: no import at run time
    from qemuca.store.index import Store

PREFIX = ".journal-"


def write(store: Store, db: sqlite3.Connection) -> str:
    """Note, inside `db`'s transaction, how the CA directories and crl.pem are now;
    returns the journal's path."""
    token = secrets.token_hex(8)
    crl = read_or_none(store.crl_path)
    note = {"token": token, "index": index_id(db), "ca": ca_dir_fingerprint(store.ca_dir),
            "previous": ca_dir_fingerprint(store.previous_ca_dir),
            "crl": None if crl is None else base64.b64encode(crl).decode("ascii")}
    path = os.path.join(store.home, f"{PREFIX}{token}.json")
    store.fs.write_atomic(path, json.dumps(note, sort_keys=True).encode(), 0o600)
    db.execute("INSERT OR REPLACE INTO meta VALUES ('journal', ?)", (token,))
    return path


def files(home: str) -> List[str]:
    try:
        names = os.listdir(home)
    except OSError:
        return []
    return sorted(os.path.join(home, n) for n in names if n.startswith(PREFIX) and n.endswith(".json"))


def index_id(db: sqlite3.Connection) -> Optional[str]:
    """Which index this is: the fingerprint init recorded (init --force makes a new one)."""
    row = db.execute("SELECT value FROM meta WHERE key = 'ca_fingerprint'").fetchone()
    return row[0] if row else None


def settle(store: Store, db: sqlite3.Connection, own: Optional[str]) -> List[str]:
    """Undo the journals of transactions that never committed (not `own`, the journal of
    the transaction in flight) and remove every other one; returns what was put back."""
    row = db.execute("SELECT value FROM meta WHERE key = 'journal'").fetchone()
    committed = row[0] if row else None
    done: List[str] = []
    for path in files(store.home):
        if path == own:
            continue
        try:
            note = read_note(path)
        except (OSError, ValueError):
            done.append(f"discarded unreadable journal {os.path.basename(path)}")
        else:
            if note.get("index") != index_id(db):
                # Left before `init --force` set that index aside: not ours to undo.
                done.append(f"discarded {os.path.basename(path)} of a retired index")
            elif note.get("token") != committed:
                done += restore(store, note)
        unlink(path)
    return done


def restore(store: Store, note: dict) -> List[str]:
    """Put crl.pem and the CA directories back as the journal found them."""
    done: List[str] = []
    crl = None if note.get("crl") is None else base64.b64decode(note["crl"])
    if read_or_none(store.crl_path) != crl:
        if crl is None:
            unlink(store.crl_path)
        else:
            store.fs.write_atomic(store.crl_path, crl, 0o644)
        done.append("crl.pem put back as the last committed CRL")
    slots = [(store.ca_dir, note.get("ca")), (store.previous_ca_dir, note.get("previous"))]
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    for path, want in slots:
        have = ca_dir_fingerprint(path)
        if have is None or have == want:
            continue
        target = next((p for p, w in slots if w == have and not os.path.lexists(p)), None)
        if target is not None:  # where the journal says it belongs (ca-previous/ -> ca/)
            store.fs.rename(path, target)
            done.append(f"{os.path.basename(path)}/ (CA {have[:16]}) moved back to "
                        f"{os.path.basename(target)}/")
            continue
        # Never deleted: a CA key is kept, as init --force and rollover finish do.
        aside = os.path.join(store.home, "retired", f"{stamp}-undone-{os.path.basename(path)}")
        make_dirs(os.path.dirname(aside), 0o700)
        store.fs.rename(path, aside)
        done.append(f"{os.path.basename(path)}/ (CA {have[:16]}) set aside in "
                    f"{os.path.relpath(aside, store.home)}")
    for path, want in slots:
        if want and not os.path.lexists(path):
            source = find_ca_dir(store, want)
            if source is None:
                done.append(f"CA {want[:16]} for {os.path.basename(path)}/ not found")
                continue
            store.fs.rename(source, path)
            done.append(f"{os.path.basename(path)}/ (CA {want[:16]}) moved back from "
                        f"{os.path.relpath(source, store.home)}")
    return done


def find_ca_dir(store: Store, fp: str) -> Optional[str]:
    """Where a CA with this fingerprint is now: a staging dir, ca-previous/, retired/."""
    places = [os.path.join(store.home, n) for n in sorted(os.listdir(store.home)) if n.startswith(".ca-new-")]
    places.append(store.previous_ca_dir)
    retired = os.path.join(store.home, "retired")
    if os.path.isdir(retired):
        for n in sorted(os.listdir(retired), reverse=True):
            places += [os.path.join(retired, n), os.path.join(retired, n, "ca")]
    return next((p for p in places if ca_dir_fingerprint(p) == fp), None)


def ca_dir_fingerprint(path: str) -> Optional[str]:
    """SHA-256 fingerprint of DIR/ca-cert.pem; None when there is no readable CA there."""
    try:
        with open(os.path.join(path, "ca-cert.pem"), "rb") as f:
            return fingerprint(x509.load_pem_x509_certificate(f.read()))
    except (OSError, ValueError):
        return None


def read_or_none(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def read_note(path: str) -> dict:
    with open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
