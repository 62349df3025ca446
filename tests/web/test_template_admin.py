"""Templates in the admin: versions on save, a preview of both phases, validation by libvirt."""

from __future__ import annotations

import pytest
from django.test import Client

from provisioning.models import GuestTemplate, Media
from tests.factories import make_host, make_media, make_template
from tests.support.libvirt import TEST_URI

pytestmark = pytest.mark.django_db


@pytest.fixture
def template(settings) -> GuestTemplate:
    settings.LIBVIRT_URI = TEST_URI
    media = make_media(Media.Kind.KERNEL, kernel_path="/boot/vmlinuz", initrd_path="/boot/initrd")
    return make_template(name="Tiny", host=make_host(), media=media)


def test_the_change_page_previews_both_phases(superuser_client: Client, template) -> None:
    body = superuser_client.get(f"/admin/provisioning/guesttemplate/{template.pk}/change/")
    text = body.content.decode()
    assert "Install phase" in text and "Final (persistent) phase" in text
    assert "&lt;kernel&gt;/boot/vmlinuz&lt;/kernel&gt;" in text
    assert "&lt;on_reboot&gt;destroy&lt;/on_reboot&gt;" in text


def test_saving_a_change_makes_a_new_version(superuser_client: Client, template) -> None:
    url = f"/admin/provisioning/guesttemplate/{template.pk}/change/"
    data = change_data(superuser_client, template, description="Now with a description")
    response = superuser_client.post(url, data)
    assert response.status_code == 302, response.content.decode()[:2000]
    template.refresh_from_db()
    assert template.version == 2
    assert template.description == "Now with a description"


def test_validate_with_libvirt_reports_success(superuser_client: Client, template) -> None:
    response = superuser_client.post(
        "/admin/provisioning/guesttemplate/",
        {"action": "validate_with_libvirt", "_selected_action": [template.pk]},
        follow=True,
    )
    assert "Tiny: libvirt accepts both phases." in response.content.decode()


def test_validate_with_libvirt_names_a_bad_template(superuser_client: Client, template) -> None:
    GuestTemplate.objects.filter(pk=template.pk).update(kernel_cmdline="bad\x07bell")
    response = superuser_client.post(
        "/admin/provisioning/guesttemplate/",
        {"action": "validate_with_libvirt", "_selected_action": [template.pk]},
        follow=True,
    )
    assert "Tiny: " in response.content.decode()
    assert "cmdline" in response.content.decode()


def change_data(client: Client, template: GuestTemplate, **changes: object) -> dict:
    """The change form's current values, with changes, as the browser would post them."""
    url = f"/admin/provisioning/guesttemplate/{template.pk}/change/"
    form = client.get(url).context["adminform"].form
    data = {k: v for k, v in form.initial.items() if v is not None}
    data.update(media=template.media_id, pool=template.pool_id, **changes)
    return {k: ("on" if v is True else v) for k, v in data.items() if v is not False}


def test_the_admin_offers_a_data_disk_and_the_preview_attaches_it_as_vdb(
    superuser_client: Client, template
) -> None:
    url = f"/admin/provisioning/guesttemplate/{template.pk}/change/"
    data = change_data(superuser_client, template, data_disk_mib_default=32, data_disk_mib_max=64)
    response = superuser_client.post(url, data)
    assert response.status_code == 302, response.content.decode()[:2000]
    template.refresh_from_db()
    assert (template.data_disk_mib_default, template.data_disk_mib_max) == (32, 64)
    text = superuser_client.get(url).content.decode()
    assert "-data.qcow2" in text and "dev=&quot;vdb&quot;" in text


def test_the_admin_refuses_a_data_disk_default_above_its_maximum(
    superuser_client: Client, template
) -> None:
    url = f"/admin/provisioning/guesttemplate/{template.pk}/change/"
    data = change_data(superuser_client, template, data_disk_mib_default=128, data_disk_mib_max=64)
    response = superuser_client.post(url, data)
    assert response.status_code == 200
    assert "The default must lie between the minimum and maximum." in response.content.decode()
    template.refresh_from_db()
    assert template.data_disk_mib_max == 0 and template.version == 1
