"""The certificates: what QEMU demands of them (profile), the CA that signs them, and
describing PEM files. Pure X.509 work with cryptography; no host, no SSH."""
