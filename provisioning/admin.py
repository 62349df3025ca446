"""The Django admin: staff curate hosts, storage, media, networks, templates and quotas."""

import copy
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.forms.models import construct_instance
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join

from . import models
from .services import templates


@admin.register(models.Host)
class HostAdmin(admin.ModelAdmin):
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
class StoragePoolAdmin(admin.ModelAdmin):
    list_display = ("name", "host", "path", "for_guest_disks")
    list_filter = ("host", "for_guest_disks")
    search_fields = ("name", "path")


@admin.register(models.Network)
class NetworkAdmin(admin.ModelAdmin):
    list_display = ("name", "host", "kind", "source")
    list_filter = ("host", "kind")
    search_fields = ("name", "source")


@admin.register(models.Media)
class MediaAdmin(admin.ModelAdmin):
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
class GuestTemplateAdmin(admin.ModelAdmin):
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


@admin.register(models.Guest)
class GuestAdmin(admin.ModelAdmin):
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
class ProvisioningRequestAdmin(admin.ModelAdmin):
    inlines = [RequestEventInline]
    list_display = ("name", "owner", "template", "template_version", "host", "status", "created")
    list_filter = ("status", "host", "template")
    search_fields = ("name", "owner__username", "error")
    list_select_related = ("owner", "template", "host")
    readonly_fields = ("created", "updated", "completed")


@admin.register(models.Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ("id", "kind", "status", "guest", "request", "progress", "created", "completed")
    list_filter = ("status", "kind")
    search_fields = ("guest__name", "request__name", "error")
    list_select_related = ("guest", "request")
    readonly_fields = ("created", "started", "completed")
    inlines = [JobEventInline]


@admin.register(models.Quota)
class QuotaAdmin(admin.ModelAdmin):
    list_display = ("__str__", "max_guests", "max_vcpus", "max_memory_mib", "max_disk_mib")
    search_fields = ("user__username", "group__name")
    list_select_related = ("user", "group")


class ScheduleRunInline(admin.TabularInline):
    model = models.ScheduleRun
    extra = 0
    readonly_fields = ("fired", "outcome", "result", "duration", "job", "message")
    can_delete = False


@admin.register(models.RebuildSchedule)
class RebuildScheduleAdmin(admin.ModelAdmin):
    list_display = ("guest", "periodic_task", "source", "keep_data_disk", "created_by", "created")
    list_filter = ("source", "keep_data_disk")
    search_fields = ("guest__name", "periodic_task__name")
    list_select_related = ("guest", "periodic_task", "created_by")
    inlines = [ScheduleRunInline]


@admin.register(models.ScheduleRun)
class ScheduleRunAdmin(admin.ModelAdmin):
    list_display = ("schedule", "fired", "outcome", "result", "duration", "message")
    list_filter = ("outcome",)
    search_fields = ("schedule__guest__name", "message")
    list_select_related = ("schedule__guest", "schedule__periodic_task", "job")


@admin.register(models.TemplateVersion)
class TemplateVersionAdmin(admin.ModelAdmin):
    list_display = ("template", "version", "created")
    list_filter = ("template",)
    readonly_fields = ("template", "version", "fields", "created")


@admin.register(models.SshKey)
class SshKeyAdmin(admin.ModelAdmin):
    list_display = ("owner", "name", "fingerprint", "created")
    search_fields = ("owner__username", "name", "fingerprint")
    list_select_related = ("owner",)
    readonly_fields = ("owner", "public_key", "fingerprint", "created")

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Keys are added on the owner's profile page, where they are checked; staff may rename
        # or remove one here, not change the key itself.
        return False


@admin.register(models.ConsoleSession)
class ConsoleSessionAdmin(admin.ModelAdmin):
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
