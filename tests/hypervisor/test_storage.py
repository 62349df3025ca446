"""Storage pools and volumes through the test driver."""

from __future__ import annotations

import uuid as uuid_module
from collections.abc import Iterator

import pytest

from provisioning.hypervisor import (
    AlreadyExists,
    Hypervisor,
    NotFound,
    clone_volume,
    create_volume,
    delete_volume,
    ensure_dir_pool,
    get_pool,
    get_volume,
    list_volumes,
    remove_pool,
)
from tests.support.libvirt import TEST_POOL as POOL

MIB = 1024 * 1024


@pytest.fixture
def volume_name(test_hv: Hypervisor) -> Iterator[str]:
    """A fresh volume name in the default pool; it and its clone are deleted afterwards."""
    name = f"vmportal-hvtest-{uuid_module.uuid4().hex[:8]}.qcow2"
    yield name
    delete_volume(test_hv, POOL, name)
    delete_volume(test_hv, POOL, clone_of(name))


def clone_of(name: str) -> str:
    return name.replace(".qcow2", "-clone.qcow2")


@pytest.fixture
def pool_name(test_hv: Hypervisor) -> Iterator[str]:
    name = f"vmportal-hvtest-{uuid_module.uuid4().hex[:8]}"
    yield name
    remove_pool(test_hv, name, delete_volumes=True)


def test_create_volume_reports_size_format_and_path(test_hv: Hypervisor, volume_name: str) -> None:
    info = create_volume(test_hv, POOL, volume_name, 8 * MIB)

    assert (info.pool, info.name, info.capacity, info.format) == (
        POOL,
        volume_name,
        8 * MIB,
        "qcow2",
    )
    assert info.path.endswith(volume_name)
    assert get_volume(test_hv, POOL, volume_name) == info


def test_create_volume_refuses_a_taken_name(test_hv: Hypervisor, volume_name: str) -> None:
    create_volume(test_hv, POOL, volume_name, MIB)

    with pytest.raises(AlreadyExists):
        create_volume(test_hv, POOL, volume_name, 2 * MIB)

    assert get_volume(test_hv, POOL, volume_name).capacity == MIB


def test_clone_volume_copies_size_and_format(test_hv: Hypervisor, volume_name: str) -> None:
    create_volume(test_hv, POOL, volume_name, 4 * MIB)

    info = clone_volume(test_hv, POOL, volume_name, clone_of(volume_name))

    assert (info.name, info.capacity, info.format) == (clone_of(volume_name), 4 * MIB, "qcow2")
    assert info.path != get_volume(test_hv, POOL, volume_name).path


def test_clone_of_a_missing_base_is_not_found(test_hv: Hypervisor, volume_name: str) -> None:
    with pytest.raises(NotFound):
        clone_volume(test_hv, POOL, "vmportal-no-such-base.qcow2", volume_name)


def test_delete_volume_is_idempotent(test_hv: Hypervisor, volume_name: str) -> None:
    create_volume(test_hv, POOL, volume_name, MIB)

    assert delete_volume(test_hv, POOL, volume_name) is True
    assert delete_volume(test_hv, POOL, volume_name) is False
    with pytest.raises(NotFound):
        get_volume(test_hv, POOL, volume_name)


def test_list_volumes_includes_new_volumes(test_hv: Hypervisor, volume_name: str) -> None:
    create_volume(test_hv, POOL, volume_name, MIB)

    assert volume_name in {info.name for info in list_volumes(test_hv, POOL)}


def test_ensure_dir_pool_defines_starts_and_autostarts_once(
    test_hv: Hypervisor, pool_name: str
) -> None:
    first = ensure_dir_pool(test_hv, pool_name, f"/{pool_name}")
    second = ensure_dir_pool(test_hv, pool_name, f"/{pool_name}/")

    assert (first.type, first.path, first.active, first.autostart) == (
        "dir",
        f"/{pool_name}",
        True,
        True,
    )
    assert second == first


def test_ensure_dir_pool_restarts_a_stopped_pool(test_hv: Hypervisor, pool_name: str) -> None:
    ensure_dir_pool(test_hv, pool_name, f"/{pool_name}")
    test_hv.connection().storagePoolLookupByName(pool_name).destroy()

    assert ensure_dir_pool(test_hv, pool_name, f"/{pool_name}").active


def test_ensure_dir_pool_refuses_a_pool_elsewhere(test_hv: Hypervisor, pool_name: str) -> None:
    ensure_dir_pool(test_hv, pool_name, f"/{pool_name}")

    with pytest.raises(AlreadyExists):
        ensure_dir_pool(test_hv, pool_name, "/somewhere/else")


def test_volumes_in_a_new_dir_pool(test_hv: Hypervisor, pool_name: str) -> None:
    ensure_dir_pool(test_hv, pool_name, f"/{pool_name}")

    info = create_volume(test_hv, pool_name, "disk.qcow2", 2 * MIB)

    assert info.pool == pool_name
    assert [v.name for v in list_volumes(test_hv, pool_name)] == ["disk.qcow2"]


def test_remove_pool_is_idempotent(test_hv: Hypervisor, pool_name: str) -> None:
    ensure_dir_pool(test_hv, pool_name, f"/{pool_name}")

    remove_pool(test_hv, pool_name)
    remove_pool(test_hv, pool_name)

    with pytest.raises(NotFound):
        get_pool(test_hv, pool_name)
