"""URLs of the portal's pages."""

from django.urls import path

from . import streams, views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("events", streams.dashboard_events, name="dashboard-events"),
    path("healthz", views.healthz, name="healthz"),
    path("audit/", views.audit_log, name="audit"),
    path("audit/export.csv", views.audit_export, name="audit-export"),
    path("guests/new", views.new_guest, name="new-guest"),
    path("guests/<uuid:uuid>/", views.guest_detail, name="guest-detail"),
    path("guests/<uuid:uuid>/events", streams.guest_events, name="guest-events"),
    path("guests/<uuid:uuid>/stats", views.guest_stats, name="guest-stats"),
    path("guests/<uuid:uuid>/snapshots", views.snapshot_take, name="snapshot-take"),
    path(
        "guests/<uuid:uuid>/snapshots/<path:name>/revert",
        views.snapshot_change,
        {"kind": "revert"},
        name="snapshot-revert",
    ),
    path(
        "guests/<uuid:uuid>/snapshots/<path:name>/delete",
        views.snapshot_change,
        {"kind": "delete"},
        name="snapshot-delete",
    ),
    path("guests/<uuid:uuid>/actions/<slug:kind>", views.guest_action, name="guest-action"),
    path("guests/<uuid:uuid>/console/<slug:kind>/token", views.console_token, name="console-token"),
    path("guests/<uuid:uuid>/console/<slug:kind>/", views.console_page, name="console-page"),
    path("guests/<uuid:uuid>/rebuild", views.guest_rebuild, name="guest-rebuild"),
    path("guests/<uuid:uuid>/migrate", views.guest_migrate, name="guest-migrate"),
    path("guests/<uuid:uuid>/jobs/<int:pk>/cancel", views.job_cancel, name="job-cancel"),
    path("guests/<uuid:uuid>/schedules", views.schedule_create, name="schedule-create"),
    path(
        "guests/<uuid:uuid>/schedules/<int:pk>/toggle",
        views.schedule_toggle,
        name="schedule-toggle",
    ),
    path(
        "guests/<uuid:uuid>/schedules/<int:pk>/delete",
        views.schedule_delete,
        name="schedule-delete",
    ),
    path("install/<str:token>/", views.answer_file, name="answer-file"),
    path("profile/keys/", views.ssh_keys, name="ssh-keys"),
    path("profile/keys/<int:pk>/remove", views.ssh_key_remove, name="ssh-key-remove"),
    path("profile/tokens/", views.api_tokens, name="api-tokens"),
    path("profile/tokens/<int:pk>/revoke", views.api_token_revoke, name="api-token-revoke"),
    path("requests/<int:pk>/", views.request_detail, name="request-detail"),
    path("requests/<int:pk>/events", streams.request_events, name="request-events"),
    path("requests/<int:pk>/cancel", views.request_cancel, name="request-cancel"),
]
