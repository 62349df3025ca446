"""The one set of factories every test folder builds its rows with.

Plain functions with sensible defaults; each keyword overrides a field. Rows only: nothing here
touches libvirt (see tests/support/libvirt.py for that).
"""

from __future__ import annotations

import itertools
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractUser

from provisioning import sshkeys
from provisioning.models import (
    Guest,
    GuestTemplate,
    Host,
    Media,
    Network,
    Quota,
    SshKey,
    StoragePool,
)
from tests.support.libvirt import TEST_POOL, TEST_URI

PASSWORD = "correct-horse-battery-staple"
# Where the demo publishes the tiny guest's kernel and installer (the test driver never reads them).
TINY_KERNEL = "/var/lib/libvirt/boot/vmportal/tiny-vmlinuz"
TINY_INITRD = "/var/lib/libvirt/boot/vmportal/tiny-initrd.img"
# Capacities no test reaches: placement then turns only on what a test sets itself (the test
# driver's own 8 GiB "test" domain counts against a host once reconcile lists it as unmanaged).
ROOMY = {"capacity_vcpus": 10_000, "capacity_memory_mib": 10**8, "capacity_disk_gib": 10**6}
BIG_QUOTA = {
    "max_guests": 10_000,
    "max_vcpus": 10_000,
    "max_memory_mib": 10**8,
    "max_disk_mib": 10**9,
}
_serial = itertools.count(1)


def _next(prefix: str) -> str:
    return f"{prefix}{next(_serial)}"


def make_user(
    username: str | None = None,
    *,
    staff: bool = False,
    superuser: bool = False,
    quota: dict[str, int] | None = None,
    password: str = PASSWORD,
) -> AbstractUser:
    """A user who can log in with `password`; `quota` gives them a Quota row with those limits."""
    users = get_user_model()
    name = username or _next("user")
    if superuser:
        user = users.objects.create_superuser(username=name, password=password)
    else:
        user = users.objects.create_user(username=name, password=password, is_staff=staff)
    if quota is not None:
        Quota.objects.create(user=user, **quota)
    return user


def make_host(
    name: str = "local",
    *,
    uri: str = TEST_URI,
    pool: str | None = TEST_POOL,
    roomy: bool = True,
    **fields: Any,
) -> Host:
    """A host (on this run's test driver by default) with a pool for guest disks."""
    values = {**(ROOMY if roomy else {}), **fields}
    host = Host.objects.create(name=name, uri=uri, **values)
    if pool is not None:
        make_pool(host, pool)
    return host


def make_pool(
    host: Host, name: str = TEST_POOL, *, path: str | None = None, **fields: Any
) -> StoragePool:
    """A registered storage pool on the host (the test driver's own pool by default)."""
    return StoragePool.objects.create(host=host, name=name, path=path or f"/{name}", **fields)


def make_network(
    host: Host, name: str = "lan", *, source: str = "default", **fields: Any
) -> Network:
    """A libvirt network guests of a template attach to."""
    return Network.objects.create(host=host, name=name, source=source, **fields)


def make_media(kind: str = Media.Kind.KERNEL, *, name: str | None = None, **fields: Any) -> Media:
    """Media: the tiny guest's kernel and initrd, or an ISO (give pool and volume, or a path)."""
    values: dict[str, Any] = {}
    if kind == Media.Kind.KERNEL:
        values = {"kernel_path": TINY_KERNEL, "initrd_path": TINY_INITRD}
    return Media.objects.create(
        name=name or _next(f"{kind} media "), kind=kind, **{**values, **fields}
    )


def make_template(
    *,
    name: str | None = None,
    method: str = GuestTemplate.Method.KERNEL,
    lifecycle: str = GuestTemplate.Lifecycle.INSTALL,
    host: Host | None = None,
    pool: StoragePool | None = None,
    media: Media | None = None,
    pinned_to: Host | None = None,
    **fields: Any,
) -> GuestTemplate:
    """A template users may pick; a kernel install on `host`'s pool by default.

    Small sizes (256 MiB memory, 64 MiB disk) and a five-minute install deadline, as the test
    driver needs; `host` pins nothing, it only picks the pool (`pinned_to` pins the template).
    """
    if pool is None and host is not None:
        pool = host.pools.filter(for_guest_disks=True).first()
    if media is None and method == GuestTemplate.Method.KERNEL:
        media = make_media(Media.Kind.KERNEL)
    values: dict[str, Any] = {
        "kernel_cmdline": "console=ttyS0 vmportal.install=1" if method == "kernel" else "",
        "memory_mib_default": 256,
        "disk_mib_min": 64,
        "disk_mib_default": 64,
        "install_timeout_minutes": 5,
    }
    values.update(fields)
    return GuestTemplate.objects.create(
        name=name or _next("Template "),
        method=method,
        lifecycle=lifecycle,
        pool=pool,
        media=media,
        host=pinned_to,
        **values,
    )


def make_guest(
    *,
    owner: AbstractUser,
    template: GuestTemplate | None = None,
    host: Host | None = None,
    name: str | None = None,
    state: str = Guest.State.RUNNING,
    **fields: Any,
) -> Guest:
    """A guest's row only (no domain behind it): enough for pages, quotas and placement."""
    if host is None:
        host = template.pool.host if template is not None and template.pool else Host.objects.get()
    values: dict[str, Any] = {
        "mac": "52:54:00:12:34:56",
        "persistent": state != Guest.State.UNDEFINED,
        "template_version": template.version if template is not None else None,
    }
    values.update(fields)
    return Guest.objects.create(
        owner=owner,
        host=host,
        template=template,
        name=name or _next("guest"),
        state=state,
        **values,
    )


def new_public_key(kind: str = "ed25519", *, bits: int = 2048, comment: str = "") -> str:
    """A new key's authorized_keys line: ed25519, ecdsa (bits: 256, 384 or 521) or rsa."""
    key: Any
    if kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    elif kind == "ecdsa":
        curve = {256: ec.SECP256R1, 384: ec.SECP384R1, 521: ec.SECP521R1}[bits]
        key = ec.generate_private_key(curve())
    elif kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    else:
        raise ValueError(f"no key kind {kind}")
    line = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    return f"{line} {comment}" if comment else line


def make_ssh_key(
    *, owner: AbstractUser, name: str | None = None, public_key: str | None = None
) -> SshKey:
    """A key in the owner's profile (a new ed25519 key unless `public_key` gives one)."""
    key = sshkeys.parse(public_key or new_public_key(comment=f"{owner.get_username()}@laptop"))
    return SshKey.objects.create(
        owner=owner, name=name or _next("key"), public_key=key.line, fingerprint=key.fingerprint
    )
