"""Users' SSH public keys: added once checked, removed by their owner."""

from __future__ import annotations

from django.contrib.auth.models import User
from django.db import IntegrityError, transaction

from provisioning import sshkeys
from provisioning.models import SshKey
from provisioning.services import audit

NAME_MAX = SshKey._meta.get_field("name").max_length or 100


class SshKeyError(ValueError):
    """A key that cannot be added, with the form field the message is for."""

    def __init__(self, field: str, message: str, *, secret: bool = False) -> None:
        self.field = field
        self.secret = secret  # what was pasted is a private key: do not show it back
        super().__init__(message)


def ssh_key_add(*, owner: User, name: str, text: str) -> SshKey:
    """Check the pasted key and keep it under `name` (its comment when empty) for `owner`."""
    try:
        key = sshkeys.parse(text)
    except sshkeys.KeyRefused as exc:
        secret = isinstance(exc, sshkeys.PrivateKeyPasted)
        raise SshKeyError("public_key", str(exc), secret=secret) from exc
    name = " ".join(name.split()) or key.comment[:NAME_MAX].strip()
    if not name:
        raise SshKeyError("name", "Give the key a name: it has no comment to take one from.")
    if len(name) > NAME_MAX:
        raise SshKeyError("name", f"Use at most {NAME_MAX} characters.")
    try:
        with transaction.atomic():
            _refuse_duplicates(owner, name, key.fingerprint)
            made = SshKey.objects.create(
                owner=owner, name=name, public_key=key.line, fingerprint=key.fingerprint
            )
            audit.record("ssh_key.add", made, by=owner, changes={"name": (None, name)})
            return made
    except IntegrityError:
        # Added by a concurrent request between the check and the insert: say which clashes.
        _refuse_duplicates(owner, name, key.fingerprint)
        raise


def _refuse_duplicates(owner: User, name: str, fingerprint: str) -> None:
    mine = SshKey.objects.filter(owner=owner)
    same = mine.filter(fingerprint=fingerprint).first()
    if same is not None:
        raise SshKeyError("public_key", f"You have added this key already, as “{same.name}”.")
    if mine.filter(name=name).exists():
        raise SshKeyError("name", f"You have a key named “{name}” already; pick another name.")


def ssh_key_remove(*, owner: User, key_id: int) -> SshKey:
    """Remove one of the owner's keys (SshKey.DoesNotExist when it is not theirs).

    Guests that have the key keep it: their keys were copied when they were asked for.
    """
    key = SshKey.objects.get(owner=owner, pk=key_id)
    with transaction.atomic():
        audit.record("ssh_key.remove", key, by=owner)
        key.delete()
    return key


def ssh_key_rename(*, owner: User, key_id: int, name: str) -> SshKey:
    """Give one of the owner's keys another name (SshKey.DoesNotExist when it is not theirs)."""
    name = " ".join(name.split())
    if not name:
        raise SshKeyError("name", "Give the key a name.")
    if len(name) > NAME_MAX:
        raise SshKeyError("name", f"Use at most {NAME_MAX} characters.")
    key = SshKey.objects.get(owner=owner, pk=key_id)
    if key.name == name:
        return key
    try:
        with transaction.atomic():
            before = key.name
            key.name = name
            key.save(update_fields=["name"])
            audit.record("ssh_key.rename", key, by=owner, changes={"name": (before, name)})
    except IntegrityError:
        taken = f"You have a key named “{name}” already; pick another name."
        raise SshKeyError("name", taken) from None
    return key
