"""The device's config file and pairing.

The file (default ~/.config/claw/device.json; CLAW_DEVICE_CONFIG or --config choose
another) holds the server URL, the device id and name, its kind, and the device token. The
token is a secret: the file is created with mode 0600 in a 0700 directory and rewritten
atomically (temporary file + rename), never widened.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform as platform_module
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

CONFIG_ENV = "CLAW_DEVICE_CONFIG"
DEVICE_KINDS = ("laptop", "phone", "cloud", "other")
HTTP_TIMEOUT_S = 15


class ConfigError(Exception):
    """The config file is missing or unusable; the message says what to do."""


class PairingError(Exception):
    """The server refused the pairing code (or could not be reached)."""

    def __init__(self, code: str, message: str, status: int | None = None):
        super().__init__(f"{message} ({code})")
        self.code, self.message, self.status = code, message, status


@dataclass(frozen=True)
class DeviceConfig:
    server: str
    device_id: int
    token: str
    name: str
    kind: str
    group_id: int | None = None


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "claw" / "device.json"


def config_path(explicit: str | os.PathLike | None = None) -> Path:
    """--config, else $CLAW_DEVICE_CONFIG, else ~/.config/claw/device.json."""
    chosen = explicit or os.environ.get(CONFIG_ENV)
    return Path(chosen).expanduser() if chosen else default_config_path()


def state_dir(path: Path, agent_name: str) -> Path:
    """Where an agent keeps its attempt journals: next to the config, one folder per name."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", agent_name)[:100] or "agent"
    return path.parent / "agents" / safe


def normalize_server(server: str) -> str:
    """http(s)://host[:port][/prefix] without a trailing slash; anything else is refused."""
    parsed = urllib.parse.urlparse(server.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"The server URL must start with http:// or https://, not {server!r}.")
    return urllib.parse.urlunparse(parsed._replace(path=parsed.path.rstrip("/"), query=""))


def ws_url(server: str) -> str:
    """http://host/prefix -> ws://host/prefix/ws/agent/ (https -> wss)."""
    parsed = urllib.parse.urlparse(normalize_server(server))
    scheme = "wss" if parsed.scheme == "https" else "ws"
    return urllib.parse.urlunparse(parsed._replace(scheme=scheme, path=parsed.path + "/ws/agent/"))


def save_config(config: DeviceConfig, path: Path) -> Path:
    """Write the config with mode 0600 (atomically; an existing file is replaced)."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the mode argument is masked by the umask; this is not
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(config), handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path


def load_config(path: Path | None = None) -> DeviceConfig:
    path = Path(path) if path is not None else config_path()
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"No device config at {path}. Pair this device first: "
            "claw device pair --server URL --code CODE --name NAME"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"Cannot read the device config {path}: {exc}") from None
    mode = path.stat().st_mode & 0o777
    if os.name == "posix" and mode & 0o077:
        raise ConfigError(
            f"{path} holds a device token but is readable by others (mode {mode:o}); "
            f"run: chmod 600 {path}"
        )
    try:
        return DeviceConfig(
            server=normalize_server(raw["server"]),
            device_id=int(raw["device_id"]),
            token=str(raw["token"]),
            name=str(raw["name"]),
            kind=str(raw.get("kind", "other")),
            group_id=raw.get("group_id"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"The device config {path} is incomplete ({exc}); pair again.") from None


def _post_json(url: str, body: dict, timeout: float) -> tuple[int, dict]:
    request = urllib.request.Request(  # noqa: S310 - the scheme was checked (http/https)
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Accept": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            payload = json.loads(exc.read() or b"{}")
        except ValueError:
            payload = {}
        if not isinstance(payload, dict):
            payload = {}
        return exc.code, payload
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PairingError("unreachable", f"Could not reach {url}: {reason}") from None
    except ValueError:
        raise PairingError("bad_response", f"{url} did not answer with JSON.") from None


def pair(
    server: str,
    code: str,
    name: str,
    kind: str = "other",
    platform: str | None = None,
    *,
    timeout: float = HTTP_TIMEOUT_S,
) -> DeviceConfig:
    """Exchange a pairing code for a device token; returns the config to save."""
    server = normalize_server(server)
    if kind not in DEVICE_KINDS:
        raise ConfigError(f"kind must be one of {', '.join(DEVICE_KINDS)}, not {kind!r}.")
    if platform is None:
        platform = f"{platform_module.system()} {platform_module.machine()}".strip()[:100]
    status, payload = _post_json(
        f"{server}/api/v1/devices/pair",
        {"code": code.strip(), "name": name, "kind": kind, "platform": platform},
        timeout,
    )
    if status != 201:
        raise PairingError(
            str(payload.get("code") or f"http_{status}"),
            str(payload.get("message") or f"The server answered HTTP {status}."),
            status,
        )
    try:
        return DeviceConfig(
            server=server,
            device_id=int(payload["device"]["id"]),
            token=str(payload["token"]),
            name=str(payload["device"].get("name", name)),
            kind=str(payload["device"].get("kind", kind)),
            group_id=payload.get("group_id"),
        )
    except (KeyError, TypeError, ValueError):
        raise PairingError("bad_response", "The server's pairing answer was incomplete.") from None
