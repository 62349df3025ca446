"""Hosts: the local host of `make run`, and which domain type (kvm or qemu) really runs guests."""

from __future__ import annotations

import logging
from pathlib import Path

from django.conf import settings

from provisioning.demo import tinyguest
from provisioning.hypervisor import probe
from provisioning.hypervisor.connection import get_hypervisor
from provisioning.models import Host

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


def host_domain_type(*, host: Host) -> str:
    """kvm or qemu for this host: forced by setting or admin, else probed once and remembered."""
    forced = settings.VMPORTAL_DOMAIN_TYPE
    if forced in ("kvm", "qemu"):
        return str(forced)
    if host.domain_type != Host.DomainType.AUTO:
        return host.domain_type
    if host.detected_domain_type:
        return host.detected_domain_type
    hv = get_hypervisor(host.uri)
    guest = tinyguest.cached(settings.DEMO_DIR)
    if "kvm" not in hv.capabilities_domain_types():
        works = False
    elif guest is None:
        # Without a kernel to boot, trust the capabilities (and do not remember the guess).
        log.warning("host %s: no probe kernel built yet; assuming KVM works", host)
        return "kvm"
    else:
        console = Path(settings.CONSOLE_LOG_DIR) / f"vmportal-kvm-probe-{host.name}.log"
        works = probe.probe_kvm(hv, guest.kernel, guest.initrd, console)
    detected = "kvm" if works else "qemu"
    log.info("host %s: KVM %s; guests use type %s", host, "works" if works else "fails", detected)
    Host.objects.filter(pk=host.pk).update(detected_domain_type=detected)
    host.detected_domain_type = detected
    return detected
