"""The places a credential set lives and how to reach them: SSH, local and remote file
systems, the cert-dir layout and its atomic install, libvirt's qemu.conf, inventories."""
