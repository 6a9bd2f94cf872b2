"""Claw settings: one file, configured from CLAW_* environment variables.

Embedded mode (nothing set): SQLite, in-process channel layer and Celery transport.
Services mode: CLAW_DATABASE_URL (PostgreSQL) and CLAW_REDIS_URL (channel layer + broker).
Every helper below raises ImproperlyConfigured on a bad value instead of guessing.
"""

import os
import secrets
import sys
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name} must be >= {minimum}, got {value}")
    return value


def env_float(name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name} must be >= {minimum}, got {value}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def database_from_url(url: str) -> dict:
    parsed = urlparse(url)
    if parsed.scheme in {"postgres", "postgresql"}:
        if not parsed.path.strip("/"):
            raise ImproperlyConfigured("CLAW_DATABASE_URL needs a database name")
        options = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        pool = database_pool()
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": unquote(parsed.path.lstrip("/")),
            "USER": unquote(parsed.username or ""),
            "PASSWORD": unquote(parsed.password or ""),
            "HOST": parsed.hostname or "",
            "PORT": str(parsed.port or ""),
            # Pooled connections are handed back after every request or ORM call, so
            # CONN_MAX_AGE must be 0 (Django refuses a pool with persistent connections).
            "CONN_MAX_AGE": 0 if pool else env_int("CLAW_DB_CONN_MAX_AGE", 60),
            "CONN_HEALTH_CHECKS": True,
            "OPTIONS": {"connect_timeout": 5, **options, **({"pool": pool} if pool else {})},
        }
    if parsed.scheme == "sqlite":
        return sqlite_database(Path(unquote(parsed.path)))
    raise ImproperlyConfigured(
        f"CLAW_DATABASE_URL must start with postgresql:// or sqlite:///, got {parsed.scheme!r}"
    )


def _celery_process() -> bool:
    """A Celery worker or beat (`celery -A claw …`, `python -m celery …`). They keep plain
    connections: Celery closes them around every task anyway, and a worker forks its
    children from a process whose maintainer thread uses the database, so a pool there
    would only add sockets a child could inherit; Celery's fork handling is written for
    plain connections."""
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    return program.name == "celery" or program.parent.name == "celery"


def database_pool() -> dict | None:
    """psycopg's connection pool, per process (CLAW_DB_POOL=0: one connection per thread,
    kept CLAW_DB_CONN_MAX_AGE seconds). Without it every thread that ever ran an ORM call
    (the agent sockets' pool threads, the gateway's) kept a connection of its own.

    The defaults keep the services deployment of the load target (2 web processes, 2
    Celery workers at concurrency 2, 1 beat) at most 2 x 20 + 4 x 1 = 44 connections: a
    Celery worker process runs one task at a time and Celery closes its pool after each,
    and beat does not touch the database. A caller that waits CLAW_DB_POOL_TIMEOUT for a
    free connection gets an OperationalError (PoolTimeout), which the API and pages answer
    with 503 database_unavailable."""
    if not env_bool("CLAW_DB_POOL", not _celery_process()):
        return None
    min_size = env_int("CLAW_DB_POOL_MIN", 1)
    max_size = env_int("CLAW_DB_POOL_MAX", 20, minimum=1)
    if min_size > max_size:
        raise ImproperlyConfigured(
            f"CLAW_DB_POOL_MIN ({min_size}) must not exceed CLAW_DB_POOL_MAX ({max_size})"
        )
    return {
        "min_size": min_size,
        "max_size": max_size,
        "timeout": env_float("CLAW_DB_POOL_TIMEOUT", 5.0, minimum=0.1),
        "name": "claw",
    }


def sqlite_database(path: Path) -> dict:
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": path,
        "OPTIONS": {
            # IMMEDIATE takes the write lock at BEGIN, so concurrent writers queue on the
            # busy timeout instead of failing with "database is locked" on lock upgrade.
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
    }


def redis_url_checked(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in {"redis", "rediss"} or not parsed.hostname:
        raise ImproperlyConfigured(f"CLAW_REDIS_URL must be redis://host:port/db, got {url!r}")
    return url


DATA_DIR = Path(env_str("CLAW_DATA_DIR") or BASE_DIR / "var")
PRODUCTION = env_bool("CLAW_PRODUCTION", False)
# Off unless asked for: debug pages show settings and code to anyone who can reach the port
# (and `HOST=0.0.0.0 make up` is one command away).
DEBUG = env_bool("CLAW_DEBUG", False)


def load_secret_key() -> str:
    configured = env_str("CLAW_SECRET_KEY")
    if configured:
        if len(configured) < 50:
            raise ImproperlyConfigured("CLAW_SECRET_KEY must be at least 50 characters")
        return configured
    if PRODUCTION:
        raise ImproperlyConfigured("CLAW_SECRET_KEY is required when CLAW_PRODUCTION=1")
    # Embedded/dev: a key generated once per data dir, never committed.
    path = DATA_DIR / "secret_key"
    if not path.exists():
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(64))
    return path.read_text().strip()


SECRET_KEY = load_secret_key()
ALLOWED_HOSTS = env_list(
    "CLAW_ALLOWED_HOSTS", [] if PRODUCTION else ["127.0.0.1", "localhost", "[::1]", "testserver"]
)
if PRODUCTION and not ALLOWED_HOSTS:
    raise ImproperlyConfigured("CLAW_ALLOWED_HOSTS is required when CLAW_PRODUCTION=1")
CSRF_TRUSTED_ORIGINS = env_list("CLAW_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "apps.groups",
    "apps.devices",
    "apps.tasks",
    "apps.checkpoints",
    "apps.events",
    "apps.dashboard",
    "apps.llm",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "claw.middleware.DatabaseUnavailableMiddleware",
]

ROOT_URLCONF = "claw.urls"
ASGI_APPLICATION = "claw.asgi.application"
WSGI_APPLICATION = None

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

DATABASE_URL = env_str("CLAW_DATABASE_URL")
REDIS_URL = redis_url_checked(env_str("CLAW_REDIS_URL")) if env_str("CLAW_REDIS_URL") else ""
EMBEDDED = not REDIS_URL

DATABASES = {
    "default": database_from_url(DATABASE_URL)
    if DATABASE_URL
    else sqlite_database(DATA_DIR / "claw.sqlite3")
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                # redis-py 8 defaults socket_timeout to 5 s, equal to channels_redis's 5 s
                # blocking pop, so idle consumers would crash every ~5 s; and its async pool
                # caps at 100 connections. Both are set explicitly here.
                "hosts": [
                    {
                        "address": REDIS_URL,
                        "socket_timeout": env_int("CLAW_REDIS_SOCKET_TIMEOUT", 30, minimum=10),
                        "socket_connect_timeout": 5,
                        "max_connections": env_int("CLAW_REDIS_MAX_CONNECTIONS", 1000, minimum=10),
                    }
                ],
                "prefix": env_str("CLAW_CHANNEL_PREFIX", "claw"),
                "capacity": 500,
                "expiry": 30,
            },
        }
    }
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "claw",
        }
    }
else:
    # The in-memory layer, made safe to call from the embedded worker's threads.
    CHANNEL_LAYERS = {"default": {"BACKEND": "claw.embedded.InProcessChannelLayer"}}
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# Celery: Redis in services mode, Celery's in-memory transport inside the server process
# in embedded mode (claw.embedded starts a worker and beat thread next to Daphne).
CELERY_BROKER_URL = REDIS_URL or "memory://localhost/"
CELERY_BROKER_TRANSPORT_OPTIONS = (
    {"visibility_timeout": 3600} if REDIS_URL else {"polling_interval": 0.05}
)
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SOFT_TIME_LIMIT = 30
CELERY_TASK_TIME_LIMIT = 60
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Web processes register and heartbeat (apps.devices.servers) so the agents of one killed
# without closing its sockets are found. Embedded mode is one process: nothing to find.
SERVER_HEARTBEAT = not EMBEDDED
CELERY_BEAT_TICK_SECONDS = env_int("CLAW_BEAT_TICK_SECONDS", 5, minimum=1)
# One Redis can carry several Claw installations (or test runs): each consumes its own queue.
CELERY_TASK_DEFAULT_QUEUE = env_str("CLAW_CELERY_QUEUE") or "celery"
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "staticfiles"
WHITENOISE_USE_FINDERS = not PRODUCTION
MEDIA_ROOT = Path(env_str("CLAW_MEDIA_ROOT") or DATA_DIR / "media")
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if PRODUCTION
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}

CLAW_ARTIFACT_MAX_BYTES = env_int("CLAW_ARTIFACT_MAX_BYTES", 50 * 1024 * 1024, minimum=1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
# POST /api/v1/groups/SLUG/tasks/graph (up to 5,000 tasks) may send more than the bound above.
CLAW_TASK_GRAPH_MAX_BYTES = env_int(
    "CLAW_TASK_GRAPH_MAX_BYTES", 16 * 1024 * 1024, minimum=DATA_UPLOAD_MAX_MEMORY_SIZE
)
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024

# GET /metrics (claw.metrics): with a token, `Authorization: Bearer <token>` is required;
# without one, only unproxied loopback requests are answered. (CLAW_METRICS_DIR, the
# multiprocess directory, is read by claw.metrics itself, before any metric exists.)
METRICS_TOKEN = env_str("CLAW_METRICS_TOKEN")

# The model backend (claw.llm): any OpenAI-compatible endpoint, e.g. a self-hosted SGLang
# serving Kimi K2.6 or Moonshot's API. Empty base URL = no model configured.
CLAW_LLM_BASE_URL = env_str("CLAW_LLM_BASE_URL")
CLAW_LLM_API_KEY = env_str("CLAW_LLM_API_KEY")
CLAW_LLM_MODEL = env_str("CLAW_LLM_MODEL", "kimi-k2.6")
# K2.6 is tuned for temperature 1.0; other models may want their own.
CLAW_LLM_TEMPERATURE = env_float("CLAW_LLM_TEMPERATURE", 1.0)
CLAW_LLM_CONNECT_TIMEOUT_S = env_int("CLAW_LLM_CONNECT_TIMEOUT_S", 10, minimum=1)
# Long generations: a read timeout (between bytes), not a total one.
CLAW_LLM_READ_TIMEOUT_S = env_int("CLAW_LLM_READ_TIMEOUT_S", 300, minimum=1)
# Few retries: a retried timeout re-runs the whole generation on the GPUs.
CLAW_LLM_MAX_RETRIES = env_int("CLAW_LLM_MAX_RETRIES", 1)
# The backend probe (apps.llm.probe, run by beat): every N seconds (0: off), GET /health
# with this timeout (down when it fails), /v1/models and SGLang's /metrics. Saturated: more
# requests queued than CLAW_LLM_SATURATED_QUEUE, or KV cache use above CLAW_LLM_SATURATED_KV.
CLAW_LLM_PROBE_SECONDS = env_int("CLAW_LLM_PROBE_SECONDS", 15)
CLAW_LLM_PROBE_TIMEOUT_S = env_float("CLAW_LLM_PROBE_TIMEOUT_S", 3.0, minimum=0.1)
CLAW_LLM_SATURATED_QUEUE = env_int("CLAW_LLM_SATURATED_QUEUE", 32)
CLAW_LLM_SATURATED_KV = env_float("CLAW_LLM_SATURATED_KV", 0.95)
if CLAW_LLM_SATURATED_KV > 1:
    raise ImproperlyConfigured(
        f"CLAW_LLM_SATURATED_KV is a fraction from 0 to 1, got {CLAW_LLM_SATURATED_KV}"
    )

if PRODUCTION:
    SECURE_SSL_REDIRECT = env_bool("CLAW_SECURE_SSL_REDIRECT", True)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_HSTS_SECONDS = env_int("CLAW_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^metrics$"]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("CLAW_LOG_LEVEL", "INFO")},
    # httpx logs every request at INFO: one line per model call, which the gateway meters.
    "loggers": {name: {"level": "WARNING"} for name in ("django.channels.server", "httpx")},
}
