"""State shared by the commands of one invocation: the store home and options."""

from __future__ import annotations

from dataclasses import dataclass, field

from qemuca.store.index import Store


@dataclass
class AppContext:
    home: str
    debug: bool = False
    _store: object = field(default=None, repr=False)
    # host -> InventoryHost, for hosts taken from an inventory with ansible_host/port/user
    addresses: dict = field(default_factory=dict, repr=False)

    def store(self):
        """Open the CA store lazily: most --help paths never need it."""
        if self._store is None:

            self._store = Store.open(self.home)
        return self._store
