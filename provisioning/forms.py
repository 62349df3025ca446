"""Forms: what users may type, checked against the template's ranges before any service runs."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from typing import Any

from django import forms
from django.conf import settings
from django.contrib.auth.models import User
from django.core.validators import MaxValueValidator
from django.db.models import Q, QuerySet
from django.utils import timezone

from provisioning.models import NAME_VALIDATOR, ApiToken, AuditEvent, GuestTemplate, SshKey
from provisioning.services.provision import Overrides


class _KeyChoices(forms.ModelMultipleChoiceField):
    def label_from_instance(self, obj: Any) -> str:
        assert isinstance(obj, SshKey)
        return f"{obj.name} ({obj.fingerprint})"


class NewGuestForm(forms.Form):
    """A new guest from one template: a name, the sizes it allows and its options."""

    name = forms.CharField(max_length=63, validators=[NAME_VALIDATOR])
    vcpus = forms.IntegerField(label="vCPUs")
    memory_mib = forms.IntegerField(label="Memory (MiB)")
    disk_mib = forms.IntegerField(label="Disk (MiB)")
    data_disk_mib = forms.IntegerField(label="Data disk (MiB)", required=False, min_value=0)
    start_paused = forms.BooleanField(required=False, label="Start paused")
    autostart = forms.BooleanField(required=False, label="Start with the host (autostart)")
    autodestroy = forms.BooleanField(
        required=False, label="Destroy when the portal's connection closes (autodestroy)"
    )
    ssh_keys = _KeyChoices(
        queryset=SshKey.objects.none(),
        required=False,
        widget=forms.CheckboxSelectMultiple,
        label="SSH keys",
    )
    cloud_config = forms.CharField(
        required=False,
        label="Your cloud-config",
        widget=forms.Textarea(attrs={"rows": 8, "spellcheck": "false"}),
        help_text="Optional #cloud-config (YAML, 64 KiB at most) merged into the template's: "
        "packages, runcmd, write_files…",
    )

    def __init__(self, *args: Any, template: GuestTemplate, owner: User, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.template = template
        if template.method == GuestTemplate.Method.CLOUD:
            # Only the owner's own keys are choices: another user's key id is a form error.
            keys = self.fields["ssh_keys"]
            assert isinstance(keys, _KeyChoices)
            keys.queryset = SshKey.objects.filter(owner=owner)
            keys.initial = [key.pk for key in keys.queryset]
            keys.help_text = f"Given to the user {template.cloud_user} on the guest"
        else:
            del self.fields["ssh_keys"]  # only cloud-init puts keys on a guest
        if template.method != GuestTemplate.Method.CLOUD or not template.user_cloud_config:
            del self.fields["cloud_config"]
        for name in GuestTemplate.SIZES:
            low, default, high = template.size_range(name)
            if name == "data_disk_mib" and not high:
                del self.fields[name]  # this template offers no data disk
                continue
            f = self.fields[name]
            assert isinstance(f, forms.IntegerField)
            f.min_value, f.max_value, f.initial = low, high, default
            f.validators.append(_range_validator(template, name))
            f.widget.attrs.update(min=low, max=high)
            f.help_text = f"{low} to {high}"
        if "data_disk_mib" in self.fields:
            most = template.data_disk_mib_max
            self.fields["data_disk_mib"].help_text = f"0 (none) to {most}; a rebuild can keep it"
        transient = template.lifecycle == GuestTemplate.Lifecycle.TRANSIENT
        self.fields["start_paused"].initial = template.start_paused
        self.fields["autostart"].initial = template.autostart
        self.fields["autodestroy"].initial = template.autodestroy
        if transient:
            del self.fields["autostart"]
        else:
            del self.fields["autodestroy"]

    def overrides(self) -> Overrides:
        data = self.cleaned_data
        return Overrides(
            name=data["name"],
            vcpus=data["vcpus"],
            memory_mib=data["memory_mib"],
            disk_mib=data["disk_mib"],
            data_disk_mib=data.get("data_disk_mib") or 0,
            start_paused=data.get("start_paused"),
            autostart=data.get("autostart"),
            autodestroy=data.get("autodestroy"),
            ssh_keys=tuple(key.public_key for key in data.get("ssh_keys") or ()),
            cloud_config=data.get("cloud_config") or "",
        )


class SshKeyForm(forms.Form):
    """A public key to add to the user's profile: a name and the pasted key."""

    name = forms.CharField(
        max_length=100, required=False, help_text="The key's comment when left empty"
    )
    public_key = forms.CharField(
        label="Public key",
        widget=forms.Textarea(
            attrs={
                "rows": 4,
                "spellcheck": "false",
                "placeholder": "ssh-ed25519 AAAA… you@laptop",
                "style": "width: 100%; font-family: monospace",
            }
        ),
        help_text="One line, as in ~/.ssh/id_ed25519.pub",
    )

    def forget_public_key(self) -> None:
        """Render the key field empty: a pasted private key is never sent back to the browser."""
        self.data = {**dict(self.data.items()), "public_key": ""}


class ApiTokenForm(forms.Form):
    """A new personal API token: a name, read or read-write, and how many days it lasts."""

    DAYS_DEFAULT = 90

    name = forms.CharField(
        max_length=ApiToken._meta.get_field("name").max_length,
        help_text="What uses it, to tell it from your others",
    )
    scope = forms.ChoiceField(
        choices=ApiToken.Scope.choices, initial=ApiToken.Scope.READ, widget=forms.RadioSelect
    )
    days = forms.IntegerField(label="Valid for (days)", min_value=1)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        most = settings.API_TOKEN_MAX_DAYS
        days = self.fields["days"]
        assert isinstance(days, forms.IntegerField)
        days.max_value, days.initial = most, min(self.DAYS_DEFAULT, most)
        days.validators.append(MaxValueValidator(most, f"Pick 1 to {most} days."))
        days.widget.attrs.update(min=1, max=most)
        days.help_text = f"1 to {most}"


# The days a filter may name: beyond them a day's midnight may not exist in every time zone.
DAYS_SHOWN = (date(1970, 1, 1), date(9998, 12, 31))


def _all(choices: Any, label: str) -> list[tuple[str, str]]:
    return [("", label), *choices]


class AuditFilterForm(forms.Form):
    """Narrows the audit log: who, through what, which action and object, the result, when."""

    actor = forms.CharField(required=False, max_length=150, label="User")
    channel = forms.ChoiceField(
        required=False, choices=_all(AuditEvent.Channel.choices, "All channels")
    )
    action = forms.CharField(
        required=False, max_length=40, help_text="Starts with, e.g. guest. or admin."
    )
    object_type = forms.CharField(required=False, max_length=40, label="Object type")
    object = forms.CharField(
        required=False, max_length=200, help_text="Its id, or part of its name"
    )
    result = forms.ChoiceField(
        required=False, choices=_all(AuditEvent.Result.choices, "All results")
    )
    since = forms.DateField(
        required=False, label="From", widget=forms.DateInput(attrs={"type": "date"})
    )
    until = forms.DateField(
        required=False, label="To", widget=forms.DateInput(attrs={"type": "date"})
    )

    def clean(self) -> dict[str, Any] | None:
        data = super().clean() or {}
        for name in ("since", "until"):
            day = data.get(name)
            if day is not None and not DAYS_SHOWN[0] <= day <= DAYS_SHOWN[1]:
                self.add_error(name, f"Pick a day from {DAYS_SHOWN[0]} to {DAYS_SHOWN[1]}.")
        since, until = data.get("since"), data.get("until")
        if since and until and since > until:
            self.add_error("until", "Pick a day on or after the first day.")
        return data

    def events(self) -> QuerySet[AuditEvent]:
        """The rows that match, newest first (call once the form is valid)."""
        data = self.cleaned_data
        rows = AuditEvent.objects.all()
        if data.get("actor"):
            rows = rows.filter(actor_name__iexact=data["actor"])
        if data.get("channel"):
            rows = rows.filter(channel=data["channel"])
        if data.get("action"):
            rows = rows.filter(action__startswith=data["action"])
        if data.get("object_type"):
            rows = rows.filter(object_type=data["object_type"].lower())
        if data.get("object"):
            term = data["object"]
            rows = rows.filter(Q(object_id=term) | Q(object_repr__icontains=term))
        if data.get("result"):
            rows = rows.filter(result=data["result"])
        # Whole days in the portal's time zone, as a range on the indexed column.
        if data.get("since"):
            rows = rows.filter(created__gte=_midnight(data["since"]))
        if data.get("until"):
            rows = rows.filter(created__lt=_midnight(data["until"] + timedelta(days=1)))
        return rows.order_by("-created", "-id")


def _midnight(day: date) -> datetime:
    return timezone.make_aware(datetime.combine(day, time.min))


def _range_validator(template: GuestTemplate, field: str) -> Any:
    def check(value: int) -> None:
        problem = template.size_problem(field, value)
        if problem:
            raise forms.ValidationError(problem)

    return check
