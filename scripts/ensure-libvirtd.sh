#!/usr/bin/env bash
# Makes sure a libvirtd answers at LIBVIRT_URI. When none does and the URI is local, starts one the
# way a machine without systemd needs (user, folders, virtlogd, libvirtd). A running libvirtd and its
# configuration are never touched.
set -euo pipefail
uri=${LIBVIRT_URI:-qemu:///system}

answers() { timeout 10 virsh -q -c "$uri" version >/dev/null 2>&1; }

# Without udev, /dev/kvm stays root-only (0600). libvirt then probes QEMU's capabilities with KVM
# (as root) but finds KVM unusable for the qemu user on every later call, so it probes again and
# again, and each domain start waits behind those probes. Give the node the group and mode that
# Debian's udev rule gives it (whether KVM guests then work is probed per host at run time).
if [[ -c /dev/kvm && $EUID -eq 0 ]] && [[ "$(stat -c %G:%a /dev/kvm)" != kvm:660 ]] &&
  [[ "$(stat -c %a /dev/kvm)" == 600 ]]; then
  getent group kvm >/dev/null || groupadd -r kvm
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm &&
    echo "libvirt: gave /dev/kvm group kvm, mode 0660 (as udev would)"
fi

if answers; then exit 0; fi
case "$uri" in
  qemu:///system|test+unix:///*|qemu+unix:///system) ;;
  *) echo "libvirt: nothing answers at $uri, and it is not a local URI this script can start" >&2; exit 1 ;;
esac
if pgrep -x libvirtd >/dev/null; then
  echo "libvirt: libvirtd runs but does not answer at $uri; not touching it" >&2
  exit 1
fi
if [[ $EUID -ne 0 ]]; then
  echo "libvirt: no libvirtd answers at $uri and starting one needs root" >&2
  exit 1
fi
echo "libvirt: starting a local libvirtd for $uri"
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
getent group kvm >/dev/null || groupadd -r kvm
getent passwd libvirt-qemu >/dev/null ||
  useradd -r -g libvirt-qemu -G kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
mkdir -p /var/log/libvirt/qemu /var/lib/libvirt/images /var/lib/libvirt/boot /var/lib/libvirt/qemu \
  /var/cache/libvirt /run/libvirt
pgrep -x virtlogd >/dev/null || virtlogd -d
libvirtd -d
for _ in $(seq 1 60); do
  if answers; then echo "libvirt: answering at $uri"; exit 0; fi
  sleep 0.5
done
echo "libvirt: started libvirtd, but nothing answers at $uri after 30 s (see /var/log/libvirt)" >&2
exit 1
