"""Storage pools and volumes: callers name pools and volumes, host paths only come back out."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import BinaryIO

import libvirt
from lxml import etree

from .connection import Hypervisor
from .errors import AlreadyExists, NotFound, classify
from .types import PoolInfo, VolumeInfo

log = logging.getLogger(__name__)

__all__ = [
    "clone_volume",
    "create_overlay",
    "create_volume",
    "delete_volume",
    "ensure_dir_pool",
    "get_pool",
    "get_volume",
    "list_volumes",
    "refresh_pool",
    "remove_pool",
    "upload_bytes",
    "upload_file",
]

UPLOAD_CHUNK = 1024 * 1024


def _parser() -> etree.XMLParser:
    return etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


def _parse(xml: str) -> etree._Element:
    return etree.fromstring(xml.encode(), _parser())


def _tostring(root: etree._Element) -> str:
    return etree.tostring(root, encoding="unicode")


def _pool_info(pool: libvirt.virStoragePool) -> PoolInfo:
    root = _parse(pool.XMLDesc(0))
    _state, capacity, allocation, available = pool.info()
    return PoolInfo(
        name=pool.name(),
        uuid=pool.UUIDString(),
        type=root.get("type", ""),
        path=root.findtext("target/path") or "",
        active=bool(pool.isActive()),
        autostart=bool(pool.autostart()),
        persistent=bool(pool.isPersistent()),
        capacity=int(capacity),
        allocation=int(allocation),
        available=int(available),
    )


def _volume_info(pool_name: str, vol: libvirt.virStorageVol) -> VolumeInfo:
    root = _parse(vol.XMLDesc(0))
    fmt_el = root.find("target/format")
    _type, capacity, allocation = vol.info()
    return VolumeInfo(
        pool=pool_name,
        name=vol.name(),
        capacity=int(capacity),
        allocation=int(allocation),
        format=fmt_el.get("type", "") if fmt_el is not None else "",
        path=vol.path(),
    )


def _dir_pool_xml(name: str, path: str) -> str:
    root = etree.Element("pool", type="dir")
    etree.SubElement(root, "name").text = name
    target = etree.SubElement(root, "target")
    etree.SubElement(target, "path").text = path
    return _tostring(root)


def _volume_xml(name: str, capacity_bytes: int, fmt: str) -> str:
    root = etree.Element("volume")
    etree.SubElement(root, "name").text = name
    etree.SubElement(root, "capacity", unit="bytes").text = str(int(capacity_bytes))
    # Thin volumes: qcow2 grows on write; raw files are created sparse.
    etree.SubElement(root, "allocation", unit="bytes").text = "0"
    target = etree.SubElement(root, "target")
    etree.SubElement(target, "format", type=fmt)
    return _tostring(root)


def get_pool(hv: Hypervisor, name: str) -> PoolInfo:
    """A pool's facts; NotFound if there is no such pool."""
    return hv.call(lambda conn: _pool_info(conn.storagePoolLookupByName(name)))


def ensure_dir_pool(hv: Hypervisor, name: str, path: str) -> PoolInfo:
    """A directory pool at path, defined, built, started and autostarted. Idempotent."""
    wanted = os.path.normpath(path)

    def run(conn: libvirt.virConnect) -> PoolInfo:
        try:
            pool = conn.storagePoolLookupByName(name)
        except libvirt.libvirtError as exc:
            if not isinstance(classify(exc), NotFound):
                raise
            try:
                pool = conn.storagePoolDefineXML(_dir_pool_xml(name, wanted), 0)
            except libvirt.libvirtError as define_exc:
                # Another process defined it in the meantime: use theirs.
                if not isinstance(classify(define_exc), AlreadyExists):
                    raise
                pool = conn.storagePoolLookupByName(name)
        info = _pool_info(pool)
        if info.type != "dir" or os.path.normpath(info.path) != wanted:
            raise AlreadyExists(
                f"storage pool {name!r} exists as a {info.type} pool at {info.path}, not {wanted}"
            )
        if not info.active:
            # Building a dir pool only creates its directory; an existing one is fine.
            pool.build(0)
            try:
                pool.create(0)
            except libvirt.libvirtError:
                if not pool.isActive():  # someone else started it: fine
                    raise
        if info.persistent and not info.autostart:
            pool.setAutostart(1)
        return _pool_info(pool)

    return hv.call(run)


def refresh_pool(hv: Hypervisor, name: str) -> None:
    """Have libvirt look at the pool's storage again (files another daemon put in its folder)."""
    hv.call(lambda conn: conn.storagePoolLookupByName(name).refresh(0))


def remove_pool(hv: Hypervisor, name: str, *, delete_volumes: bool = False) -> None:
    """Stop and undefine a pool (optionally deleting its volumes first). Idempotent.

    The pool's directory stays unless it is empty; volumes are only deleted when asked.
    """

    def run(conn: libvirt.virConnect) -> None:
        try:
            pool = conn.storagePoolLookupByName(name)
        except libvirt.libvirtError as exc:
            if isinstance(classify(exc), NotFound):
                return
            raise
        if pool.isActive():
            if delete_volumes:
                pool.refresh(0)
                for vol in pool.listAllVolumes(0):
                    vol.delete(0)
            pool.destroy()
        if pool.isPersistent():
            try:
                pool.delete(0)  # only an inactive pool; removes the directory if empty
            except libvirt.libvirtError as exc:
                log.info("pool %s keeps its directory: %s", name, exc)
            pool.undefine()

    hv.call(run)


def _lookup_volume(conn: libvirt.virConnect, pool: str, name: str) -> libvirt.virStorageVol:
    return conn.storagePoolLookupByName(pool).storageVolLookupByName(name)


def get_volume(hv: Hypervisor, pool: str, name: str) -> VolumeInfo:
    """A volume's facts; NotFound if the pool or volume is missing."""
    return hv.call(lambda conn: _volume_info(pool, _lookup_volume(conn, pool, name)))


def list_volumes(hv: Hypervisor, pool: str) -> list[VolumeInfo]:
    """Every volume in a pool."""

    def read(conn: libvirt.virConnect) -> list[VolumeInfo]:
        result = []
        for vol in conn.storagePoolLookupByName(pool).listAllVolumes(0):
            try:
                result.append(_volume_info(pool, vol))
            except libvirt.libvirtError as exc:
                if not isinstance(classify(exc), NotFound):  # deleted since the listing
                    raise
        return result

    return hv.call(read)


def _refuse_existing(pool: libvirt.virStoragePool, pool_name: str, name: str) -> None:
    try:
        pool.storageVolLookupByName(name)
    except libvirt.libvirtError as exc:
        if isinstance(classify(exc), NotFound):
            return
        raise
    raise AlreadyExists(f"volume {name!r} already exists in pool {pool_name!r}")


def create_volume(
    hv: Hypervisor, pool: str, name: str, capacity_bytes: int, fmt: str = "qcow2"
) -> VolumeInfo:
    """A new empty volume; AlreadyExists if the name is taken."""

    def run(conn: libvirt.virConnect) -> VolumeInfo:
        pool_obj = conn.storagePoolLookupByName(pool)
        _refuse_existing(pool_obj, pool, name)
        vol = pool_obj.createXML(_volume_xml(name, capacity_bytes, fmt), 0)
        return _volume_info(pool, vol)

    return hv.call(run, idempotent=False)


def clone_volume(
    hv: Hypervisor, pool: str, base: str, name: str, *, fmt: str | None = None
) -> VolumeInfo:
    """A full copy of volume base (same pool) named name, in base's format unless fmt."""

    def run(conn: libvirt.virConnect) -> VolumeInfo:
        pool_obj = conn.storagePoolLookupByName(pool)
        base_vol = pool_obj.storageVolLookupByName(base)
        _refuse_existing(pool_obj, pool, name)
        base_info = _volume_info(pool, base_vol)
        xml = _volume_xml(name, base_info.capacity, fmt or base_info.format or "raw")
        vol = pool_obj.createXMLFrom(xml, base_vol, 0)
        return _volume_info(pool, vol)

    return hv.call(run, idempotent=False)


def delete_volume(hv: Hypervisor, pool: str, name: str) -> bool:
    """Delete a volume; False if it was not there. Idempotent."""

    def run(conn: libvirt.virConnect) -> bool:
        try:
            _lookup_volume(conn, pool, name).delete(0)
        except libvirt.libvirtError as exc:
            if isinstance(classify(exc), NotFound):
                return False
            raise
        return True

    return hv.call(run)


def upload_file(
    hv: Hypervisor, pool: str, name: str, local_path: str | Path, *, fmt: str = "raw"
) -> VolumeInfo:
    """Copy a local file into a new volume through a libvirt stream (registers media).

    A failed upload deletes the half-written volume.
    """
    source = Path(local_path)
    with source.open("rb") as handle:
        return _upload(hv, pool, name, source.stat().st_size, handle, fmt)


def upload_bytes(
    hv: Hypervisor, pool: str, name: str, data: bytes, *, fmt: str = "raw"
) -> VolumeInfo:
    """A new volume holding `data` (a cloud-init seed); Unsupported where the driver takes no
    uploads (libvirt's test driver). A failed upload deletes the half-written volume."""
    return _upload(hv, pool, name, len(data), io.BytesIO(data), fmt)


def _upload(
    hv: Hypervisor, pool: str, name: str, size: int, handle: BinaryIO, fmt: str
) -> VolumeInfo:
    def run(conn: libvirt.virConnect) -> VolumeInfo:
        pool_obj = conn.storagePoolLookupByName(pool)
        _refuse_existing(pool_obj, pool, name)
        vol = pool_obj.createXML(_volume_xml(name, size, fmt), 0)
        stream = conn.newStream(0)
        handle.seek(0)
        try:
            vol.upload(stream, 0, size, 0)

            def chunk(_stream: libvirt.virStream, nbytes: int, _opaque: object) -> bytes:
                return handle.read(min(nbytes, UPLOAD_CHUNK))

            stream.sendAll(chunk, None)
            stream.finish()
        except BaseException:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            try:
                vol.delete(0)
            except libvirt.libvirtError as exc:
                log.warning("could not delete half-uploaded volume %s/%s: %s", pool, name, exc)
            raise
        return _volume_info(pool, vol)

    return hv.call(run, idempotent=False)


def create_overlay(
    hv: Hypervisor, pool: str, base: str, name: str, capacity_bytes: int
) -> VolumeInfo:
    """A new qcow2 volume whose backing file is volume `base` of the same pool (copy on write).

    Its size is `capacity_bytes`, or the base's when that is larger (an overlay cannot be
    smaller than what it is backed by); AlreadyExists if the name is taken, NotFound without
    the base.
    """

    def run(conn: libvirt.virConnect) -> VolumeInfo:
        pool_obj = conn.storagePoolLookupByName(pool)
        base_vol = pool_obj.storageVolLookupByName(base)
        _refuse_existing(pool_obj, pool, name)
        base_info = _volume_info(pool, base_vol)
        root = _parse(_volume_xml(name, max(capacity_bytes, base_info.capacity), "qcow2"))
        backing = etree.SubElement(root, "backingStore")
        etree.SubElement(backing, "path").text = base_info.path
        etree.SubElement(backing, "format", type=base_info.format or "raw")
        vol = pool_obj.createXML(_tostring(root), 0)
        return _volume_info(pool, vol)

    return hv.call(run, idempotent=False)
