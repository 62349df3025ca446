"""Root URL configuration."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from provisioning.api import base, docs, routes  # noqa: F401 - routes registers the operations

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/docs", docs.api_docs, name="api-docs"),
    path("api/v1/", base.urls()),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", include("provisioning.urls")),
]
