"""Operations over hosts, built from pki, store and hosts: deploy, lifecycle, verify,
probe, monitoring, and the fleet runner that runs any of them over many hosts."""
