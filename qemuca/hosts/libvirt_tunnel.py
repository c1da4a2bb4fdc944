"""libvirt's daemon on a host, reached through the SSH connection qemuca already has.

`qemu+ssh://` would make virsh open its own OpenSSH connections, with other keys and
host-key checks than qemuca's. Instead a local unix socket stands for the host's daemon:
each connection to it is relayed over a new exec channel of our connection running
`virt-ssh-helper qemu:///system` (libvirt's own proxy for qemu+ssh, shipped with the
daemon), so virsh here speaks to the host's virtqemud or libvirtd exactly as over
qemu+ssh. The socket lives in a private 0700 directory and is removed on close.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import tempfile
import threading
from typing import List, Optional

from qemuca.hosts.ssh import Connection, ExecChannel

HELPER = ("virt-ssh-helper", "qemu:///system")


class LibvirtTunnel:
    """A local socket for the host's libvirt daemon; use `uri` with virsh, then close()."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self._dir = tempfile.mkdtemp(prefix="qemuca-libvirt-")  # 0700: only we can connect
        self.path = os.path.join(self._dir, "sock")
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        self._server.listen(8)
        self._closed = threading.Event()
        self._threads: List[threading.Thread] = []
        self.errors: List[str] = []  # why a relay could not start (shown if virsh fails)
        self._accepter = threading.Thread(target=self._accept, name=f"libvirt-tunnel-{conn.name}", daemon=True)
        self._accepter.start()

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.path}"

    def __enter__(self) -> LibvirtTunnel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()
        try:
            self._server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._server.close()
        self._accepter.join(timeout=5)
        for t in self._threads:
            t.join(timeout=5)
        shutil.rmtree(self._dir, ignore_errors=True)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            t = threading.Thread(target=self._relay, args=(client,), daemon=True)
            self._threads.append(t)
            t.start()

    def _note(self, stderr: bytes) -> None:
        """The helper's complaints, a few lines (they explain a failed connection)."""
        for line in stderr.decode("utf-8", "replace").splitlines():
            if line.strip() and len(self.errors) < 5:
                self.errors.append(line.strip()[:300])

    def _relay(self, client: socket.socket) -> None:
        chan: Optional[ExecChannel] = None
        try:
            chan = self.conn.open_exec(list(HELPER), "virt-ssh-helper")
            local, remote = client.fileno(), chan.fileno()
            while not self._closed.is_set():
                ready = select.select([local, remote], [], [], 0.5)[0]
                if local in ready:
                    data = client.recv(65536)
                    if not data:
                        return
                    chan.send(data)
                if remote in ready:
                    self._note(chan.read_stderr())
                    data = chan.read()
                    if data:
                        client.sendall(data)
                    elif chan.at_eof:
                        return
        except Exception as e:  # OSError, EOFError, a RemoteError opening the channel: virsh sees EOF
            self.errors.append(str(e))
        finally:
            client.close()
            if chan is not None:
                chan.close()
