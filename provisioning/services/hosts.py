"""Hosts: the local host of `make run`, and which domain type (kvm or qemu) really runs guests."""

from __future__ import annotations

import logging
from pathlib import Path

from django.conf import settings

from provisioning.hypervisor import probe
from provisioning.hypervisor.connection import get_hypervisor
from provisioning.models import Host, Media

log = logging.getLogger(__name__)
LOCAL_HOST_NAME = "local"


def host_ensure_local() -> Host:
    """The Host row for LIBVIRT_URI, created on first use."""
    host = Host.objects.filter(uri=settings.LIBVIRT_URI).first()
    if host is None:
        host, _ = Host.objects.get_or_create(
            name=LOCAL_HOST_NAME, defaults={"uri": settings.LIBVIRT_URI}
        )
    return host


def _registered_kernel() -> tuple[str, str] | None:
    """A kernel and initrd an admin registered as media: any Linux kernel prints its banner."""
    media = (
        Media.objects.filter(kind=Media.Kind.KERNEL)
        .exclude(kernel_path="")
        .exclude(initrd_path="")
        .order_by("pk")
        .first()
    )
    return (media.kernel_path, media.initrd_path) if media else None


def host_domain_type(*, host: Host, kernel: tuple[str, str] | None = None) -> str:
    """kvm or qemu for this host: forced by setting or admin, else probed once and remembered.

    The probe boots `kernel` (a kernel and initrd path on the host), or else a kernel that is
    registered as media.
    """
    forced = settings.VMPORTAL_DOMAIN_TYPE
    if forced in ("kvm", "qemu"):
        return str(forced)
    if host.domain_type != Host.DomainType.AUTO:
        return host.domain_type
    if host.detected_domain_type:
        return host.detected_domain_type
    hv = get_hypervisor(host.uri)
    kernel = kernel or _registered_kernel()
    if "kvm" not in hv.capabilities_domain_types():
        works = False
    elif kernel is None:
        # Without a kernel to boot, trust the capabilities (and do not remember the guess).
        log.warning("host %s: no kernel registered to probe with yet; assuming KVM works", host)
        return "kvm"
    else:
        console = Path(settings.CONSOLE_LOG_DIR) / f"vmportal-kvm-probe-{host.name}.log"
        works = probe.probe_kvm(hv, kernel[0], kernel[1], console)
    detected = "kvm" if works else "qemu"
    log.info("host %s: KVM %s; guests use type %s", host, "works" if works else "fails", detected)
    Host.objects.filter(pk=host.pk).update(detected_domain_type=detected)
    host.detected_domain_type = detected
    return detected
