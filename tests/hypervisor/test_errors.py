"""libvirt errors are classified into the classes callers act on."""

from __future__ import annotations

from collections.abc import Callable

import libvirt
import pytest

from provisioning.hypervisor import (
    AlreadyExists,
    Busy,
    ConnectionLost,
    Hypervisor,
    HypervisorError,
    InvalidConfig,
    NotFound,
    Unreachable,
    Unsupported,
    WrongState,
    classify,
    define,
    resume,
    start,
    suspend,
    translated,
    translating,
)
from provisioning.hypervisor.connection import open_connection
from tests.support.domains import UNREACHABLE_TEST_URI, new_uuid
from tests.support.libvirt import TEST_POOL


def fake_error(code: int, domain: int, message: str = "boom") -> libvirt.libvirtError:
    """A libvirtError carrying the given code and domain, as libvirt would fill it in."""
    exc = libvirt.libvirtError(message)
    exc.err = (code, domain, message, libvirt.VIR_ERR_ERROR, None, None, None, 0, 0)
    return exc


@pytest.mark.parametrize(
    ("code", "domain", "message", "expected"),
    [
        (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU, "Domain not found", NotFound),
        (libvirt.VIR_ERR_NO_STORAGE_VOL, libvirt.VIR_FROM_STORAGE, "no vol", NotFound),
        (libvirt.VIR_ERR_NO_STORAGE_POOL, libvirt.VIR_FROM_STORAGE, "no pool", NotFound),
        (libvirt.VIR_ERR_NO_NETWORK, libvirt.VIR_FROM_NETWORK, "no net", NotFound),
        (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_FROM_QEMU, "not running", WrongState),
        (libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_FROM_QEMU, "job", Busy),
        (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_FROM_QEMU, "agent", Busy),
        (libvirt.VIR_ERR_XML_ERROR, libvirt.VIR_FROM_DOMAIN, "bad", InvalidConfig),
        (libvirt.VIR_ERR_XML_INVALID_SCHEMA, libvirt.VIR_FROM_XML, "schema", InvalidConfig),
        (libvirt.VIR_ERR_CONFIG_UNSUPPORTED, libvirt.VIR_FROM_QEMU, "cfg", InvalidConfig),
        (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_FROM_QEMU, "bad arg", InvalidConfig),
        (
            libvirt.VIR_ERR_INVALID_ARG,
            libvirt.VIR_FROM_TEST,
            "unsupported flags (0x4)",
            Unsupported,
        ),
        (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_FROM_DOMAIN, "not supported", Unsupported),
        (libvirt.VIR_ERR_DOM_EXIST, libvirt.VIR_FROM_QEMU, "exists", AlreadyExists),
        (libvirt.VIR_ERR_STORAGE_VOL_EXIST, libvirt.VIR_FROM_STORAGE, "vol", AlreadyExists),
        (
            libvirt.VIR_ERR_OPERATION_FAILED,
            libvirt.VIR_FROM_DOMAIN,
            "domain 'x' already exists with uuid 1",
            AlreadyExists,
        ),
        (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, "End of file", ConnectionLost),
        (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_RPC, "socket closed", ConnectionLost),
        (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_REMOTE, "gone", ConnectionLost),
        (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_FROM_NONE, "no conn", ConnectionLost),
        (libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_FROM_NONE, "invalid conn", ConnectionLost),
        (libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_FROM_AUTH, "denied", Unreachable),
        (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_TEST, "not paused", HypervisorError),
        (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_QEMU, "disk full", HypervisorError),
        (libvirt.VIR_ERR_OPERATION_FAILED, libvirt.VIR_FROM_QEMU, "failed", HypervisorError),
    ],
)
def test_it_classifies_by_code_and_domain(
    code: int, domain: int, message: str, expected: type[HypervisorError]
) -> None:
    err = classify(fake_error(code, domain, message))

    assert type(err) is expected
    assert (err.code, err.domain, err.message) == (code, domain, message)


def test_it_names_the_error_code() -> None:
    assert classify(fake_error(libvirt.VIR_ERR_NO_DOMAIN, 0)).code_name == "VIR_ERR_NO_DOMAIN"


def test_unreachable_is_a_kind_of_connection_lost() -> None:
    assert issubclass(Unreachable, ConnectionLost)


def test_translating_keeps_the_libvirt_error_as_the_cause() -> None:
    original = fake_error(libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU)

    with pytest.raises(NotFound) as caught, translating():
        raise original

    assert caught.value.__cause__ is original


def test_translated_decorates_a_function() -> None:
    @translated
    def broken() -> None:
        raise fake_error(libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_FROM_QEMU)

    with pytest.raises(Busy):
        broken()


# --- real errors from the test driver -----------------------------------------------------


def raw_error(fn: Callable[[], object]) -> HypervisorError:
    with pytest.raises(libvirt.libvirtError) as caught:
        fn()
    return classify(caught.value)


def test_a_missing_domain_is_not_found(test_hv: Hypervisor) -> None:
    conn = test_hv.connection()

    err = raw_error(lambda: conn.lookupByUUIDString(new_uuid()))

    assert isinstance(err, NotFound)


def test_a_missing_pool_and_volume_are_not_found(test_hv: Hypervisor) -> None:
    conn = test_hv.connection()
    pool = conn.storagePoolLookupByName(TEST_POOL)

    assert isinstance(raw_error(lambda: conn.storagePoolLookupByName("nope")), NotFound)
    assert isinstance(raw_error(lambda: pool.storageVolLookupByName("nope")), NotFound)


def test_broken_xml_is_invalid_config(test_hv: Hypervisor) -> None:
    with pytest.raises(InvalidConfig):
        define(test_hv, "<domain type='test'><name>x</name")


def test_schema_violations_are_invalid_config(test_hv: Hypervisor, make_guest) -> None:
    _uuid, xml = make_guest()

    with pytest.raises(InvalidConfig):
        define(test_hv, xml.replace("<devices", "<bogus/><devices"))


def test_a_name_clash_is_already_exists(test_hv: Hypervisor, make_guest) -> None:
    uuid, xml = make_guest()
    define(test_hv, xml)
    other_uuid, _ = make_guest()

    with pytest.raises(AlreadyExists):
        define(test_hv, xml.replace(uuid, other_uuid))


def test_the_test_drivers_internal_error_is_wrong_state_after_a_state_check(
    test_hv: Hypervisor, make_guest
) -> None:
    uuid, xml = make_guest()
    define(test_hv, xml)
    start(test_hv, uuid)
    conn = test_hv.connection()
    # The raw code says nothing about state on this driver...
    assert type(raw_error(lambda: conn.lookupByUUIDString(uuid).resume())) is HypervisorError

    # ...so the operation re-reads the state and recognises the wrong one.
    with pytest.raises(WrongState) as caught:
        resume(test_hv, uuid)

    assert caught.value.state == "running"


def test_operation_invalid_is_wrong_state(test_hv: Hypervisor, make_guest) -> None:
    uuid, xml = make_guest()
    define(test_hv, xml)
    conn = test_hv.connection()

    err = raw_error(lambda: conn.lookupByUUIDString(uuid).managedSave(0))

    assert isinstance(err, WrongState)
    with pytest.raises(WrongState) as caught:
        suspend(test_hv, uuid)
    assert caught.value.state == "defined"


def test_an_unreachable_daemon_is_unreachable() -> None:
    with pytest.raises(Unreachable):
        open_connection(UNREACHABLE_TEST_URI)
