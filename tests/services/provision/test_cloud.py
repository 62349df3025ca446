"""Cloud images: an overlay of the admin's image, a cloud-init seed, no installer.

The steps run in this process on libvirt's test driver, which keeps volumes but takes no
uploads (the seed volume stays empty there); what the seed holds is read from the plan here
and booted for real in tests/demo/test_debian.py.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest
import yaml
from django.core.exceptions import ValidationError

from provisioning import cloudinit
from provisioning.admin import GuestTemplateForm
from provisioning.hypervisor import domxml, operations, storage
from provisioning.models import Guest, GuestTemplate, Host, Job, ProvisioningRequest
from provisioning.services import actions, provision
from provisioning.services.provision import SubmitError
from provisioning.services.provision.spec import load_request, plan_of, seed_volume
from tests.factories import make_media, make_network, make_template
from tests.support.engine import (
    MiB,
    hv,
    moves,
    status_of,
    submit,
    tidy_libvirt,  # noqa: F401 - fixture
    volume_name,
    volumes_of,
)
from tests.support.libvirt import TEST_POOL, TEST_URI

Status = ProvisioningRequest.Status
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGb1c2tleWZvcnRlc3RzaGVyZW9ubHkxMjM0NTY3OA kim@laptop"
TEMPLATE_CONFIG = "#cloud-config\npackages: [htop]\ntimezone: UTC\n"


@pytest.fixture
def base_image(test_host: Host) -> Iterator[str]:
    """An image volume in the test pool (32 MiB, qcow2), as an admin would upload."""
    name = f"cloud-base-{uuidlib.uuid4().hex[:8]}.qcow2"
    storage.create_volume(hv(), TEST_POOL, name, 32 * MiB, "qcow2")
    yield name
    storage.delete_volume(hv(), TEST_POOL, name)


@pytest.fixture
def template(test_host: Host, base_image: str) -> GuestTemplate:
    return make_template(
        name="Cloud (test driver)",
        method=GuestTemplate.Method.CLOUD,
        lifecycle=GuestTemplate.Lifecycle.PERSISTENT,
        host=test_host,
        base_volume=base_image,
        cloud_config=TEMPLATE_CONFIG,
        network=make_network(test_host),
        disk_mib_default=64,
    )


def provision_cloud(
    owner: Any, template: GuestTemplate, name: str, **kw: Any
) -> ProvisioningRequest:
    request = submit(owner, template, name, **kw)
    provision.advance(request.pk)
    assert status_of(request) == Status.RUNNING, request.error
    return request


def seed_of(request: ProvisioningRequest) -> dict[str, Any]:
    """The seed's documents, as the plan makes them for this request."""
    files = cloudinit.read_seed_iso(plan_of(load_request(request.pk)).seed())
    assert files[""] == b"cidata"
    return {name: yaml.safe_load(body) for name, body in files.items() if name}


def job_log(request: ProvisioningRequest) -> list[str]:
    job = Job.objects.filter(request=request).latest("created")
    return [e.message for e in job.events.order_by("id")]


@pytest.mark.usefixtures("tidy_libvirt")
def test_a_cloud_guest_boots_an_overlay_of_the_image_with_its_seed_and_no_installer(
    make_user: Any, template: GuestTemplate, base_image: str
) -> None:
    request = provision_cloud(make_user("kim"), template, "cl1", ssh_keys=(KEY,))
    guest = request.guest
    assert [to for _from, to in moves(request)] == [
        "admitted",
        "preparing",
        "defining",
        "starting",
        "running",
    ]
    assert sorted(volumes_of(guest)) == sorted([volume_name(guest), seed_volume(guest)])
    conn = libvirt.open(TEST_URI)
    try:
        pool = conn.storagePoolLookupByName(TEST_POOL)
        overlay = domxml.parse_untrusted(pool.storageVolLookupByName(volume_name(guest)).XMLDesc())
        base_path = pool.storageVolLookupByName(base_image).path()
    finally:
        conn.close()
    assert overlay.findtext("backingStore/path") == base_path
    assert overlay.find("backingStore/format").get("type") == "qcow2"  # type: ignore[union-attr]
    assert int(overlay.findtext("capacity") or 0) == 64 * MiB

    root = domxml.parse_untrusted(operations.get_xml(hv(), str(guest.uuid)))
    (seed,) = root.findall("devices/disk[@device='cdrom']")
    assert seed.find("source").get("volume") == seed_volume(guest)  # type: ignore[union-attr]
    assert root.find("devices/channel/target").get("name") == "org.qemu.guest_agent.0"  # type: ignore[union-attr]
    assert root.find("os/kernel") is None  # boots its disk
    assert any(f"cloud-init seed {seed_volume(guest)}" in line for line in job_log(request))


@pytest.mark.usefixtures("tidy_libvirt")
def test_the_seed_names_the_guest_gives_the_chosen_keys_and_merges_the_owners_config(
    make_user: Any, template: GuestTemplate
) -> None:
    request = submit(
        make_user("kim"), template, "cl2", ssh_keys=(KEY,), cloud_config="packages: [tmux]\n"
    )
    guest = request.guest
    assert guest.ssh_keys == [KEY]
    seed = seed_of(request)
    assert seed["meta-data"] == {"instance-id": str(guest.uuid), "local-hostname": "cl2"}
    user_data = seed["user-data"]
    assert user_data["hostname"] == "cl2"
    assert user_data["packages"] == ["htop", "tmux"]  # the template's, then the owner's
    assert user_data["timezone"] == "UTC"
    (user,) = user_data["users"]
    assert (user["name"], user["ssh_authorized_keys"]) == ("debian", [KEY])
    assert seed["network-config"]["ethernets"]["nic0"]["match"] == {"macaddress": guest.mac}


@pytest.mark.usefixtures("tidy_libvirt")
def test_a_rebuild_makes_a_new_disk_and_a_seed_with_a_new_instance_id_keeping_the_keys(
    make_user: Any, template: GuestTemplate
) -> None:
    first = provision_cloud(make_user("kim"), template, "cl3", ssh_keys=(KEY,))
    guest = first.guest
    again = provision.rebuild_submit(guest=guest, by=guest.owner)
    provision.advance(again.pk)  # asks the guest to shut down, then waits
    if status_of(again) == Status.PREPARING:
        operations.destroy(hv(), str(guest.uuid))  # the guest went down
        provision.advance(again.pk)
    assert status_of(again) == Status.RUNNING, again.error
    seed = seed_of(again)
    assert seed["meta-data"]["instance-id"] == f"{guest.uuid}-rebuild-{again.pk}"
    assert seed["user-data"]["users"][0]["ssh_authorized_keys"] == [KEY]
    assert any(f"instance {guest.uuid}-rebuild-{again.pk}" in line for line in job_log(again))
    assert sorted(volumes_of(guest)) == sorted([volume_name(guest), seed_volume(guest)])


@pytest.mark.usefixtures("tidy_libvirt")
def test_a_template_config_broken_since_it_was_saved_fails_the_request_and_leaves_nothing(
    make_user: Any, template: GuestTemplate
) -> None:
    GuestTemplate.objects.filter(pk=template.pk).update(cloud_config="packages: 3\n")
    request = submit(make_user("kim"), template, "cl4")
    provision.advance(request.pk)
    request.refresh_from_db()
    assert request.status == Status.FAILED
    assert "cloud-config: It does not match cloud-init's schema: packages" in request.error
    assert volumes_of(request.guest) == []
    assert not operations.get_info(hv(), str(request.guest.uuid)).exists


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("packages: [", "not valid YAML"),
        ("#include\nhttp://example.invalid/x\n", "does not allow fetching URLs"),
        ("bootcmd: " + "x" * 70_000, "the limit is 65536 bytes"),
    ],
)
def test_an_owners_bad_cloud_config_is_a_field_error_and_makes_no_guest(
    make_user: Any, template: GuestTemplate, text: str, message: str
) -> None:
    with pytest.raises(SubmitError) as caught:
        submit(make_user("kim"), template, "cl5", cloud_config=text)
    assert message in caught.value.errors["cloud_config"]
    assert not Guest.objects.filter(name="cl5").exists()


def test_a_template_may_refuse_owners_cloud_config(make_user: Any, template: GuestTemplate) -> None:
    template.user_cloud_config = False
    template.save()
    with pytest.raises(SubmitError) as caught:
        submit(make_user("kim"), template, "cl6", cloud_config="packages: [tmux]\n")
    assert caught.value.errors == {"cloud_config": "This template takes no cloud-config of yours."}


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"base_volume": ""}, "base_volume", "Cloud images need the image"),
        ({"cloud_config": "packages: 3"}, "cloud_config", "packages: 3 is not of type 'array'"),
        (
            {"cloud_config": "phone_home: {url: 'http://example.invalid/'}"},
            "cloud_config",
            "phone_home make the guest fetch URLs",
        ),
    ],
)
def test_a_cloud_template_that_could_not_work_is_not_saved(
    template: GuestTemplate, changes: dict[str, Any], field: str, message: str
) -> None:
    for name, value in changes.items():
        setattr(template, name, value)
    with pytest.raises(ValidationError) as caught:
        template.full_clean()
    assert message in " ".join(caught.value.message_dict[field])


def test_a_cloud_template_boots_its_own_kernel_only_from_kernel_media(
    make_user: Any, template: GuestTemplate
) -> None:
    template.media = make_media("iso", pool=None, path="/var/lib/libvirt/boot/x.iso")
    with pytest.raises(ValidationError) as caught:
        template.full_clean()
    assert "kernel media" in " ".join(caught.value.message_dict["media"])
    template.media = make_media("kernel")
    template.full_clean()
    template.save()
    request = submit(make_user("kim"), template, "cl7")
    spec = plan_of(load_request(request.pk)).spec()
    assert spec.media.kernel == template.media.kernel_path and spec.seed is not None


@pytest.mark.parametrize(
    ("volume", "format", "message"),
    [
        ("no-such-image.qcow2", None, "There is no volume no-such-image.qcow2 in pool"),
        ("cloud-image.vmdk", "vmdk", "It is a vmdk volume; use a qcow2 or raw image."),
    ],
)
def test_the_admin_refuses_a_base_image_that_is_missing_or_of_another_format(
    template: GuestTemplate, volume: str, format: str | None, message: str
) -> None:
    if format:
        storage.create_volume(hv(), TEST_POOL, volume, MiB, format)
    try:
        data = {f.name: getattr(template, f.attname) for f in GuestTemplate._meta.concrete_fields}
        data.update(base_volume=volume)
        form = GuestTemplateForm(data=data, instance=template)
        assert not form.is_valid()
        (error,) = form.errors["base_volume"]
        assert error.startswith(message)
    finally:
        if format:
            storage.delete_volume(hv(), TEST_POOL, volume)


@pytest.mark.usefixtures("tidy_libvirt")
def test_deleting_a_cloud_guest_removes_its_disk_and_seed_but_not_the_image(
    make_user: Any, template: GuestTemplate, base_image: str
) -> None:
    guest = provision_cloud(make_user("kim"), template, "cl8").guest
    assert sorted(volumes_of(guest)) == sorted([volume_name(guest), seed_volume(guest)])
    job = actions.guest_action(guest=guest, kind=Job.Kind.DELETE, by=guest.owner, confirm="cl8")
    actions.run_job(job.pk)
    assert Job.objects.get(pk=job.pk).status == Job.Status.SUCCEEDED
    assert volumes_of(guest) == []
    assert base_image in {v.name for v in storage.list_volumes(hv(), TEST_POOL)}
