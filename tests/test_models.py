"""Model constraints hold in the database, and clean() explains what is wrong."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from provisioning.models import Guest, GuestTemplate, Host, Job, Media, Quota
from tests.factories import make_guest, make_host, make_media, make_network

pytestmark = pytest.mark.django_db


@pytest.fixture
def host() -> Host:
    return make_host("hv1", pool=None)


@pytest.fixture
def kernel_media() -> Media:
    return make_media(Media.Kind.KERNEL)


def template(**overrides) -> GuestTemplate:
    fields = {"name": "t", "method": GuestTemplate.Method.IMPORT, "base_volume": "base.qcow2"}
    fields.update(overrides)
    return GuestTemplate(**fields)


def test_a_template_default_outside_its_range_is_refused_by_the_database() -> None:
    with pytest.raises(IntegrityError), transaction.atomic():
        template(vcpus_min=2, vcpus_default=1, vcpus_max=4).save()


def test_template_clean_names_each_bad_field(kernel_media: Media) -> None:
    bad = template(
        method=GuestTemplate.Method.CDROM,
        media=kernel_media,
        memory_mib_default=10_000,
        memory_mib_max=4096,
    )
    with pytest.raises(ValidationError) as caught:
        bad.full_clean()
    errors = caught.value.message_dict
    assert "ISO image" in errors["media"][0]
    assert "between the minimum and maximum" in errors["memory_mib_default"][0]


def test_pxe_templates_need_a_network_and_kernel_templates_need_kernel_media(host: Host) -> None:
    with pytest.raises(ValidationError) as caught:
        template(method=GuestTemplate.Method.PXE).full_clean()
    assert "network" in caught.value.message_dict
    net = make_network(host, "lan")
    template(name="pxe", method=GuestTemplate.Method.PXE, network=net).full_clean()
    with pytest.raises(ValidationError) as caught:
        template(method=GuestTemplate.Method.KERNEL).full_clean()
    assert "Kernel + initrd" in caught.value.message_dict["media"][0]


def test_transient_templates_cannot_autostart() -> None:
    with pytest.raises(IntegrityError), transaction.atomic():
        template(lifecycle=GuestTemplate.Lifecycle.TRANSIENT, autostart=True).save()


def test_media_must_name_what_they_are(host: Host) -> None:
    with pytest.raises(ValidationError, match="either a pool and volume, or a host path"):
        Media(name="iso", kind=Media.Kind.ISO).full_clean()
    with pytest.raises(ValidationError, match="absolute path"):
        Media(name="iso2", kind=Media.Kind.ISO, path="relative/x.iso").full_clean()
    Media(name="iso3", kind=Media.Kind.ISO, path="/srv/iso/debian.iso").full_clean()


def test_a_quota_belongs_to_exactly_one_user_or_group(make_user) -> None:
    alice = make_user("alice")
    group = Group.objects.create(name="lab")
    with pytest.raises(IntegrityError), transaction.atomic():
        Quota.objects.create(user=alice, group=group)
    with pytest.raises(IntegrityError), transaction.atomic():
        Quota.objects.create()
    Quota.objects.create(user=alice)
    Quota.objects.create(group=group)


def test_only_one_active_job_per_guest(host: Host, make_user) -> None:
    guest = make_guest(owner=make_user("bob"), host=host, name="g1")
    Job.objects.create(kind=Job.Kind.SUSPEND, guest=guest)
    with pytest.raises(IntegrityError), transaction.atomic():
        Job.objects.create(kind=Job.Kind.RESUME, guest=guest, status=Job.Status.RUNNING)
    Job.objects.filter(guest=guest).update(status=Job.Status.SUCCEEDED)
    Job.objects.create(kind=Job.Kind.RESUME, guest=guest)


def test_guest_names_are_unique_per_host_among_guests_that_exist(host: Host, make_user) -> None:
    owner = make_user("carol")
    running = Guest.State.RUNNING
    make_guest(owner=owner, host=host, name="web", state=running)
    other = make_host("hv2", uri="qemu+ssh://hv2/system", pool=None)
    make_guest(owner=owner, host=other, name="web", state=running)
    with pytest.raises(IntegrityError), transaction.atomic():
        make_guest(owner=owner, host=host, name="web", state=Guest.State.DEFINED)
    # A deleted (undefined) guest frees its name for a new one.
    make_guest(owner=owner, host=host, name="web", state=Guest.State.UNDEFINED)


def test_names_that_libvirt_would_refuse_are_invalid(host: Host, make_user) -> None:
    guest = Guest(owner=make_user("dave"), host=host, name="bad name;rm")
    with pytest.raises(ValidationError) as caught:
        guest.full_clean()
    assert "name" in caught.value.message_dict
