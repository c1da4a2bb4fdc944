# qemuca.qemu_tls.ca_bundle: read the qemuca store on the controller (never writes it).

from __future__ import annotations

DOCUMENTATION = r"""
---
name: ca_bundle
short_description: The qemuca CA bundle, its CRL, or a host's certificate from the index
description:
  - Without terms, the CA bundle hosts get as C(ca-cert.pem) (during a CA rollover both
    CAs, newest first), as one PEM string - for shops that distribute the QEMU CA to
    other places (nova, a monitoring probe, a config management role of their own).
  - With O(crl=true), the CRL hosts get as C(ca-crl.pem) (empty when nothing is revoked).
  - With host names as terms, one dictionary per host describing its valid certificate
    in the index (serial, not_after, fingerprint_sha256, sans, key_source, cert_pem...);
    a host without one is an error, unless O(missing=empty) (then an empty dictionary).
  - Reads the store only; the CA key is never opened.
version_added: "0.1.0"
author:
  - qemuca developers
options:
  _terms:
    description: Host names (certificate facts), or nothing (the CA bundle).
    required: false
  qemuca_home:
    description: The qemuca CA store. Default C($QEMUCA_HOME), else C(~/.local/share/qemuca).
    type: path
  crl:
    description: Return the CRL PEM instead of the bundle (no terms).
    type: bool
    default: false
  missing:
    description: What a host without a valid certificate gives - C(error) or C(empty).
    type: str
    default: error
    choices: [error, empty]
"""

EXAMPLES = r"""
- name: Give nova's hosts the QEMU CA too
  ansible.builtin.copy:
    dest: /etc/pki/CA/qemu-migration-ca.pem
    content: "{{ lookup('qemuca.qemu_tls.ca_bundle', qemuca_home='/var/lib/qemuca') }}"
    mode: "0644"

- name: When does this host's certificate end?
  ansible.builtin.debug:
    msg: "{{ (query('qemuca.qemu_tls.ca_bundle', inventory_hostname) | first).not_after }}"
"""

RETURN = r"""
_raw:
  description: The bundle (or CRL) PEM, or one dictionary per host given.
  type: list
  elements: raw
"""

import os  # noqa: E402

from ansible.errors import AnsibleLookupError  # noqa: E402
from ansible.plugins.lookup import LookupBase  # noqa: E402


class LookupModule(LookupBase):
    def run(self, terms, variables=None, **kwargs):
        self.set_options(var_options=variables, direct=kwargs)
        try:
            from qemuca.cli import default_home
            from qemuca.errors import QemucaError
            from qemuca.names import host_name
            from qemuca.pki.ca import CertificateAuthority
            from qemuca.store.index import Store
            from qemuca.text import one_line
        except ImportError as e:
            raise AnsibleLookupError(f"qemuca is not importable by the Python running Ansible ({e})") from None

        home = self.get_option("qemuca_home") or os.environ.get("QEMUCA_HOME") or default_home()
        try:
            store = Store.open(home)
            try:
                if not terms:
                    authority = CertificateAuthority(store)
                    if self.get_option("crl"):
                        return [(authority.crl_pem() or b"").decode()]
                    return [authority.bundle().decode()]
                out = []
                for term in terms:
                    name = host_name(str(term))
                    record = store.valid_for_host(name)
                    if record is None:
                        if self.get_option("missing") == "empty":
                            out.append({})
                            continue
                        raise AnsibleLookupError(f"{name} has no valid certificate in {store.home}")
                    out.append(record.as_dict(with_pem=True))
                return out
            finally:
                store.close()
        except QemucaError as e:
            raise AnsibleLookupError(one_line(str(e))) from None
