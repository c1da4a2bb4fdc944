#!/usr/bin/python
# The documentation of qemuca.qemu_tls.host_credentials. The work is done by the action
# plugin of the same name (plugins/action/host_credentials.py), on the controller; this
# file is never sent to a host (the pattern of ansible.builtin.template).

from __future__ import annotations

DOCUMENTATION = r"""
---
module: host_credentials
short_description: QEMU migration TLS credentials from a qemuca CA, placed on a hypervisor
description:
  - Gives the host the credential set QEMU reads for migration TLS (C(ca-cert.pem),
    C(server-cert.pem), C(server-key.pem), C(client-cert.pem), C(client-key.pem), and
    C(ca-crl.pem) when the CA has revocations) and sets the C(qemu.conf) TLS directives,
    using qemuca's own core - the same layout, owners, modes, atomic switch, read-back
    checks and C(qemu.conf) editing as C(qemuca deploy).
  - Runs on the controller, where qemuca and its CA store live. A host without a valid
    certificate in the store's index is enrolled (as C(qemuca enroll)) - the key and CSR
    are made on the host by its openssl, the CSR is signed on the controller (the CA key
    never leaves it), the set is switched in and the certificate recorded in the index
    and audit log. A host whose certificate ends within O(qemu_tls_renew_before_days) is
    renewed for the key it holds (as C(qemuca renew)). Any other host gets its recorded
    set deployed (as C(qemuca deploy)), which changes nothing when it is in place.
  - Connects with qemuca's SSH transport (paramiko), not Ansible's connection, to
    C(ansible_host), C(ansible_port) as C(ansible_user) with
    C(ansible_ssh_private_key_file); the host key is checked against known_hosts as
    OpenSSH checks it. C(become) is not used; C(ansible_user) must be root.
  - Every option not given in the task is read from the host variable of the same name
    (group_vars, host_vars), then takes its default.
  - See docs/ansible.md in the qemuca repository for the mapping from kolla-ansible
    and edpm-ansible variables.
version_added: "0.1.0"
author:
  - qemuca developers
requirements:
  - qemuca installed in the Python environment that runs ansible-core (the controller)
  - root SSH login to the hosts, SFTP, and openssl on the hosts
attributes:
  check_mode:
    support: full
    description: Connects and reports what would change; writes nothing on the host or in the store.
  diff_mode:
    support: full
    description: The C(qemu.conf) diff and the file actions.
  action:
    support: full
  async:
    support: none
  become:
    support: none
options:
  qemuca_home:
    description: The qemuca CA store. Default C($QEMUCA_HOME), else qemuca's default
      (C(~/.local/share/qemuca)).
    type: path
  qemuca_passphrase_file:
    description:
      - File whose first line is the CA key's passphrase (mode 0600), needed to sign
        when the CA key is encrypted. Default C($QEMUCA_PASSPHRASE_FILE).
    type: path
  qemuca_known_hosts:
    description:
      - known_hosts file the host keys are checked against. Default the
        C(UserKnownHostsFile) of C(ansible_ssh_common_args)/C(ansible_ssh_extra_args),
        else qemuca's (ssh_config's C(UserKnownHostsFile), else C(~/.ssh/known_hosts)).
      - C(StrictHostKeyChecking=no) in the SSH arguments is refused, never followed.
    type: path
  qemuca_ssh_config:
    description: OpenSSH client config for qemuca's transport (C(ProxyJump),
      C(HostKeyAlias) and the like go there). Default C(-F) of the SSH arguments, else
      C(~/.ssh/config).
    type: path
  qemuca_accept_new_host_key:
    description: Add an unknown host key to known_hosts (as C(StrictHostKeyChecking=accept-new)).
      A changed key is always refused.
    type: bool
    default: false
  qemuca_timeout:
    description: Seconds one remote command or SFTP operation may take.
    type: float
    default: 60.0
  qemu_tls_hostname:
    description: The host name the certificate is for (what migration sources check).
      Default C(inventory_hostname).
    type: str
  qemu_tls_cert_dir:
    description: Where QEMU reads its credentials (C(migrate_tls_x509_cert_dir)).
    type: str
    default: /etc/pki/qemu
  qemu_tls_group:
    description: Group owning the files. Default the group libvirt runs QEMU as on that
      host (C(qemu.conf)'s C(group), else libvirt's build default), as C(qemuca deploy) resolves it.
    type: str
  qemu_tls_force:
    description:
      - C(true) sets C(migrate_tls_force = 1) (libvirt then refuses every unencrypted
        migration), C(false) sets 0. Not given, it is left as it is.
    type: bool
    aliases: [migrate_tls_force]
  qemu_tls_default_dir:
    description: Also set C(default_tls_x509_cert_dir) to the cert dir.
    type: bool
    default: false
  qemu_tls_restart:
    description: Restart virtqemud (or libvirtd) when C(qemu.conf) changed. Running VMs keep running.
    type: bool
    default: false
  qemu_tls_manage_qemu_conf:
    description: Set the C(qemu.conf) TLS directives; C(false) places the certificates only.
    type: bool
    default: true
  qemu_tls_qemu_conf:
    description: Path of libvirt's C(qemu.conf) on the host.
    type: str
    default: /etc/libvirt/qemu.conf
  qemu_tls_replace_foreign:
    description: Replace layout files qemuca did not write (they are kept for rollback).
    type: bool
    default: false
  qemu_tls_key_type:
    description: Type of a key made on the host at enrollment.
    type: str
    default: ecdsa-p256
    choices: [rsa2048, rsa3072, rsa4096, ecdsa-p256, ecdsa-p384]
  qemu_tls_days:
    description: Validity in days of a certificate made by this task (never past the CA's own).
    type: int
    default: 730
  qemu_tls_sans:
    description: Extra subjectAltNames (DNS names or IP addresses) of a certificate made at
      enrollment. A recorded certificate keeps its own; a difference is reported as a warning.
    type: list
    elements: str
    default: []
  qemu_tls_renew_before_days:
    description: Renew the certificate (same key, new certificate) when it ends within
      this many days. Not given - only a certificate that has ended is renewed.
    type: int
notes:
  - One host per task invocation; Ansible's C(forks) give the parallelism. Concurrent
    hosts share the store safely (SQLite transactions, as concurrent qemuca commands do).
  - Runs on the controller (an action plugin); C(delegate_to) is not needed.
"""

EXAMPLES = r"""
- name: QEMU migration TLS on every hypervisor
  hosts: hypervisors
  gather_facts: false
  tasks:
    - name: Enroll, renew or deploy each host's credentials
      qemuca.qemu_tls.host_credentials:
        qemuca_home: /var/lib/qemuca
        qemuca_passphrase_file: /root/.qemuca-passphrase
        qemu_tls_force: true
        qemu_tls_restart: true
        qemu_tls_renew_before_days: 30
      register: qemu_tls

- name: The same, with the settings in group_vars/hypervisors.yml
  hosts: hypervisors
  gather_facts: false
  tasks:
    - qemuca.qemu_tls.host_credentials: {}
"""

RETURN = r"""
operation:
  description: What the store decided for the host - C(enroll), C(renew) or C(deploy).
  returned: when the host was reached
  type: str
  sample: enroll
qemuca_result:
  description: qemuca's result - C(changed), C(unchanged), C(would-change) (check mode) or C(failed).
  returned: always
  type: str
fingerprint_sha256:
  description: SHA-256 fingerprint of the host's certificate (none yet for an enrollment in check mode).
  returned: success
  type: str
qemu_group:
  description: The group the set is readable by, and why that one.
  returned: success
  type: dict
  sample: {name: libvirt-qemu, gid: 64055, source: "libvirt's default on this host"}
restart_needed:
  description: C(qemu.conf) changed and virtqemud/libvirtd was not restarted.
  returned: success
  type: bool
restarted:
  description: The daemon restarted (C(qemu_tls_restart)).
  returned: success
  type: str
actions:
  description: What was (or, in check mode, would be) done on the host.
  returned: success
  type: list
  elements: str
qemu_conf_diff:
  description: Unified diff of C(qemu.conf) (also in C(diff) for C(--diff)).
  returned: success
  type: str
bundle_sha256:
  description: SHA-256 of the C(ca-cert.pem) placed.
  returned: when a set was placed
  type: str
"""


def main():
    raise SystemExit("qemuca.qemu_tls.host_credentials runs on the controller as an action plugin; "
                     "it is not a module to run on a host")


if __name__ == "__main__":
    main()
