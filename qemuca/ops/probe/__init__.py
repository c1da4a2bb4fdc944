"""`qemuca probe`: a real encrypted test migration between two hosts, over SSH.

Checking files says a migration *should* work; only QEMU itself can say that it does.
The probe starts a throwaway guest on each host with the host's own QEMU (no disk, no
network device, `-machine none`, KVM else TCG), loads the deployed credentials the way
libvirt does (tls-creds-x509 added over QMP, so a bad file comes back as QEMU's own
message), and migrates the source's guest to the destination with `tls-hostname` set
as libvirt's `tls.destination` sets it. It also shows that the listener refuses a plain
migration, and can measure TLS against plain throughput.

`qmp` drives one QEMU over SSH, `steps` runs a probe, `diagnose` explains its outcome,
`report` holds what it reports and the options it takes.
"""

from qemuca.ops.probe.qmp import Interrupted
from qemuca.ops.probe.report import (
                                     DEFAULT_RAM_MIB,
                                     DEFAULT_TIMEOUT,
                                     ProbeOptions,
                                     ProbeReport,
                                     Revocations,
                                     all_pairs,
                                     rate,
                                     read_pairs,
                                     tls_name,
)
from qemuca.ops.probe.steps import probe_pair

__all__ = ["DEFAULT_RAM_MIB", "DEFAULT_TIMEOUT", "Interrupted", "ProbeOptions", "ProbeReport", "Revocations",
           "all_pairs", "probe_pair", "rate", "read_pairs", "tls_name"]
