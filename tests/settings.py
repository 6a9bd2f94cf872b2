import os
import tempfile

from tests.services import configure

SERVICE_SKIPS = configure()
os.environ.setdefault("CLAW_DATA_DIR", tempfile.mkdtemp(prefix="claw-test-"))
os.environ.setdefault("CLAW_CHANNEL_PREFIX", f"claw-test-{os.getpid()}")
# Each run's own multiprocess metrics directory (claw.metrics), as in services mode: a
# test's subprocess adds to the same scrape. Set before anything imports claw.metrics.
os.environ["CLAW_METRICS_DIR"] = tempfile.mkdtemp(prefix="claw-test-metrics-")

from claw.settings import *  # noqa: E402, F403

os.makedirs(STATIC_ROOT, exist_ok=True)  # noqa: F405 - WhiteNoise warns when it is missing
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# Consumers run ORM calls in worker threads; persistent connections there would outlive
# the test and block dropping the test database.
DATABASES["default"]["CONN_MAX_AGE"] = 0  # noqa: F405

# Per-process cache, cleared around every test (tests/conftest.py): throttles and other
# cached counters must not leak between tests or test runs through a shared Redis.
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# In-process tests feed no real broker: nothing consumes there, and work enqueued on commit
# (matching) must not pile up in Redis. The live-server tests run Celery on Redis for real.
CELERY_BROKER_URL = "memory://localhost/"

# No web process here (apps.devices.servers): no heartbeat thread writing to the test
# database behind the tests' backs.
SERVER_HEARTBEAT = False
