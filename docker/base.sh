#!/usr/bin/env bash
# A local stand-in for python:3.11-slim, for engines that cannot pull from a registry:
# Debian bookworm (whose Python is 3.11) bootstrapped with debootstrap and imported as an image.
#   docker/base.sh [IMAGE]        default IMAGE: python:3.11-slim; ENGINE=docker|podman
# Cached: does nothing when IMAGE already exists. Needs root, debootstrap and a Debian mirror
# (NETMOE_DEBIAN_MIRROR, default the public one). Nothing of the host is copied into the image.
set -euo pipefail
image=${1:-python:3.11-slim}
engine=${ENGINE:-$(command -v docker >/dev/null && echo docker || echo podman)}
mirror=${NETMOE_DEBIAN_MIRROR:-http://deb.debian.org/debian}

if "$engine" image inspect "$image" >/dev/null 2>&1; then
  echo "[base] $image present" >&2
  exit 0
fi
command -v debootstrap >/dev/null || { echo "base.sh: debootstrap is not installed" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "base.sh: debootstrap needs root" >&2; exit 2; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "[base] debootstrap bookworm from $mirror into $root" >&2
# python3-venv brings ensurepip (the build stage makes a venv); pip itself comes from the
# pinned set inside that venv, so the base carries no pip of its own.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$root" "$mirror" >&2
chroot "$root" ln -sf python3 /usr/bin/python
chroot "$root" apt-get clean
# What a slim image does not need at run time: docs, man pages, locales, apt lists and caches.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/log/* \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
  "$root"/usr/share/locale/* "$root"/tmp/*
tar -C "$root" -c . | "$engine" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' - "$image" >&2
echo "[base] imported $image" >&2
