# Sourced by the README's commands: they install Debian packages and start fake hosts in
# namespaces, so they run as root. As another user they re-run themselves with sudo
# where sudo exists; a minimal Debian root has none, and needs none.
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        exec sudo --preserve-env=CI "$0" "$@"
    fi
    echo "$(basename "$0"): run this as root (there is no sudo here)" >&2
    exit 1
fi
