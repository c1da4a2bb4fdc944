"""Check a host's QEMU TLS set-up where it lives, and whether two hosts can migrate.

`host` runs the per-host checks, `pair` the checks of a migration from one host to
another (with `handshake`, a real TLS handshake between them); `report` holds what
they report and the options they take. A check gives pass, warn, fail or skip (could
not be checked here), the reason, and the fix.
"""

from qemuca.ops.verify.host import verify_host, verify_remote
from qemuca.ops.verify.pair import verify_pair, verify_pair_remote
from qemuca.ops.verify.report import (
                                      DEFAULT_PORT,
                                      DEFAULT_WARN_DAYS,
                                      HostReport,
                                      PairOptions,
                                      PairReport,
                                      Reference,
                                      Side,
                                      VerifyOptions,
)

__all__ = ["DEFAULT_PORT", "DEFAULT_WARN_DAYS", "HostReport", "PairOptions", "PairReport", "Reference", "Side",
           "VerifyOptions", "verify_host", "verify_pair", "verify_pair_remote", "verify_remote"]
