"""Guest lifecycle through a real libvirtd's test driver."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioning.hypervisor import (
    DomainInfo,
    GuestState,
    Hypervisor,
    InvalidConfig,
    NotFound,
    Unsupported,
    WrongState,
    create_transient,
    define,
    destroy,
    find_by_metadata,
    find_by_name,
    get_info,
    get_xml,
    has_managed_save,
    job_stats,
    list_domains,
    make_persistent,
    managed_save,
    reboot,
    remove_managed_save,
    restore,
    resume,
    save,
    set_autostart,
    shutdown,
    start,
    suspend,
    undefine,
    wait_for_stop,
)
from tests.support.domains import METADATA_NS, new_uuid


@pytest.fixture
def defined(test_hv: Hypervisor, make_guest) -> str:
    uuid, xml = make_guest()
    define(test_hv, xml)
    return uuid


@pytest.fixture
def running(test_hv: Hypervisor, defined: str) -> str:
    start(test_hv, defined)
    return defined


def test_define_makes_a_persistent_stopped_guest(test_hv: Hypervisor, make_guest) -> None:
    uuid, xml = make_guest(memory_mib=32)

    info = define(test_hv, xml)

    assert info.uuid == uuid
    assert info.state is GuestState.DEFINED
    assert info.persistent
    assert info.id is None
    assert info.memory_kib == 32 * 1024
    assert info.vcpus == 1


def test_define_validates_against_the_schema(test_hv: Hypervisor, make_guest) -> None:
    uuid, xml = make_guest()

    with pytest.raises(InvalidConfig):
        define(test_hv, xml.replace("<vcpu>", "<vcpu bogus='1'>"))

    assert get_info(test_hv, uuid).state is GuestState.UNDEFINED


def test_an_unknown_guest_reads_as_undefined(test_hv: Hypervisor) -> None:
    uuid = new_uuid()

    info = get_info(test_hv, uuid)

    assert info == DomainInfo.undefined(uuid)
    assert not info.exists


def test_start_boots_a_defined_guest(test_hv: Hypervisor, defined: str) -> None:
    info = start(test_hv, defined)

    assert info.state is GuestState.RUNNING
    assert info.reason == "booted"
    assert info.libvirt_state == "running"
    assert info.id is not None


def test_start_refuses_a_running_guest(test_hv: Hypervisor, running: str) -> None:
    with pytest.raises(WrongState) as caught:
        start(test_hv, running)

    assert caught.value.state == GuestState.RUNNING


def test_start_of_an_unknown_guest_is_not_found(test_hv: Hypervisor) -> None:
    with pytest.raises(NotFound):
        start(test_hv, new_uuid())


def test_suspend_and_resume(test_hv: Hypervisor, running: str) -> None:
    paused = suspend(test_hv, running)
    resumed = resume(test_hv, running)

    assert (paused.state, paused.reason) == (GuestState.PAUSED, "user")
    assert (resumed.state, resumed.reason) == (GuestState.RUNNING, "unpaused")


def test_suspend_refuses_a_paused_guest(test_hv: Hypervisor, running: str) -> None:
    suspend(test_hv, running)

    with pytest.raises(WrongState) as caught:
        suspend(test_hv, running)

    assert caught.value.state == GuestState.PAUSED


def test_shutdown_applies_on_poweroff(test_hv: Hypervisor, running: str) -> None:
    shutdown(test_hv, running)

    info = wait_for_stop(test_hv, running, timeout=5)

    assert (info.state, info.reason) == (GuestState.DEFINED, "shutdown")


def test_shutdown_refuses_a_stopped_guest(test_hv: Hypervisor, defined: str) -> None:
    with pytest.raises(WrongState):
        shutdown(test_hv, defined)


def test_wait_for_stop_returns_the_running_guest_at_the_deadline(
    test_hv: Hypervisor, running: str
) -> None:
    info = wait_for_stop(test_hv, running, timeout=0.3)

    assert info.state is GuestState.RUNNING


def test_reboot_with_on_reboot_destroy_ends_the_run(test_hv: Hypervisor, make_guest) -> None:
    uuid, xml = make_guest(on_reboot="destroy")
    define(test_hv, xml)
    start(test_hv, uuid)

    reboot(test_hv, uuid)

    assert get_info(test_hv, uuid).state is GuestState.DEFINED


def test_reboot_with_on_reboot_restart_keeps_running(test_hv: Hypervisor, running: str) -> None:
    info = reboot(test_hv, running)

    assert info.state is GuestState.RUNNING


def test_destroy_stops_a_guest_and_is_idempotent(test_hv: Hypervisor, running: str) -> None:
    first = destroy(test_hv, running)
    second = destroy(test_hv, running)

    assert (first.state, first.reason) == (GuestState.DEFINED, "destroyed")
    assert second == first


def test_destroy_of_an_unknown_guest_is_done(test_hv: Hypervisor) -> None:
    uuid = new_uuid()

    assert destroy(test_hv, uuid) == DomainInfo.undefined(uuid)


def test_save_and_restore_through_a_file(test_hv: Hypervisor, running: str, tmp_path: Path) -> None:
    image = tmp_path / "guest.save"

    saved = save(test_hv, running, str(image))
    restored = restore(test_hv, str(image))

    assert (saved.state, saved.reason) == (GuestState.SAVED, "saved")
    assert (restored.uuid, restored.state, restored.reason) == (
        running,
        GuestState.RUNNING,
        "restored",
    )


def test_restore_paused_is_unsupported_on_the_test_driver(
    test_hv: Hypervisor, running: str, tmp_path: Path
) -> None:
    image = tmp_path / "guest.save"
    save(test_hv, running, str(image))

    with pytest.raises(Unsupported):
        restore(test_hv, str(image), paused=True)


def test_managed_save_is_detected_and_removable(test_hv: Hypervisor, running: str) -> None:
    saved = managed_save(test_hv, running)

    assert saved.state is GuestState.SAVED
    assert saved.has_managed_save
    assert has_managed_save(test_hv, running)

    removed = remove_managed_save(test_hv, running)
    again = remove_managed_save(test_hv, running)

    assert not removed.has_managed_save
    assert not has_managed_save(test_hv, running)
    assert again == removed


def test_start_resumes_from_a_managed_save(test_hv: Hypervisor, running: str) -> None:
    managed_save(test_hv, running)

    info = start(test_hv, running)

    assert info.state is GuestState.RUNNING
    assert not info.has_managed_save


def test_managed_save_of_a_stopped_guest_is_wrong_state(test_hv: Hypervisor, defined: str) -> None:
    with pytest.raises(WrongState):
        managed_save(test_hv, defined)


def test_has_managed_save_of_an_unknown_guest_is_false(test_hv: Hypervisor) -> None:
    assert has_managed_save(test_hv, new_uuid()) is False


def test_autostart_flag(test_hv: Hypervisor, defined: str) -> None:
    on = set_autostart(test_hv, defined, True)
    off = set_autostart(test_hv, defined, False)

    assert on.autostart
    assert not off.autostart


def test_undefine_removes_a_stopped_guest_and_is_idempotent(
    test_hv: Hypervisor, defined: str
) -> None:
    first = undefine(test_hv, defined)
    second = undefine(test_hv, defined)

    assert first.state is GuestState.UNDEFINED
    assert second.state is GuestState.UNDEFINED


def test_undefine_falls_back_from_flags_the_driver_refuses(
    test_hv: Hypervisor, running: str
) -> None:
    managed_save(test_hv, running)  # the MANAGED_SAVE flag is needed; NVRAM is refused here

    info = undefine(test_hv, running)

    assert info.state is GuestState.UNDEFINED


def test_undefine_leaves_a_running_guest_running_as_transient(
    test_hv: Hypervisor, running: str
) -> None:
    info = undefine(test_hv, running)

    assert (info.state, info.persistent) == (GuestState.RUNNING, False)
    assert destroy(test_hv, running).state is GuestState.UNDEFINED


def test_create_transient_runs_a_guest_that_vanishes_when_stopped(
    test_hv: Hypervisor, make_guest
) -> None:
    uuid, xml = make_guest()

    info = create_transient(test_hv, xml)

    assert (info.state, info.persistent) == (GuestState.RUNNING, False)
    assert destroy(test_hv, uuid).state is GuestState.UNDEFINED


def test_create_transient_flags_the_test_driver_lacks_are_unsupported(
    test_hv: Hypervisor, make_guest
) -> None:
    uuid, xml = make_guest()

    with pytest.raises(Unsupported):
        create_transient(test_hv, xml, paused=True)
    with pytest.raises(Unsupported):
        create_transient(test_hv, xml, autodestroy=True)

    assert get_info(test_hv, uuid).state is GuestState.UNDEFINED


def test_make_persistent_keeps_the_guest_running_and_survives_destroy(
    test_hv: Hypervisor, make_guest
) -> None:
    uuid, xml = make_guest()
    create_transient(test_hv, xml)

    info = make_persistent(test_hv, uuid, xml)
    stopped = destroy(test_hv, uuid)

    assert (info.state, info.persistent) == (GuestState.RUNNING, True)
    assert (stopped.state, stopped.persistent) == (GuestState.DEFINED, True)


def test_make_persistent_refuses_xml_for_another_guest(test_hv: Hypervisor, make_guest) -> None:
    uuid, xml = make_guest()
    create_transient(test_hv, xml)
    other, other_xml = make_guest()

    with pytest.raises(InvalidConfig):
        make_persistent(test_hv, uuid, other_xml)

    assert get_info(test_hv, other).state is GuestState.UNDEFINED


def test_make_persistent_refuses_a_guest_that_is_gone(test_hv: Hypervisor, make_guest) -> None:
    uuid, xml = make_guest()

    with pytest.raises(NotFound):
        make_persistent(test_hv, uuid, xml)

    assert get_info(test_hv, uuid).state is GuestState.UNDEFINED


def test_state_mapping_covers_all_five_states(test_hv: Hypervisor, make_guest) -> None:
    guests = {state: make_guest() for state in GuestState}
    for state, (uuid, xml) in guests.items():
        if state is GuestState.UNDEFINED:
            continue
        define(test_hv, xml)
        if state is not GuestState.DEFINED:
            start(test_hv, uuid)
        if state is GuestState.PAUSED:
            suspend(test_hv, uuid)
        if state is GuestState.SAVED:
            managed_save(test_hv, uuid)

    seen = {state: get_info(test_hv, uuid).state for state, (uuid, _xml) in guests.items()}

    assert seen == {state: state for state in GuestState}


def test_list_domains_sees_running_stopped_and_transient_guests(
    test_hv: Hypervisor, running: str, make_guest
) -> None:
    stopped, stopped_xml = make_guest()
    transient, transient_xml = make_guest()
    define(test_hv, stopped_xml)
    create_transient(test_hv, transient_xml)

    infos = {info.uuid: info for info in list_domains(test_hv)}

    assert infos[running].state is GuestState.RUNNING
    assert infos[stopped].state is GuestState.DEFINED
    assert (infos[transient].state, infos[transient].persistent) == (GuestState.RUNNING, False)


def test_find_by_name(test_hv: Hypervisor, defined: str) -> None:
    name = get_info(test_hv, defined).name

    found = find_by_name(test_hv, name)

    assert found is not None and found.uuid == defined
    assert find_by_name(test_hv, "vmportal-no-such-guest") is None


def test_find_by_metadata_finds_a_guest_by_request_id(test_hv: Hypervisor, make_guest) -> None:
    wanted, wanted_xml = make_guest(metadata={"request_id": "4711", "job_id": "9"})
    other, other_xml = make_guest(metadata={"request_id": "4712"})
    _plain, plain_xml = make_guest()
    define(test_hv, wanted_xml)
    create_transient(test_hv, other_xml)
    define(test_hv, plain_xml)

    found = find_by_metadata(test_hv, METADATA_NS, "request_id", "4711")

    assert [info.uuid for info in found] == [wanted]
    assert [i.uuid for i in find_by_metadata(test_hv, METADATA_NS, "request_id", "4712")] == [other]
    assert find_by_metadata(test_hv, METADATA_NS, "request_id", "no-such") == []
    assert find_by_metadata(test_hv, "https://example.com/other", "request_id", "4711") == []


def test_get_xml_returns_live_and_inactive_config(test_hv: Hypervisor, running: str) -> None:
    live = get_xml(test_hv, running)
    inactive = get_xml(test_hv, running, inactive=True)

    assert running in live and running in inactive
    assert "id=" in live.split(">", 1)[0]
    assert "id=" not in inactive.split(">", 1)[0]


def test_get_xml_of_an_unknown_guest_is_not_found(test_hv: Hypervisor) -> None:
    with pytest.raises(NotFound):
        get_xml(test_hv, new_uuid())


def test_job_stats_is_unsupported_on_the_test_driver(test_hv: Hypervisor, running: str) -> None:
    with pytest.raises(Unsupported):
        job_stats(test_hv, running)
