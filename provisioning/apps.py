"""The provisioning app."""

from django.apps import AppConfig


class ProvisioningConfig(AppConfig):
    name = "provisioning"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.contrib.auth import signals

        from provisioning.services import audit_signals

        # Logins are the one thing Django itself does that the audit log keeps.
        signals.user_logged_in.connect(audit_signals.on_logged_in, dispatch_uid="audit-login")
        signals.user_login_failed.connect(
            audit_signals.on_login_failed, dispatch_uid="audit-login-failed"
        )
        signals.user_logged_out.connect(audit_signals.on_logged_out, dispatch_uid="audit-logout")
