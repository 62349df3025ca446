"""Forms: what users may type, checked against the template's ranges before any service runs."""

from __future__ import annotations

from typing import Any

from django import forms

from provisioning.models import NAME_VALIDATOR, GuestTemplate
from provisioning.services.provision import Overrides


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

    def __init__(self, *args: Any, template: GuestTemplate, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.template = template
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
        )


def _range_validator(template: GuestTemplate, field: str) -> Any:
    def check(value: int) -> None:
        problem = template.size_problem(field, value)
        if problem:
            raise forms.ValidationError(problem)

    return check
