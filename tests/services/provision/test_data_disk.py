"""A template's optional data disk: made beside the system disk, counted, kept or remade on rebuild.

The steps run in this process on libvirt's test driver, which keeps volumes but not their bytes:
what the disks hold across a rebuild is shown on real QEMU in test_rebuild_qemu.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.test import Client
from django.urls import reverse

from provisioning.hypervisor import domxml, operations, storage
from provisioning.models import (
    Guest,
    GuestTemplate,
    Host,
    Job,
    ProvisioningRequest,
    RebuildSchedule,
    ScheduleRun,
)
from provisioning.services import actions, provision, schedules
from provisioning.services.provision import SubmitError
from tests.factories import make_guest
from tests.support.engine import (
    MiB,
    hv,
    info_of,
    provision_running,
    status_of,
    submit,
    tidy_libvirt,  # noqa: F401 - fixture
    volume_name,
    volumes_of,
)
from tests.support.libvirt import TEST_POOL

Status = ProvisioningRequest.Status
DATA_MIB = 32


@pytest.fixture
def template(kernel_template: GuestTemplate) -> GuestTemplate:
    """The test template, offering a data disk of up to 128 MiB (none unless asked for)."""
    kernel_template.data_disk_mib_max = 128
    kernel_template.save()
    return kernel_template


def data_volume(guest: Guest) -> str:
    return f"{guest.name}-{guest.uuid.hex[:8]}-data.qcow2"


def capacities(guest: Guest) -> dict[str, int]:
    """The guest's volumes in the test pool and their sizes in MiB."""
    return {
        v.name: v.capacity // MiB
        for v in storage.list_volumes(hv(), TEST_POOL)
        if v.name in (volume_name(guest), data_volume(guest))
    }


def disks_of(xml: str) -> list[tuple[str | None, str | None]]:
    """(target dev, source volume) of every disk in the domain XML."""
    root = domxml.parse_untrusted(xml)
    return [
        (d.find("target").get("dev"), d.find("source").get("volume"))  # type: ignore[union-attr]
        for d in root.iterfind("devices/disk[@device='disk']")
    ]


def job_log(request: ProvisioningRequest) -> list[str]:
    job = Job.objects.get(request=request)
    return [e.message for e in job.events.order_by("id")]


def rebuild(guest: Guest, **kw: Any) -> ProvisioningRequest:
    """Rebuild the running guest in this process, its shutdown grace period cut short."""
    request = provision.rebuild_submit(guest=guest, by=guest.owner, **kw)
    provision.advance(request.pk)  # asks the guest to shut down, then waits
    if status_of(request) == Status.PREPARING:
        operations.destroy(hv(), str(guest.uuid))  # the guest went down
        provision.advance(request.pk)
    assert status_of(request) == Status.WAITING, request.error
    operations.shutdown(hv(), str(guest.uuid))  # the installer powered off
    provision.request_domain_stopped(request.pk, queue_next=False)
    provision.advance(request.pk)
    assert status_of(request) == Status.RUNNING, request.error
    return request


# --- a new guest ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("tidy_libvirt")
def test_a_data_disk_is_made_beside_the_system_disk_and_attached_as_vdb_in_both_phases(
    make_user: Any, template: GuestTemplate
) -> None:
    request = submit(make_user("ann"), template, "dd-new", data_disk_mib=DATA_MIB)
    guest = request.guest
    assert (guest.data_disk_mib, request.data_disk_mib) == (DATA_MIB, DATA_MIB)
    provision.advance(request.pk)
    assert status_of(request) == Status.WAITING

    assert capacities(guest) == {volume_name(guest): 64, data_volume(guest): DATA_MIB}
    uuid = str(guest.uuid)
    expected = [("vda", volume_name(guest)), ("vdb", data_volume(guest))]
    assert disks_of(operations.get_xml(hv(), uuid)) == expected  # the installer sees both
    assert disks_of(operations.get_xml(hv(), uuid, inactive=True)) == expected
    assert any(
        f"data disk {data_volume(guest)} ready ({DATA_MIB} MiB)" in m for m in job_log(request)
    )


@pytest.mark.usefixtures("tidy_libvirt")
def test_without_a_data_disk_the_guest_has_one_disk(
    make_user: Any, template: GuestTemplate
) -> None:
    guest = provision_running(make_user("ann"), template, "dd-none").guest
    assert guest.data_disk_mib == 0
    assert volumes_of(guest) == [volume_name(guest)]
    assert disks_of(operations.get_xml(hv(), str(guest.uuid))) == [("vda", volume_name(guest))]


@pytest.mark.usefixtures("tidy_libvirt")
def test_the_templates_default_data_disk_is_made_when_the_user_names_none(
    make_user: Any, template: GuestTemplate
) -> None:
    template.data_disk_mib_default = 16
    template.save()
    request = submit(make_user("ann"), template, "dd-default")
    assert request.data_disk_mib == 16 and request.guest.data_disk_mib == 16


@pytest.mark.parametrize(
    ("offered", "asked", "message"),
    [
        (128, 129, "Pick between 0 (none) and 128 MiB."),
        (0, 16, "This template offers no data disk."),
    ],
    ids=["too-big", "not-offered"],
)
def test_a_data_disk_outside_what_the_template_offers_is_refused_and_makes_nothing(
    make_user: Any, kernel_template: GuestTemplate, offered: int, asked: int, message: str
) -> None:
    kernel_template.data_disk_mib_max = offered
    kernel_template.save()
    with pytest.raises(SubmitError) as refused:
        submit(make_user("ann"), kernel_template, "dd-bad", data_disk_mib=asked)
    assert refused.value.errors == {"data_disk_mib": message}
    assert not Guest.objects.exists() and not ProvisioningRequest.objects.exists()


def test_the_disk_quota_counts_the_data_disk(make_user: Any, template: GuestTemplate) -> None:
    # 64 MiB system disk + 32 MiB data disk = 96 MiB: over a quota of 90.
    quota = {"max_guests": 5, "max_vcpus": 5, "max_memory_mib": 4096, "max_disk_mib": 90}
    ann = make_user("ann", quota=quota)
    request = submit(ann, template, "dd-quota", data_disk_mib=DATA_MIB)
    provision.advance(request.pk)
    assert status_of(request) == Status.FAILED
    assert request.error == "quota exceeded: disk would be 96 MiB, your quota allows 90 MiB"
    assert volumes_of(request.guest) == []


def test_placement_counts_the_data_disk(
    make_user: Any, template: GuestTemplate, test_host: Host
) -> None:
    Host.objects.filter(pk=test_host.pk).update(capacity_disk_gib=1)  # 1024 MiB
    ann = make_user("ann")
    make_guest(
        owner=ann,
        host=test_host,
        name="big",
        state=Guest.State.RUNNING,
        disk_mib=512,
        data_disk_mib=400,
    )
    with pytest.raises(SubmitError) as refused:  # 112 MiB free; 64 + 64 asked
        submit(ann, template, "dd-room", data_disk_mib=64)
    assert "Cannot place the guest" in refused.value.errors["template"]
    assert submit(ann, template, "dd-fits", data_disk_mib=48).host == test_host


@pytest.mark.usefixtures("tidy_libvirt")
def test_a_cancelled_request_removes_the_data_disk_too(
    make_user: Any, template: GuestTemplate
) -> None:
    request = submit(make_user("ann"), template, "dd-cancel", data_disk_mib=DATA_MIB)
    provision.advance(request.pk)
    assert len(volumes_of(request.guest)) == 2
    provision.cancel(request.pk)
    provision.cleanup(request.pk)
    assert volumes_of(request.guest) == []
    assert not info_of(request.guest).exists


# --- rebuilds ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("tidy_libvirt")
def test_a_rebuild_keeps_the_data_disk_unless_told_not_to(
    make_user: Any, template: GuestTemplate
) -> None:
    ann = make_user("ann")
    guest = provision_running(ann, template, "dd-rebuild", data_disk_mib=DATA_MIB).guest

    kept = rebuild(guest)
    assert kept.keep_data_disk and kept.data_disk_mib == DATA_MIB
    log = job_log(kept)
    assert log[0].endswith("requested, keeping the data disk")
    assert any(f"data disk {data_volume(guest)} kept ({DATA_MIB} MiB)" in m for m in log), log
    assert capacities(guest) == {volume_name(guest): 64, data_volume(guest): DATA_MIB}
    assert disks_of(operations.get_xml(hv(), str(guest.uuid)))[1] == ("vdb", data_volume(guest))

    anew = rebuild(guest, keep_data_disk=False)
    assert not anew.keep_data_disk
    log = job_log(anew)
    assert log[0].endswith("requested, with an empty data disk")
    assert any(f"data disk {data_volume(guest)} ready ({DATA_MIB} MiB)" in m for m in log), log
    assert capacities(guest) == {volume_name(guest): 64, data_volume(guest): DATA_MIB}


@pytest.mark.usefixtures("tidy_libvirt")
def test_a_kept_data_disk_removed_behind_the_portals_back_is_made_anew_and_said_so(
    make_user: Any, template: GuestTemplate
) -> None:
    ann = make_user("ann")
    guest = provision_running(ann, template, "dd-gone", data_disk_mib=DATA_MIB).guest
    storage.delete_volume(hv(), TEST_POOL, data_volume(guest))

    request = rebuild(guest)
    log = job_log(request)
    assert any(f"data disk {data_volume(guest)} was missing, made anew" in m for m in log), log
    assert data_volume(guest) in capacities(guest)


@pytest.mark.usefixtures("tidy_libvirt")
def test_deleting_the_guest_removes_both_disks_unless_kept(
    make_user: Any, template: GuestTemplate
) -> None:
    ann = make_user("ann")
    for name, keep in (("dd-del", False), ("dd-keep", True)):
        guest = provision_running(ann, template, name, data_disk_mib=DATA_MIB).guest
        job = actions.guest_action(guest=guest, kind=Job.Kind.DELETE, by=ann, keep_disk=keep)
        actions.run_job(job.pk)
        assert Job.objects.get(pk=job.pk).status == Job.Status.SUCCEEDED
        assert len(volumes_of(guest)) == (2 if keep else 0), name
        for volume in volumes_of(guest):
            storage.delete_volume(hv(), TEST_POOL, volume)


# --- forms, pages and schedules -----------------------------------------------------------------


def owner_client(guest: Guest) -> Client:
    client = Client()
    client.force_login(guest.owner)
    return client


@pytest.fixture
def page_guest(make_user: Any, template: GuestTemplate, test_host: Host) -> Guest:
    """A guest row with a data disk (no domain needed) owned by ann."""
    return make_guest(
        owner=make_user("ann"),
        template=template,
        host=test_host,
        name="dd-page",
        disk_mib=64,
        data_disk_mib=DATA_MIB,
    )


def test_the_new_guest_form_offers_the_data_disk_only_where_the_template_does(
    make_user: Any, template: GuestTemplate
) -> None:
    client = Client()
    client.force_login(make_user("ann"))
    url = reverse("new-guest") + f"?template={template.pk}"
    page = client.get(url).content.decode()
    assert 'name="data_disk_mib"' in page and "0 (none) to 128" in page

    fields = {"template": template.pk, "name": "dd-form", "vcpus": 1, "memory_mib": 256}
    response = client.post(url, {**fields, "disk_mib": 64, "data_disk_mib": 500})
    assert response.status_code == 400  # the form again, with the field's error
    assert "Pick between 0 (none) and 128 MiB." in response.content.decode()
    assert not ProvisioningRequest.objects.exists()

    client.post(url, {**fields, "disk_mib": 64, "data_disk_mib": 48})
    assert ProvisioningRequest.objects.get().data_disk_mib == 48

    template.data_disk_mib_max = 0
    template.save()
    assert 'name="data_disk_mib"' not in client.get(url).content.decode()


def test_the_guest_page_rebuilds_keeping_the_data_disk_or_not(page_guest: Guest) -> None:
    client = owner_client(page_guest)
    page = client.get(reverse("guest-detail", args=[page_guest.uuid])).content.decode()
    assert f"{DATA_MIB} MiB (vdb)" in page
    assert 'name="keep_data_disk" checked' in page

    url = reverse("guest-rebuild", args=[page_guest.uuid])
    client.post(url, {"source": "latest"})  # the box unticked: the browser sends nothing
    first = ProvisioningRequest.objects.get(guest=page_guest)
    assert first.kind == ProvisioningRequest.Kind.REBUILD and not first.keep_data_disk
    ProvisioningRequest.objects.filter(pk=first.pk).update(status=Status.FAILED)
    Job.objects.filter(request=first).update(status=Job.Status.FAILED)

    client.post(url, {"source": "latest", "keep_data_disk": "on"})
    second = ProvisioningRequest.objects.exclude(pk=first.pk).get(guest=page_guest)
    assert second.keep_data_disk


def test_a_guest_without_a_data_disk_has_no_keep_box_and_rebuilds_as_before(
    page_guest: Guest,
) -> None:
    Guest.objects.filter(pk=page_guest.pk).update(data_disk_mib=0)
    client = owner_client(page_guest)
    page = client.get(reverse("guest-detail", args=[page_guest.uuid])).content.decode()
    assert "keep_data_disk" not in page
    client.post(reverse("guest-rebuild", args=[page_guest.uuid]), {"source": "latest"})
    assert ProvisioningRequest.objects.get(guest=page_guest).data_disk_mib == 0


def test_a_schedule_that_wipes_the_data_disk_says_so_and_its_rebuilds_do(
    page_guest: Guest,
) -> None:
    client = owner_client(page_guest)
    client.post(
        reverse("schedule-create", args=[page_guest.uuid]),
        {"every_minutes": "60", "source": "latest"},  # keep box unticked
    )
    schedule = RebuildSchedule.objects.get(guest=page_guest)
    assert not schedule.keep_data_disk
    page = client.get(reverse("guest-detail", args=[page_guest.uuid])).content.decode()
    table = page.split('<table class="schedules">', 1)[1].split("</table>", 1)[0]
    assert "<th>Data disk</th>" in table and "made anew" in table

    run = schedules.schedule_fire(schedule.pk)
    assert run is not None and run.outcome == ScheduleRun.Outcome.FIRED
    request = ProvisioningRequest.objects.get(guest=page_guest)
    assert not request.keep_data_disk and request.data_disk_mib == DATA_MIB

    kept = schedules.schedule_create(guest=page_guest, by=None, every_minutes=5)
    assert kept.keep_data_disk


def test_a_template_whose_data_disk_default_exceeds_its_maximum_is_refused(
    template: GuestTemplate,
) -> None:
    template.data_disk_mib_default = 256
    with pytest.raises(ValidationError) as refused:
        template.full_clean()
    assert "data_disk_mib_default" in refused.value.message_dict
