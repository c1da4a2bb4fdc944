"""qemuca: a dedicated certificate authority for QEMU migration TLS."""

__version__ = "0.1.0"
