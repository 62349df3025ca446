"""Demo content: the tiny real guest and the Debian cloud image as templates, a pool, a network."""

from __future__ import annotations

import fcntl
import ipaddress
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction

from provisioning.demo import debian, tinyguest
from provisioning.hypervisor import networks, storage
from provisioning.hypervisor.connection import Hypervisor, get_hypervisor
from provisioning.hypervisor.errors import HypervisorError, NotFound
from provisioning.models import GuestTemplate, Host, Media, Network, StoragePool
from provisioning.services.hosts import host_domain_type
from provisioning.services.templates import template_saved

DEMO_TEMPLATE_NAME = "Tiny Linux (direct kernel boot)"
DEMO_MEDIA_NAME = "Tiny Linux kernel + installer initrd"
DEMO_POOL_NAME = "vmportal"
DEMO_POOL_PATH = Path("/var/lib/libvirt/images/vmportal")
BOOT_DIR = Path("/var/lib/libvirt/boot/vmportal")


def _publish(src: Path, dest: Path) -> None:
    """Copy src to dest when it differs, atomically, where QEMU may read it."""
    same_size = dest.exists() and dest.stat().st_size == src.stat().st_size
    if same_size and dest.read_bytes() == src.read_bytes():
        return
    tmp = dest.with_suffix(dest.suffix + ".tmp")
    shutil.copyfile(src, tmp)
    tmp.chmod(0o644)
    tmp.replace(dest)


# The tiny guest's sizes, for every demo template made from it.
_TINY_SIZES = {
    "vcpus_min": 1,
    "vcpus_default": 1,
    "vcpus_max": 2,
    "memory_mib_min": 128,
    "memory_mib_default": 256,
    "memory_mib_max": 1024,
    "disk_mib_min": tinyguest.DISK_MIN_MIB,
    "disk_mib_default": tinyguest.DISK_MIN_MIB,
    "disk_mib_max": 1024,
    "install_timeout_minutes": 10,
}


def demo_seed(*, host: Host, log: Callable[[str], None] = print) -> GuestTemplate:
    """Build the tiny guest (cached) and register its pool, media and template on `host`."""
    guest = tinyguest.cached(settings.DEMO_DIR)
    if guest is None:
        log("demo: building the tiny guest from Debian packages (first run only)")
        guest = tinyguest.build(settings.DEMO_DIR, log=log)
    BOOT_DIR.mkdir(parents=True, exist_ok=True)
    kernel, initrd = BOOT_DIR / "tiny-vmlinuz", BOOT_DIR / "tiny-initrd.img"
    _publish(guest.kernel, kernel)
    _publish(guest.initrd, initrd)

    storage.ensure_dir_pool(get_hypervisor(host.uri), DEMO_POOL_NAME, str(DEMO_POOL_PATH))
    domain_type = host_domain_type(host=host, kernel=(str(kernel), str(initrd)))
    log(f"demo: guests on {host} run with domain type '{domain_type}'")

    with transaction.atomic():
        pool, _ = StoragePool.objects.update_or_create(
            host=host, name=DEMO_POOL_NAME, defaults={"path": str(DEMO_POOL_PATH)}
        )
        media, _ = Media.objects.update_or_create(
            name=DEMO_MEDIA_NAME,
            defaults={
                "kind": Media.Kind.KERNEL,
                "kernel_path": str(kernel),
                "initrd_path": str(initrd),
                "description": f"Debian kernel {guest.kernel_version} with a busybox installer.",
            },
        )
        template, created = GuestTemplate.objects.get_or_create(
            name=DEMO_TEMPLATE_NAME,
            defaults={
                "description": (
                    "A tiny real Linux guest. Its installer writes a marker to the disk and "
                    "powers off; the installed guest boots from its disk and shows the marker on "
                    "its serial console. Installs in about 15-30 s under software emulation."
                ),
                "method": GuestTemplate.Method.KERNEL,
                "lifecycle": GuestTemplate.Lifecycle.INSTALL,
                "media": media,
                "pool": pool,
                "kernel_cmdline": tinyguest.install_cmdline("installed"),
                **_TINY_SIZES,
                "data_disk_mib_max": 256,
            },
        )
    if created:
        template_saved(template=template, changed=False)
    log(f"demo: template '{template.name}' {'registered' if created else 'present'} on {host}")
    return template


def demo_disk(*, host: Host, log: Callable[[str], None] = print) -> str:
    """The tiny guest's installed, bootable disk as a volume of the demo pool (uploaded once per
    build of the tiny guest); its name, for templates that import a disk."""
    guest = tinyguest.cached(settings.DEMO_DIR)
    if guest is None:
        log("demo: building the tiny guest from Debian packages (first run only)")
        guest = tinyguest.build(settings.DEMO_DIR, log=log)
    # Named after the build, so a rebuilt tiny guest brings its disk anew.
    name = f"tiny-disk-{tinyguest.recipe_hash()[:12]}.img"
    hv = get_hypervisor(host.uri)
    storage.ensure_dir_pool(hv, DEMO_POOL_NAME, str(DEMO_POOL_PATH))
    # The pool's folder is one for every libvirtd on this machine: one upload at a time, and
    # each daemon looks at the folder again before it decides one is needed.
    settings.DEMO_DIR.mkdir(parents=True, exist_ok=True)
    with (settings.DEMO_DIR / ".tiny-disk.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        storage.refresh_pool(hv, DEMO_POOL_NAME)
        try:
            present = storage.get_volume(hv, DEMO_POOL_NAME, name)
        except NotFound:
            present = None
        if present is not None and present.capacity != guest.boot_image.stat().st_size:
            storage.delete_volume(hv, DEMO_POOL_NAME, name)  # a half-made upload
            present = None
        if present is None:
            log(f"demo: uploading the tiny guest's disk as {name}")
            storage.upload_file(hv, DEMO_POOL_NAME, name, guest.boot_image)
    return name


# Every provisioning mode of the lifecycle guide, each from the tiny guest's artefacts.
CDROM_TEMPLATE_NAME = "Tiny Linux (CD-ROM install)"
PXE_TEMPLATE_NAME = "Tiny Linux (PXE network install)"
TRANSIENT_TEMPLATE_NAME = "Tiny Linux (transient only)"
PERSISTENT_TEMPLATE_NAME = "Tiny Linux (persistent only)"
IMPORT_TEMPLATE_NAME = "Tiny Linux (import a disk)"
PXE_NETWORK_NAME = "vmportal-pxe"
PXE_BRIDGE = "vmportal-pxe0"
# The PXE installs' network: isolated (no <forward>), DHCP, BOOTP and TFTP from the host.
PXE_SUBNET = ipaddress.IPv4Network("192.168.151.0/24")


def _refuse_taken(hv: Hypervisor, name: str, subnet: ipaddress.IPv4Network) -> None:
    """HypervisorError when a libvirt network other than `name` already uses the subnet."""
    taken = [
        other
        for other, nets in networks.network_subnets(hv).items()
        if other != name and any(n.overlaps(subnet) for n in nets)
    ]
    if taken:
        raise HypervisorError(f"{subnet} is used by the libvirt network(s) {', '.join(taken)}")


def pxe_network(
    *,
    host: Host,
    subnet: ipaddress.IPv4Network = PXE_SUBNET,
    name: str = PXE_NETWORK_NAME,
    bridge: str = PXE_BRIDGE,
) -> Network:
    """The isolated PXE network on the host (made if missing), serving the tiny guest's TFTP
    root, and its row."""
    guest = tinyguest.cached(settings.DEMO_DIR) or tinyguest.build(settings.DEMO_DIR)
    root = BOOT_DIR / "pxe"
    root.mkdir(parents=True, exist_ok=True)
    for source in guest.pxe_root.rglob("*"):
        dest = root / source.relative_to(guest.pxe_root)
        if source.is_dir():
            dest.mkdir(exist_ok=True)
            dest.chmod(0o755)
        else:
            _publish(source, dest)
    root.chmod(0o755)
    hv = get_hypervisor(host.uri)
    _refuse_taken(hv, name, subnet)
    networks.ensure_network(
        hv,
        name,
        bridge=bridge,
        subnet=subnet,
        nat=False,
        tftp_root=str(root),
        boot_file="pxelinux.0",
    )
    row, _ = Network.objects.update_or_create(
        host=host, name=name, defaults={"source": name, "kind": Network.Kind.NETWORK}
    )
    return row


def demo_seed_methods(
    *, host: Host, log: Callable[[str], None] = print, pxe: Network | None = None
) -> list[GuestTemplate]:
    """The other five modes beside the direct kernel install: CD-ROM, PXE (on `pxe`, the
    isolated PXE network; none without it), transient only, persistent only and import of a
    disk, all from the tiny guest."""
    demo_seed(host=host, log=log)
    guest = tinyguest.cached(settings.DEMO_DIR) or tinyguest.build(settings.DEMO_DIR, log=log)
    iso, runtime = BOOT_DIR / "tiny.iso", BOOT_DIR / "tiny-runtime-initrd.img"
    _publish(guest.iso, iso)
    _publish(guest.runtime_initrd, runtime)
    disk = demo_disk(host=host, log=log)
    pool = StoragePool.objects.get(host=host, name=DEMO_POOL_NAME)
    with transaction.atomic():
        iso_media, _ = Media.objects.update_or_create(
            name="Tiny Linux installer ISO",
            defaults={
                "kind": Media.Kind.ISO,
                "path": str(iso),
                "description": "isolinux + installer",
            },
        )
        runtime_media, _ = Media.objects.update_or_create(
            name="Tiny Linux kernel + runtime initrd",
            defaults={
                "kind": Media.Kind.KERNEL,
                "kernel_path": str(BOOT_DIR / "tiny-vmlinuz"),
                "initrd_path": str(runtime),
                "description": "The tiny guest's runtime, booted directly (no install).",
            },
        )
        wanted: list[tuple[str, dict[str, Any]]] = [
            (
                CDROM_TEMPLATE_NAME,
                {
                    "description": "Installs from the tiny guest's ISO: the blank disk falls "
                    "through to the CD-ROM, whose installer writes the disk and powers off.",
                    "method": GuestTemplate.Method.CDROM,
                    "media": iso_media,
                },
            ),
            (
                PXE_TEMPLATE_NAME,
                {
                    "description": "Installs over the isolated PXE network: the blank disk falls "
                    "through to the network boot, and pxelinux starts the installer from TFTP.",
                    "method": GuestTemplate.Method.PXE,
                    "network": pxe,
                },
            ),
            (
                TRANSIENT_TEMPLATE_NAME,
                {
                    "description": "The tiny guest's installed disk, copied and started with no "
                    "persistent config. Start paused and autodestroy are yours to pick.",
                    "method": GuestTemplate.Method.IMPORT,
                    "lifecycle": GuestTemplate.Lifecycle.TRANSIENT,
                    "base_volume": disk,
                },
            ),
            (
                PERSISTENT_TEMPLATE_NAME,
                {
                    "description": "No installer: a persistent guest that boots the tiny guest's "
                    "kernel and runtime on every boot.",
                    "method": GuestTemplate.Method.KERNEL,
                    "lifecycle": GuestTemplate.Lifecycle.PERSISTENT,
                    "media": runtime_media,
                    "final_boot": GuestTemplate.FinalBoot.KERNEL,
                    "kernel_cmdline": "console=ttyS0",
                },
            ),
            (
                IMPORT_TEMPLATE_NAME,
                {
                    "description": "A copy of an existing disk volume (the tiny guest's installed "
                    "disk), defined and started.",
                    "method": GuestTemplate.Method.IMPORT,
                    "lifecycle": GuestTemplate.Lifecycle.PERSISTENT,
                    "base_volume": disk,
                },
            ),
        ]
        made = []
        for name, fields in wanted:
            if fields.get("network", "") is None:
                continue
            template, created = GuestTemplate.objects.get_or_create(
                name=name, defaults={**_TINY_SIZES, "pool": pool, **fields}
            )
            if not created and template.base_volume and template.base_volume != disk:
                # A rebuilt tiny guest brought a new disk: the templates import that one.
                template.base_volume = disk
                template.save(update_fields=["base_volume"])
                template_saved(template=template, changed=True)
            elif created:
                template_saved(template=template, changed=False)
            made.append(template)
            log(f"demo: template '{name}' {'registered' if created else 'present'} on {host}")
    return made


DEBIAN_TEMPLATE_NAME = "Debian 12 (cloud-init)"
DEBIAN_MEDIA_NAME = "Debian 12 cloud image kernel + initrd"
DEBIAN_BASE_VOLUME = "debian-12-cloud-base.qcow2"
DEMO_NETWORK_NAME = "vmportal-demo"
DEMO_BRIDGE = "vmportal-br0"
# Guests of the demo network; a NAT network of its own, beside (never touching) the host's.
DEMO_SUBNET = ipaddress.IPv4Network("192.168.150.0/24")


def demo_network(
    *, host: Host, nat: bool = True, subnet: ipaddress.IPv4Network = DEMO_SUBNET
) -> Network:
    """The demo's libvirt network (NAT with DHCP) on the host, made if missing, and its row."""
    hv = get_hypervisor(host.uri)
    _refuse_taken(hv, DEMO_NETWORK_NAME, subnet)
    networks.ensure_network(hv, DEMO_NETWORK_NAME, bridge=DEMO_BRIDGE, subnet=subnet, nat=nat)
    network, _ = Network.objects.update_or_create(
        host=host,
        name=DEMO_NETWORK_NAME,
        defaults={"kind": Network.Kind.NETWORK, "source": DEMO_NETWORK_NAME},
    )
    return network


def demo_seed_debian(
    *, host: Host, network: Network | None = None, log: Callable[[str], None] = print
) -> GuestTemplate:
    """Build the Debian cloud image (cached) and register it as a cloud-init template on `host`:
    the image as a base volume of the demo pool, its kernel as media, the demo network."""
    image = debian.cached(settings.DEMO_DIR / "debian")
    if image is None:
        log("demo: building the Debian 12 cloud image from Debian packages (2-3 minutes)")
        image = debian.build(settings.DEMO_DIR / "debian", log=log)
    BOOT_DIR.mkdir(parents=True, exist_ok=True)
    kernel, initrd = BOOT_DIR / "debian-vmlinuz", BOOT_DIR / "debian-initrd.img"
    _publish(image.kernel, kernel)
    _publish(image.initrd, initrd)
    hv = get_hypervisor(host.uri)
    storage.ensure_dir_pool(hv, DEMO_POOL_NAME, str(DEMO_POOL_PATH))
    try:
        present = storage.get_volume(hv, DEMO_POOL_NAME, DEBIAN_BASE_VOLUME)
    except NotFound:
        present = None
    if present is not None and present.capacity == 0:
        storage.delete_volume(hv, DEMO_POOL_NAME, DEBIAN_BASE_VOLUME)
        present = None
    if present is None:
        log(f"demo: uploading the image as {DEBIAN_BASE_VOLUME}")
        storage.upload_file(hv, DEMO_POOL_NAME, DEBIAN_BASE_VOLUME, image.base, fmt="qcow2")
    network = network or demo_network(host=host)
    with transaction.atomic():
        pool, _ = StoragePool.objects.update_or_create(
            host=host, name=DEMO_POOL_NAME, defaults={"path": str(DEMO_POOL_PATH)}
        )
        media, _ = Media.objects.update_or_create(
            name=DEBIAN_MEDIA_NAME,
            defaults={
                "kind": Media.Kind.KERNEL,
                "kernel_path": str(kernel),
                "initrd_path": str(initrd),
                "description": f"The Debian 12 cloud image's own kernel {image.kernel_version}.",
            },
        )
        template, created = GuestTemplate.objects.get_or_create(
            name=DEBIAN_TEMPLATE_NAME,
            defaults={
                "description": (
                    "Debian 12 with cloud-init, SSH and the guest agent: your SSH keys go to the "
                    f"user {image.default_user}, the address shows once it has one. Boots to SSH "
                    "in about a minute under software emulation."
                ),
                "method": GuestTemplate.Method.CLOUD,
                "lifecycle": GuestTemplate.Lifecycle.PERSISTENT,
                "media": media,
                "pool": pool,
                "network": network,
                "base_volume": DEBIAN_BASE_VOLUME,
                "kernel_cmdline": image.cmdline,
                "cloud_user": image.default_user,
                "cloud_config": "#cloud-config\nssh_pwauth: false\n",
                "vcpus_min": 1,
                "vcpus_default": 2,
                "vcpus_max": 4,
                "memory_mib_min": 512,
                "memory_mib_default": 1024,
                "memory_mib_max": 4096,
                "disk_mib_min": 2048,
                "disk_mib_default": 3072,
                "disk_mib_max": 20480,
                "data_disk_mib_max": 4096,
            },
        )
    if created:
        template_saved(template=template, changed=False)
    log(f"demo: template '{template.name}' {'registered' if created else 'present'} on {host}")
    return template
