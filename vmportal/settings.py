"""Django settings for vmportal, read from the environment with embedded defaults."""

from __future__ import annotations

import secrets
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import environ
from celery.schedules import crontab
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
VAR_DIR = Path(env.str("VMPORTAL_VAR_DIR", default=str(BASE_DIR / "var")))


def _ensure_var_dir() -> None:
    try:
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        # A probe file of this process's own: processes starting together must not remove
        # each other's (a shared name once failed a beat that started beside a worker).
        with tempfile.NamedTemporaryFile(dir=VAR_DIR, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise ImproperlyConfigured(
            f"var directory {VAR_DIR} is not writable ({exc.strerror}); "
            "set VMPORTAL_VAR_DIR to a writable folder"
        ) from exc


_ensure_var_dir()

DEBUG = env.bool("DEBUG", default=False)
PRODUCTION = env.bool("VMPORTAL_PRODUCTION", default=False)


def _secret_key() -> str:
    key = env.str("SECRET_KEY", default="")
    if key:
        return key
    if PRODUCTION:
        raise ImproperlyConfigured("SECRET_KEY must be set when VMPORTAL_PRODUCTION is on")
    key_file = VAR_DIR / "secret_key"
    if not key_file.exists():
        key_file.write_text(secrets.token_urlsafe(50))
        key_file.chmod(0o600)
    return key_file.read_text().strip()


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_htmx",
    "template_partials",
    "django_celery_beat",
    "provisioning",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "provisioning.middleware.AuditOriginMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "provisioning.middleware.ServiceUnavailableMiddleware",
    "provisioning.middleware.ApiHeadMiddleware",
]

ROOT_URLCONF = "vmportal.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "vmportal.wsgi.application"
ASGI_APPLICATION = "vmportal.asgi.application"

DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'vmportal.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Writers of several processes queue on a file lock rather than SQLite's busy polling.
    DATABASES["default"]["ENGINE"] = "vmportal.sqlite"
    # Several processes (web, worker, beat, listener) share the file: wait for locks, and use WAL.
    # In WAL mode, synchronous=NORMAL syncs at checkpoints rather than at every commit: a killed
    # process loses nothing committed and the file never corrupts; only a power loss may undo
    # the last commits. A sync per commit cost about a millisecond here, with the one write
    # lock held all along.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    _test_name = env.str("VMPORTAL_TEST_DB", default=str(VAR_DIR / "test.sqlite3"))
    DATABASES["default"]["TEST"] = {"NAME": _test_name}
elif env.str("VMPORTAL_TEST_DB", default=""):
    # The test suite names its database (one per test process).
    DATABASES["default"]["TEST"] = {"NAME": env.str("VMPORTAL_TEST_DB")}
# Connections are kept between requests and tasks: opening one (and, for SQLite, its pragmas)
# cost more than most queries a request makes.
DATABASES["default"].setdefault("CONN_MAX_AGE", 60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(env.str("STATIC_ROOT", default=str(VAR_DIR / "staticfiles")))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"

# Redis: broker, pub/sub for live pages, heartbeats.
REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")

# libvirt: the local host that `make run` serves.
LIBVIRT_URI = env.str("LIBVIRT_URI", default="qemu:///system")
# "auto" probes whether KVM really runs guests here; "kvm" or "qemu" forces one.
VMPORTAL_DOMAIN_TYPE = env.str("VMPORTAL_DOMAIN_TYPE", default="auto")
CONSOLE_LOG_DIR = Path(env.str("VMPORTAL_CONSOLE_LOG_DIR", default="/var/log/libvirt/qemu"))
# Browser consoles (serial terminal and VNC screen over WebSockets): a token the page mints is
# good once, for this many seconds; a console nobody types into closes after the idle time.
CONSOLE_TOKEN_SECONDS = env.int("VMPORTAL_CONSOLE_TOKEN_SECONDS", default=30)
CONSOLE_IDLE_SECONDS = env.int("VMPORTAL_CONSOLE_IDLE_SECONDS", default=30 * 60)
# How much of the serial log a terminal starts with, as scrollback.
CONSOLE_SCROLLBACK_BYTES = 64 * 1024
# Answer files: the portal's address as guests reach it (a host's own overrides it), and how
# long after a request is made its answer file can be fetched at most.
ANSWER_BASE_URL = env.str("VMPORTAL_ANSWER_BASE_URL", default="")
if ANSWER_BASE_URL and (_answer_host := urlsplit(ANSWER_BASE_URL).hostname):
    # Installers fetch with that address as their Host header.
    ALLOWED_HOSTS = [*ALLOWED_HOSTS, _answer_host]
SAVE_DIR = Path(env.str("VMPORTAL_SAVE_DIR", default="/var/lib/libvirt/qemu/save"))
# The demo images (the tiny guest, the Debian image): slow to build and the same for every
# checkout on the machine, so kept in the machine's cache, each keyed by its recipe and builder.
DEMO_DIR = Path(env.str("VMPORTAL_DEMO_DIR", default="/var/cache/vmportal/demo"))

# Celery. Long waits never hold a slot: tasks are short, so a modest visibility timeout
# that is still far above every task's hard time limit keeps redelivery safe.
TASK_HARD_TIME_LIMIT = 600
CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = False
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SOFT_TIME_LIMIT = TASK_HARD_TIME_LIMIT - 60
CELERY_TASK_TIME_LIMIT = TASK_HARD_TIME_LIMIT
# The longest task (a migration) may run an hour; redelivery waits twice that.
MIGRATION_TIME_LIMIT = 3600
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 2 * MIGRATION_TIME_LIMIT}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULER = "vmportal.beat:HeartbeatScheduler"
CELERY_TIMEZONE = TIME_ZONE
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_ROUTES = {"provisioning.reconcile": {"queue": "default"}}
RECONCILE_EVERY = env.float("VMPORTAL_RECONCILE_EVERY", default=15.0)
# Seconds between the listener's sampling rounds for the guests' usage graphs.
STATS_INTERVAL = env.float("VMPORTAL_STATS_INTERVAL", default=10.0)
# How often reconcile lists every guest's snapshots (a call per guest) to adopt or forget those
# made or deleted outside the portal.
SNAPSHOT_RECONCILE_SECONDS = env.float("VMPORTAL_SNAPSHOT_RECONCILE_SECONDS", default=300.0)
# A provisioning step or job not moved on for this long lost its worker or its message:
# reconcile queues it again (steps are idempotent). Tests shorten it to exercise recovery.
STALE_STEP_SECONDS = env.float("VMPORTAL_STALE_STEP_SECONDS", default=60.0)
# cloud-init's JSON schema for cloud-config (scripts/setup.sh fetches it from Debian's package).
CLOUD_CONFIG_SCHEMA = Path(
    env.str(
        "VMPORTAL_CLOUD_CONFIG_SCHEMA",
        default=str(BASE_DIR / "var" / "cloud-init" / "schema-cloud-config-v1.json"),
    )
)
# The API (/api/v1/): personal tokens live at most this many days; each token (or browser
# session) may make this many calls a minute, then gets 429 with Retry-After.
API_TOKEN_MAX_DAYS = env.int("VMPORTAL_API_TOKEN_MAX_DAYS", default=365)
API_RATE_PER_MINUTE = env.int("VMPORTAL_API_RATE_PER_MINUTE", default=600)
API_PAGE_SIZE_MAX = 200
# Idempotency-Key rows are kept this long: a retry after that makes a new request.
API_IDEMPOTENCY_HOURS = env.int("VMPORTAL_API_IDEMPOTENCY_HOURS", default=24)
# Audit rows older than this are pruned daily.
AUDIT_RETENTION_DAYS = env.int("VMPORTAL_AUDIT_RETENTION_DAYS", default=365)
CELERY_BEAT_SCHEDULE = {
    "reconcile": {"task": "provisioning.reconcile", "schedule": RECONCILE_EVERY},
    # Daily, at a quiet hour; a day it is missed, the next run removes both days' rows.
    "prune-audit": {
        "task": "provisioning.prune_audit",
        "schedule": crontab(hour=3, minute=17),
        "options": {"expires": 6 * 3600},
    },
}

if PRODUCTION:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
    SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
}

TESTING = "pytest" in sys.modules
