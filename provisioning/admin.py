"""The Django admin: staff curate hosts, storage, media, networks, templates and quotas.

Every add, change and delete made here is kept in the audit log, with the changed fields'
values before and after; the audit log itself and API tokens are read only here.
"""

import copy
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.auth import admin as auth_admin
from django.contrib.auth.models import Group, User
from django.db import models as db_models
from django.db import transaction
from django.db.models import QuerySet
from django.forms.models import construct_instance
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join

from . import models
from .services import audit, templates, tokens

# Fields whose change is recorded without its values.
HIDDEN = frozenset({"password"})
HIDDEN_VALUE = "(hidden)"


def _fields(obj: db_models.Model, names: list[str]) -> list[Any]:
    """The model's own columns among the form's changed fields (not form-only fields)."""
    columns = {f.name: f for f in obj._meta.concrete_fields}
    return [columns[name] for name in names if name in columns]


def _action(obj: db_models.Model, verb: str) -> str:
    return f"admin.{obj._meta.model_name}.{verb}"


class AuditedAdmin(admin.ModelAdmin):
    """Writes an admin.<model>.add|change|delete audit row for every save and delete here."""

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        fields = _fields(obj, list(form.changed_data))
        before: dict[str, Any] = {}
        if change and fields:
            # From the database: the form has already put the new values on obj.
            row = (
                type(obj)
                ._base_manager.filter(pk=obj.pk)
                .values(*(f.attname for f in fields))
                .first()
            )
            before = {f.name: (row or {}).get(f.attname) for f in fields}
        super().save_model(request, obj, form, change)
        after = {f.name: f.value_from_object(obj) for f in fields}
        changes = audit.changed(before, after)
        for name in HIDDEN.intersection(changes):
            changes[name] = (HIDDEN_VALUE, HIDDEN_VALUE)
        audit.record(
            _action(obj, "change" if change else "add"), obj, by=request.user, changes=changes
        )

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        # Recorded first, while obj still has its id; the admin's transaction keeps both or none.
        audit.record(_action(obj, "delete"), obj, by=request.user)
        super().delete_model(request, obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        with transaction.atomic(using=queryset.db):
            for obj in queryset:
                audit.record(_action(obj, "delete"), obj, by=request.user)
            super().delete_queryset(request, queryset)


@admin.register(models.Host)
class HostAdmin(AuditedAdmin):
    list_display = (
        "name",
        "uri",
        "enabled",
        "capacity_vcpus",
        "capacity_memory_mib",
        "domain_type",
        "detected_domain_type",
        "last_seen",
    )
    list_filter = ("enabled", "domain_type")
    search_fields = ("name", "uri")
    readonly_fields = ("detected_domain_type", "last_seen", "unmanaged_domains", "created")


@admin.register(models.StoragePool)
class StoragePoolAdmin(AuditedAdmin):
    list_display = ("name", "host", "path", "for_guest_disks")
    list_filter = ("host", "for_guest_disks")
    search_fields = ("name", "path")


@admin.register(models.Network)
class NetworkAdmin(AuditedAdmin):
    list_display = ("name", "host", "kind", "source")
    list_filter = ("host", "kind")
    search_fields = ("name", "source")


@admin.register(models.Media)
class MediaAdmin(AuditedAdmin):
    list_display = ("name", "kind", "pool", "volume", "path", "kernel_path")
    list_filter = ("kind",)
    search_fields = ("name", "description", "volume", "path", "kernel_path")


class GuestTemplateForm(forms.ModelForm):
    class Meta:
        model = models.GuestTemplate
        fields = "__all__"  # noqa: DJ007 - the admin's fieldsets pick the fields
        widgets = {"cloud_config": forms.Textarea(attrs={"rows": 12, "cols": 90})}

    def clean(self) -> dict[str, Any] | None:
        data = super().clean()
        if not self.errors:
            # The template as it would be saved (the instance takes the form's values later).
            candidate = construct_instance(self, copy.copy(self.instance))
            problem = templates.template_base_problem(candidate)
            if problem:
                self.add_error("base_volume", problem)
        return data


@admin.register(models.GuestTemplate)
class GuestTemplateAdmin(AuditedAdmin):
    form = GuestTemplateForm
    list_display = ("name", "method", "lifecycle", "version", "enabled", "host", "updated")
    list_filter = ("method", "lifecycle", "enabled", "host")
    search_fields = ("name", "description")
    readonly_fields = ("version", "created", "updated", "xml_preview")
    actions = ["validate_with_libvirt"]
    fieldsets = (
        (None, {"fields": ("name", "description", "enabled", "version", "host")}),
        (
            "Installation",
            {
                "fields": (
                    "method",
                    "lifecycle",
                    "media",
                    "network",
                    "pool",
                    "base_volume",
                    "kernel_cmdline",
                    "answer_file",
                    "answer_delivery",
                    "final_boot",
                    "bootloader_path",
                    "install_timeout_minutes",
                )
            },
        ),
        (
            "Sizes users may pick",
            {
                "fields": (
                    ("vcpus_min", "vcpus_default", "vcpus_max"),
                    ("memory_mib_min", "memory_mib_default", "memory_mib_max"),
                    ("disk_mib_min", "disk_mib_default", "disk_mib_max"),
                    ("data_disk_mib_default", "data_disk_mib_max"),
                )
            },
        ),
        (
            "Cloud image (cloud-init)",
            {
                "fields": (
                    "cloud_user",
                    "cloud_config",
                    "user_cloud_config",
                    "cloud_config_fetches",
                )
            },
        ),
        ("Options", {"fields": ("start_paused", "autodestroy", "autostart")}),
        ("Domain XML (and cloud-init seed) of an example guest", {"fields": ("xml_preview",)}),
    )

    @admin.display(description="Preview")
    def xml_preview(self, obj: models.GuestTemplate) -> str:
        if obj.pk is None:
            return "Save the template to see its domain XML."
        preview = templates.template_preview(obj)
        if "error" in preview:
            return format_html('<p class="errornote">{}</p>', preview["error"])
        install = preview["install"]
        seed = format_html_join(
            "",
            "<h4>{}</h4><pre>{}</pre>",
            (
                (name if name == "answer-file" else f"cloud-init {name}", preview[name])
                for name in ("meta-data", "user-data", "network-config", "answer-file")
                if name in preview
            ),
        )
        return format_html(
            "{}<h4>Final (persistent) phase</h4><pre>{}</pre>{}",
            format_html("<h4>Install phase</h4><pre>{}</pre>", install) if install else "",
            preview["final"],
            seed,
        )

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        templates.template_saved(template=obj, changed=change and form.has_changed())

    @admin.action(description="Validate the domain XML with libvirt")
    def validate_with_libvirt(
        self, request: HttpRequest, queryset: QuerySet[models.GuestTemplate]
    ) -> None:
        for template in queryset:
            problems = templates.template_validate(template)
            if problems:
                self.message_user(
                    request, f"{template.name}: {'; '.join(problems)}", messages.ERROR
                )
            else:
                self.message_user(request, f"{template.name}: libvirt accepts both phases.")


class SnapshotInline(admin.TabularInline):
    """libvirt holds a guest's snapshots; the rows only mirror them, so they are read-only here
    (taken, reverted and deleted from the guest's page or the API, as jobs)."""

    model = models.Snapshot
    extra = 0
    fields = ("name", "taken", "state", "memory", "current", "size_bytes", "description")
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(models.Guest)
class GuestAdmin(AuditedAdmin):
    inlines = [SnapshotInline]
    list_display = ("name", "owner", "host", "state", "state_reason", "persistent", "autostart")
    list_filter = ("state", "host", "persistent", "autostart")
    search_fields = ("name", "uuid", "owner__username")
    list_select_related = ("owner", "host")
    readonly_fields = ("uuid", "state", "state_reason", "state_changed", "created")


class JobEventInline(admin.TabularInline):
    model = models.JobEvent
    extra = 0
    readonly_fields = ("created", "kind", "message", "progress")
    can_delete = False


class RequestEventInline(admin.TabularInline):
    model = models.RequestEvent
    extra = 0
    readonly_fields = ("created", "from_status", "to_status", "note")
    can_delete = False


@admin.register(models.ProvisioningRequest)
class ProvisioningRequestAdmin(AuditedAdmin):
    inlines = [RequestEventInline]
    list_display = ("name", "owner", "template", "template_version", "host", "status", "created")
    list_filter = ("status", "host", "template")
    search_fields = ("name", "owner__username", "error")
    list_select_related = ("owner", "template", "host")
    readonly_fields = ("created", "updated", "completed")


@admin.register(models.Job)
class JobAdmin(AuditedAdmin):
    list_display = ("id", "kind", "status", "guest", "request", "progress", "created", "completed")
    list_filter = ("status", "kind")
    search_fields = ("guest__name", "request__name", "error")
    list_select_related = ("guest", "request")
    readonly_fields = ("created", "started", "completed")
    inlines = [JobEventInline]


@admin.register(models.Quota)
class QuotaAdmin(AuditedAdmin):
    list_display = ("__str__", "max_guests", "max_vcpus", "max_memory_mib", "max_disk_mib")
    search_fields = ("user__username", "group__name")
    list_select_related = ("user", "group")


class ScheduleRunInline(admin.TabularInline):
    model = models.ScheduleRun
    extra = 0
    readonly_fields = ("fired", "outcome", "result", "duration", "job", "message")
    can_delete = False


@admin.register(models.RebuildSchedule)
class RebuildScheduleAdmin(AuditedAdmin):
    list_display = ("guest", "periodic_task", "source", "keep_data_disk", "created_by", "created")
    list_filter = ("source", "keep_data_disk")
    search_fields = ("guest__name", "periodic_task__name")
    list_select_related = ("guest", "periodic_task", "created_by")
    inlines = [ScheduleRunInline]


@admin.register(models.ScheduleRun)
class ScheduleRunAdmin(AuditedAdmin):
    list_display = ("schedule", "fired", "outcome", "result", "duration", "message")
    list_filter = ("outcome",)
    search_fields = ("schedule__guest__name", "message")
    list_select_related = ("schedule__guest", "schedule__periodic_task", "job")


@admin.register(models.TemplateVersion)
class TemplateVersionAdmin(AuditedAdmin):
    list_display = ("template", "version", "created")
    list_filter = ("template",)
    readonly_fields = ("template", "version", "fields", "created")


@admin.register(models.SshKey)
class SshKeyAdmin(AuditedAdmin):
    list_display = ("owner", "name", "fingerprint", "created")
    search_fields = ("owner__username", "name", "fingerprint")
    list_select_related = ("owner",)
    readonly_fields = ("owner", "public_key", "fingerprint", "created")

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Keys are added on the owner's profile page, where they are checked; staff may rename
        # or remove one here, not change the key itself.
        return False


@admin.register(models.ConsoleSession)
class ConsoleSessionAdmin(AuditedAdmin):
    """Who opened which guest's console, when and for how long: a record, read only."""

    list_display = ("guest", "kind", "user", "opened", "closed", "close_reason", "client")
    list_filter = ("kind",)
    search_fields = ("guest__name", "user__username")
    list_select_related = ("guest", "user")
    exclude = ("token_hash",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[models.ConsoleSession]:
        return super().get_queryset(request).filter(opened__isnull=False)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


# Django's own user and group pages, audited like the rest.
admin.site.unregister(User)
admin.site.unregister(Group)


@admin.register(User)
class UserAdmin(AuditedAdmin, auth_admin.UserAdmin):
    pass


@admin.register(Group)
class GroupAdmin(AuditedAdmin, auth_admin.GroupAdmin):
    pass


@admin.register(models.ApiToken)
class ApiTokenAdmin(AuditedAdmin):
    """Users' API tokens, read only (never their digest); staff may revoke one."""

    list_display = (
        "name",
        "user",
        "prefix",
        "scope",
        "created",
        "expires",
        "last_used",
        "last_used_from",
        "revoked",
    )
    list_filter = ("scope",)
    search_fields = ("name", "prefix", "user__username")
    list_select_related = ("user",)
    fields = list_display
    actions = ["revoke"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # a token is made by its owner, on their profile page, and shown once

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False  # revoked, not deleted: the audit log names it

    def has_revoke_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("provisioning.change_apitoken")

    @admin.action(description="Revoke the selected tokens", permissions=["revoke"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[models.ApiToken]) -> None:
        done = 0
        for token in queryset.filter(revoked__isnull=True).select_related("user"):
            try:
                tokens.token_revoke(user=token.user, token_id=token.pk, by=request.user)
            except models.ApiToken.DoesNotExist:
                continue  # revoked meanwhile
            done += 1
        self.message_user(request, f"Revoked {done} token{'s' if done != 1 else ''}.")


@admin.register(models.AuditEvent)
class AuditEventAdmin(AuditedAdmin):
    """The audit log: every staff member may read it, nobody may add, change or delete a row."""

    list_display = (
        "created",
        "actor_name",
        "channel",
        "action",
        "object_type",
        "object_repr",
        "result",
        "source_ip",
        "token_name",
    )
    list_filter = ("channel", "result", "action")
    search_fields = ("actor_name", "action", "object_id", "object_repr", "detail", "source_ip")
    date_hierarchy = "created"
    fields = (
        "created",
        "actor_name",
        "channel",
        "token_name",
        "source_ip",
        "action",
        "object_type",
        "object_id",
        "object_repr",
        "result",
        "changes",
        "detail",
    )
    readonly_fields = fields
    show_full_result_count = False  # a COUNT(*) of the whole log on every page is not needed

    def has_module_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.is_active and request.user.is_staff)

    def has_view_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return bool(request.user.is_active and request.user.is_staff)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False
