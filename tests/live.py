"""Helpers for tests that run real servers as subprocesses: free ports, explicit child
environments, output capture, bounded waits, a cookie-keeping HTTP client, and a dedicated
PostgreSQL database per test module."""

import contextlib
import http.cookiejar
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.services import DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**overrides: str | None) -> dict[str, str]:
    """os.environ without any CLAW_* or Django settings of this test run, plus overrides
    (None removes a variable)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("CLAW_") and key != "DJANGO_SETTINGS_MODULE"
    }
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


class Proc:
    """A subprocess in its own process group, its output collected line by line."""

    def __init__(self, name: str, command: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.lines: list[str] = []
        self.popen = subprocess.Popen(
            command,
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self, last: int = 60) -> str:
        return f"--- {self.name} output ---\n" + "\n".join(self.lines[-last:])

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = regex.search(line)
                if match:
                    return match
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: no line matching {pattern!r}\n{self.output()}")

    def terminate(self, timeout: float = 10.0, signum: int = signal.SIGTERM) -> float:
        """Signal the process (SIGTERM, or SIGINT for Ctrl-C); returns seconds to exit.
        Kills the whole group if it does not exit in time."""
        started = time.monotonic()
        if self.popen.poll() is None:
            self.popen.send_signal(signum)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        return time.monotonic() - started

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(5)

    def close(self) -> None:
        """Always safe: terminate the group, then kill what is left."""
        try:
            if self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(10)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            if self.popen.poll() is None:
                self.popen.wait(5)
            self._reader.join(2)


@contextlib.contextmanager
def running(name: str, command: list[str], env: dict[str, str]) -> Iterator[Proc]:
    proc = Proc(name, command, env)
    try:
        yield proc
    finally:
        proc.close()


class Browser:
    """Keeps cookies; GETs follow redirects, form POSTs send Django's CSRF token."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.cookies = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPCookieProcessor(self.cookies)
        )

    def cookie(self, name: str) -> str | None:
        return next((c.value for c in self.cookies if c.name == name), None)

    def request(self, path: str, data: dict | None = None, timeout: float = 10):
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(self.base_url + path, data=body)  # noqa: S310 - http://
        if data is not None:
            req.add_header("X-CSRFToken", self.cookie("csrftoken") or "")
            req.add_header("Referer", self.base_url + path)
        try:
            with self.opener.open(req, timeout=timeout) as response:
                return response.status, response.read().decode(), response.url
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(), exc.url

    def get(self, path: str):
        return self.request(path)

    def sign_in(self, username: str, password: str) -> None:
        status, page, _ = self.get("/login/")
        assert status == 200, page
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
        status, page, url = self.request(
            "/login/",
            {"username": username, "password": password, "csrfmiddlewaretoken": token},
        )
        assert status == 200 and not url.endswith("/login/"), f"sign-in failed: {url}\n{page}"


NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def health(base_url: str) -> tuple[int, dict]:
    try:
        with NO_PROXY_OPENER.open(base_url + "/healthz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        return 0, {"error": str(exc)}


def wait_healthy(base_url: str, timeout: float, *procs: Proc) -> dict:
    deadline = time.monotonic() + timeout
    status, body = 0, {}
    while time.monotonic() < deadline:
        status, body = health(base_url)
        if status == 200:
            return body
        dead = [p for p in procs if p.popen.poll() is not None]
        if dead:
            break
        time.sleep(0.25)
    outputs = "\n".join(p.output() for p in procs)
    raise AssertionError(f"/healthz never became ok: {status} {body}\n{outputs}")


def wait_listening(port: int, timeout: float, proc: Proc) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        if proc.popen.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port}\n{proc.output()}")


# --- a dedicated PostgreSQL database and Redis namespace for one module's servers ---------


def services_database_url() -> str:
    return os.environ.get("CLAW_TEST_DATABASE_URL", DEFAULT_DATABASE_URL)


def services_redis_url() -> str:
    return os.environ.get("CLAW_TEST_REDIS_URL", DEFAULT_REDIS_URL)


def _admin_connection():
    import psycopg

    parsed = urllib.parse.urlparse(services_database_url())
    return psycopg.connect(
        host=parsed.hostname,
        port=parsed.port or 5432,
        user=parsed.username or "",
        password=parsed.password or "",
        dbname="postgres",
        autocommit=True,
        connect_timeout=5,
    )


@contextlib.contextmanager
def dedicated_services(tag: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A fresh, migrated database claw_<tag>_<pid>, and a channel prefix and Celery queue
    nobody else uses; yields the CLAW_* environment for servers using them."""
    name = f"claw_{tag}_{os.getpid()}"
    base = urllib.parse.urlparse(services_database_url())
    url = urllib.parse.urlunparse(base._replace(path="/" + name))
    with _admin_connection() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    env = {
        "CLAW_DATABASE_URL": url,
        "CLAW_REDIS_URL": services_redis_url(),
        "CLAW_CHANNEL_PREFIX": name,
        "CLAW_CELERY_QUEUE": name,
        "CLAW_DATA_DIR": str(tmp_path / "data"),
        "CLAW_BEAT_TICK_SECONDS": "1",
    }
    try:
        manage(env, "migrate", "--verbosity", "0", timeout=120)
        yield env
    finally:
        with _admin_connection() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def manage(claw_env: dict[str, str], *args: str, timeout: float = 60) -> str:
    result = subprocess.run(
        [PYTHON, str(ROOT / "manage.py"), *args],
        env=child_env(**claw_env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"manage.py {args[0]} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout
