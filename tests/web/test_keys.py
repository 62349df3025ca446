"""The SSH keys page: users add, list and remove their own public keys, and pick them for guests
made from cloud images."""

from __future__ import annotations

import re

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from django.test import Client

from provisioning.models import Guest, GuestTemplate, SshKey
from tests.factories import make_host, make_ssh_key, make_template, new_public_key

pytestmark = pytest.mark.django_db
KEYS = "/profile/keys/"


@pytest.fixture
def cloud_template() -> GuestTemplate:
    return make_template(
        name="Debian cloud",
        method=GuestTemplate.Method.CLOUD,
        host=make_host(),
        base_volume="debian-12-genericcloud-amd64.qcow2",
    )


def _new_guest(client: Client, template: GuestTemplate, name: str = "web1", **extra):
    fields = {
        "template": template.pk,
        "name": name,
        "vcpus": template.vcpus_default,
        "memory_mib": template.memory_mib_default,
        "disk_mib": template.disk_mib_default,
        **extra,
    }
    return client.post(f"/guests/new?template={template.pk}", fields)


# --- the keys page ---


def test_anonymous_visitors_are_sent_to_log_in() -> None:
    for response in (Client().get(KEYS), Client().post(f"{KEYS}1/remove")):
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/?next=/profile/keys/")
    assert SshKey.objects.count() == 0


def test_the_nav_links_to_the_keys_page(user_client: Client) -> None:
    assert f'href="{KEYS}"' in user_client.get("/").content.decode()


def test_it_adds_a_key_and_lists_it(user_client: Client, user) -> None:
    line = new_public_key(comment="alice@laptop")
    response = user_client.post(KEYS, {"name": "laptop", "public_key": line}, follow=True)
    assert response.status_code == 200
    key = SshKey.objects.get()
    assert (key.owner, key.name, key.public_key) == (user, "laptop", line)
    assert key.fingerprint.startswith("SHA256:")
    body = response.content.decode()
    assert "Added the key laptop" in body
    assert "laptop" in body and key.fingerprint in body and "ssh-ed25519" in body


def test_the_name_defaults_to_the_keys_comment(user_client: Client) -> None:
    user_client.post(KEYS, {"name": "", "public_key": new_public_key(comment="alice@desk")})
    assert SshKey.objects.get().name == "alice@desk"


def test_a_key_without_comment_or_name_asks_for_a_name(user_client: Client) -> None:
    response = user_client.post(KEYS, {"name": "", "public_key": new_public_key()})
    assert response.status_code == 200
    assert "Give the key a name" in response.content.decode()
    assert SshKey.objects.count() == 0


def test_it_lists_only_my_keys(user_client: Client, user, make_user) -> None:
    make_ssh_key(owner=user, name="mine")
    theirs = make_ssh_key(owner=make_user("mallory"), name="theirs")
    body = user_client.get(KEYS).content.decode()
    assert "mine" in body
    assert "theirs" not in body and theirs.fingerprint not in body


def test_it_refuses_a_duplicate_name(user_client: Client, user) -> None:
    make_ssh_key(owner=user, name="laptop")
    response = user_client.post(KEYS, {"name": "laptop", "public_key": new_public_key()})
    assert response.status_code == 200
    assert "You have a key named “laptop” already" in response.content.decode()
    assert SshKey.objects.count() == 1


def test_it_refuses_the_same_key_twice(user_client: Client, user) -> None:
    line = new_public_key(comment="me@host")
    make_ssh_key(owner=user, name="first", public_key=line)
    response = user_client.post(KEYS, {"name": "second", "public_key": line})
    assert response.status_code == 200
    assert "You have added this key already, as “first”" in response.content.decode()
    assert SshKey.objects.count() == 1


def test_another_user_may_add_the_same_key(user_client: Client, make_user) -> None:
    line = new_public_key(comment="shared")
    make_ssh_key(owner=make_user("bob"), name="shared", public_key=line)
    user_client.post(KEYS, {"name": "", "public_key": line})
    assert SshKey.objects.filter(public_key=line).count() == 2


def test_it_refuses_a_private_key(user_client: Client) -> None:
    private = ed25519.Ed25519PrivateKey.generate().private_bytes(
        Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()
    )
    response = user_client.post(KEYS, {"name": "oops", "public_key": private.decode()})
    assert response.status_code == 200
    body = response.content.decode()
    assert "This is a PRIVATE key" in body
    assert "BEGIN OPENSSH PRIVATE KEY" not in body  # not echoed back into the form
    assert SshKey.objects.count() == 0


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI",
        "not a key",
        f'command="rm -rf /" {new_public_key()}',
        "x" * 20000,
        "ssh-rsa \x00\x01",
    ],
    ids=["empty", "truncated", "garbage", "options", "huge", "binary"],
)
def test_bad_input_gets_a_field_error_and_stores_nothing(user_client: Client, text: str) -> None:
    response = user_client.post(KEYS, {"name": "k", "public_key": text})
    assert response.status_code == 200
    assert 'class="error field-error"' in response.content.decode()
    assert SshKey.objects.count() == 0


def test_it_removes_my_key(user_client: Client, user) -> None:
    key = make_ssh_key(owner=user, name="old")
    response = user_client.post(f"{KEYS}{key.pk}/remove", follow=True)
    assert "Removed the key old" in response.content.decode()
    assert not SshKey.objects.exists()


def test_removing_needs_a_post(user_client: Client, user) -> None:
    key = make_ssh_key(owner=user)
    assert user_client.get(f"{KEYS}{key.pk}/remove").status_code == 405
    assert SshKey.objects.count() == 1


def test_removing_another_users_key_is_404(user_client: Client, make_user) -> None:
    theirs = make_ssh_key(owner=make_user("mallory"))
    assert user_client.post(f"{KEYS}{theirs.pk}/remove").status_code == 404
    assert user_client.post(f"{KEYS}999999/remove").status_code == 404
    assert SshKey.objects.filter(pk=theirs.pk).exists()


def test_removing_without_the_csrf_token_is_refused(user) -> None:
    key = make_ssh_key(owner=user)
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    assert client.post(f"{KEYS}{key.pk}/remove").status_code == 403
    assert SshKey.objects.count() == 1


def test_removing_a_key_leaves_the_guests_that_have_it(user_client, user, cloud_template) -> None:
    key = make_ssh_key(owner=user)
    _new_guest(user_client, cloud_template, ssh_keys=[key.pk])
    user_client.post(f"{KEYS}{key.pk}/remove")
    assert Guest.objects.get().ssh_keys == [key.public_key]


def test_admins_see_keys_but_do_not_add_them(superuser_client: Client, user) -> None:
    key = make_ssh_key(owner=user, name="laptop")
    changelist = superuser_client.get("/admin/provisioning/sshkey/", {"q": "laptop"})
    assert changelist.status_code == 200 and key.fingerprint in changelist.content.decode()
    assert superuser_client.get(f"/admin/provisioning/sshkey/{key.pk}/change/").status_code == 200
    assert superuser_client.get("/admin/provisioning/sshkey/add/").status_code == 403


# --- picking keys for a new guest ---


def test_the_new_guest_form_offers_my_keys_all_ticked(
    user_client: Client, user, make_user, cloud_template
) -> None:
    mine = [make_ssh_key(owner=user, name=n) for n in ("desk", "laptop")]
    theirs = make_ssh_key(owner=make_user("mallory"), name="theirs")
    body = user_client.get("/guests/new", {"template": cloud_template.pk}).content.decode()
    for key in mine:
        assert f'value="{key.pk}"' in body and key.fingerprint in body
    boxes = re.findall(r'<input type="checkbox" name="ssh_keys"[^>]*>', body)
    assert len(boxes) == 2 and all(" checked" in box for box in boxes)
    assert f'value="{theirs.pk}"' not in body and "theirs" not in body
    assert f"Given to the user {cloud_template.cloud_user}" in body


def test_without_keys_the_form_links_to_the_keys_page(user_client: Client, cloud_template) -> None:
    body = user_client.get("/guests/new", {"template": cloud_template.pk}).content.decode()
    assert "You have no SSH keys yet" in body and f'href="{KEYS}"' in body


def test_the_chosen_keys_end_up_on_the_guest(user_client: Client, user, cloud_template) -> None:
    desk, laptop, _spare = (make_ssh_key(owner=user, name=n) for n in ("desk", "laptop", "spare"))
    response = _new_guest(user_client, cloud_template, ssh_keys=[laptop.pk, desk.pk])
    assert response.status_code == 302
    assert Guest.objects.get().ssh_keys == [desk.public_key, laptop.public_key]


def test_unticking_every_key_makes_a_guest_without_keys(
    user_client: Client, user, cloud_template
) -> None:
    make_ssh_key(owner=user)
    assert _new_guest(user_client, cloud_template).status_code == 302
    assert Guest.objects.get().ssh_keys == []


def test_another_users_key_id_is_a_form_error(
    user_client: Client, user, make_user, cloud_template
) -> None:
    mine = make_ssh_key(owner=user)
    theirs = make_ssh_key(owner=make_user("mallory"))
    response = _new_guest(user_client, cloud_template, ssh_keys=[mine.pk, theirs.pk])
    assert response.status_code == 400
    assert "Select a valid choice" in response.content.decode()
    assert not Guest.objects.exists()
    assert _new_guest(user_client, cloud_template, ssh_keys=["nope"]).status_code == 400


def test_other_methods_neither_show_nor_take_keys(user_client: Client, user) -> None:
    key = make_ssh_key(owner=user)
    template = make_template(name="Tiny", host=make_host())
    body = user_client.get("/guests/new", {"template": template.pk}).content.decode()
    assert 'name="ssh_keys"' not in body
    assert _new_guest(user_client, template, ssh_keys=[key.pk]).status_code == 302
    assert Guest.objects.get().ssh_keys == []


# --- the owner's own cloud-config ---


def test_the_owners_cloud_config_goes_on_the_guest(user_client: Client, cloud_template) -> None:
    body = user_client.get("/guests/new", {"template": cloud_template.pk}).content.decode()
    assert 'name="cloud_config"' in body
    response = _new_guest(user_client, cloud_template, cloud_config="packages: [tmux]\n")
    assert response.status_code == 302
    assert Guest.objects.get().cloud_config == "packages: [tmux]"


def test_a_bad_cloud_config_is_a_field_error_and_makes_no_guest(
    user_client: Client, cloud_template
) -> None:
    response = _new_guest(user_client, cloud_template, cloud_config="packages: 3\n")
    assert response.status_code == 400
    assert "packages: 3 is not of type" in response.content.decode()
    assert not Guest.objects.exists()


def test_templates_that_take_no_cloud_config_do_not_offer_it(user_client: Client) -> None:
    tiny = make_template(name="Tiny", host=make_host())
    body = user_client.get("/guests/new", {"template": tiny.pk}).content.decode()
    assert 'name="cloud_config"' not in body
