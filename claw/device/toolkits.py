"""Toolkits: what an agent can do, as plug-ins.

A toolkit has a `slug` (its name in `hello.agent.toolkits` and in a task's
`required_toolkits`), a `version`, JSON schemas for its tools, and
`async run(tool, args, ctx) -> dict`. A task step names a tool as either

* `"slug.tool"` — e.g. `"files.write"`, `"shell.run"`; or
* `"slug"` alone — the toolkit's default tool (`shell` → `shell.run`, `python` → `python.run`,
  `http` → `http.request`). `files` has no default: name `files.read`, `files.write` or
  `files.list`.

`run` receives the short tool name (`"write"`), the step's `args`, and a ToolContext (the
workdir, the task and attempt). It returns a JSON-able dict, or raises ToolError — with
`retryable=True` when trying again may work (a timeout, a dropped connection, HTTP 5xx).

Built-ins: shell, python, files, http. Others are found through the entry point group
`claw.toolkits`; an entry point names a Toolkit subclass, a factory returning one, or an
instance:

    [project.entry-points."claw.toolkits"]
    browser = "my_package.browser:BrowserToolkit"
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.metadata
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("claw.device")

ENTRY_POINT_GROUP = "claw.toolkits"
OUTPUT_CAP = 64 * 1024  # bytes kept of each of stdout/stderr, of a file read, of an HTTP body
DEFAULT_TIMEOUT_S = 60
MAX_TIMEOUT_S = 600
HTTP_DEFAULT_TIMEOUT_S = 30
HTTP_MAX_TIMEOUT_S = 120
FILE_READ_MAX = 1024 * 1024


class ToolError(Exception):
    """A tool call failed. `retryable`: trying again later may work. `output`: what the
    tool produced before failing (reported in the step's progress)."""

    def __init__(self, message: str, *, retryable: bool = False, output: dict | None = None):
        super().__init__(message)
        self.message, self.retryable, self.output = message, retryable, output


@dataclass(frozen=True)
class ToolContext:
    workdir: Path
    task_id: int | None = None
    attempt_id: int | None = None
    epoch: int | None = None


class Toolkit(ABC):
    """The plug-in interface. Subclass it (or duck-type it: slug, version, schemas(),
    default_tool, async run())."""

    slug: str
    version: str
    default_tool: str | None = None

    @abstractmethod
    def schemas(self) -> list[dict[str, Any]]:
        """One entry per tool: {"name": "slug.tool", "description": ..., "parameters":
        <JSON schema of args>}. Sent to the server in hello.agent.tool_schemas."""

    @abstractmethod
    async def run(self, tool: str, args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        """Run `tool` (the short name) with `args`; return a JSON-able dict or raise
        ToolError."""

    def tool_names(self) -> list[str]:
        return [schema["name"].split(".", 1)[-1] for schema in self.schemas()]


# --- argument helpers --------------------------------------------------------------------


def _timeout(args: dict, default: float, maximum: float) -> float:
    value = args.get("timeout", default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= maximum:
        raise ToolError(f"timeout must be a number of seconds from 1 to {maximum:g}.")
    return float(value)


def _string(args: dict, name: str, *, required: bool = True) -> str:
    value = args.get(name, None if required else "")
    if not isinstance(value, str) or (required and not value):
        raise ToolError(f"{name} must be a non-empty string." if required else f"{name}: a string")
    return value


def _allowed(args: dict, allowed: Iterable[str]) -> None:
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise ToolError(f"Unknown argument(s) {', '.join(unknown)}; expected {sorted(allowed)}.")


class _Capped:
    """Keeps the first `limit` bytes of a stream and counts the rest."""

    def __init__(self, limit: int):
        self.limit, self.data, self.total = limit, bytearray(), 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.data)

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, a child that gets SIGKILL when the agent dies (even by kill -9), so a
    resumed attempt never runs next to the old copy of its step."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_parent_death_signal() -> None:  # runs in the child, between fork and exec
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the agent died before prctl took effect
            os._exit(1)

    return set_parent_death_signal


PR_SET_PDEATHSIG = 1


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


async def run_process(
    argv: list[str],
    *,
    cwd: Path,
    timeout: float,
    cap: int = OUTPUT_CAP,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> dict[str, Any]:
    """Run a command in its own process group with a timeout (then the whole group is
    killed) and stdout/stderr each capped at `cap` bytes. The command is killed when the
    attempt is stopped, and (on Linux) when the agent process dies."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        preexec_fn=_die_with_parent(),  # one prctl call between fork and exec
    )
    out, err = _Capped(cap), _Capped(cap)

    async def pump(stream: asyncio.StreamReader, sink: _Capped) -> None:
        while chunk := await stream.read(65536):
            sink.add(chunk)

    def result(**extra) -> dict[str, Any]:
        return {
            "exit_code": proc.returncode,
            "stdout": out.text(),
            "stderr": err.text(),
            "truncated": out.truncated or err.truncated,
            "stdout_bytes": out.total,
            "stderr_bytes": err.total,
            "duration_s": round(time.monotonic() - started, 3),
            **extra,
        }

    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(pump(proc.stdout, out), pump(proc.stderr, err), proc.wait())
    except TimeoutError:
        _kill_group(proc)
        await proc.wait()
        raise ToolError(
            f"timed out after {timeout:g} s", retryable=True, output=result(timed_out=True)
        ) from None
    finally:
        _kill_group(proc)  # cancelled (the attempt was stopped) or an error: leave nothing
    output = result(timed_out=False)
    if check and proc.returncode != 0:
        tail = (err.text() or out.text()).strip()[-500:]
        raise ToolError(f"exit code {proc.returncode}: {tail}".rstrip(": "), output=output)
    return output


# --- shell and python --------------------------------------------------------------------

PROCESS_ARGS = {
    "timeout": {
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": MAX_TIMEOUT_S,
        "default": DEFAULT_TIMEOUT_S,
    },
    "check": {
        "type": "boolean",
        "default": True,
        "description": "A non-zero exit code fails the step.",
    },
    "env": {"type": "object", "additionalProperties": {"type": "string"}},
}


def _env(args: dict) -> dict[str, str] | None:
    env = args.get("env")
    if env is None:
        return None
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise ToolError("env must be an object of strings.")
    return env


class ShellToolkit(Toolkit):
    """`shell.run`: a command in the agent's workdir (`cmd` through /bin/sh, or `argv`)."""

    slug, version, default_tool = "shell", "1.0", "run"

    def schemas(self) -> list[dict[str, Any]]:
        return [
            {
                "name": "shell.run",
                "description": "Run a shell command in the agent's workdir. Output capped at "
                f"{OUTPUT_CAP} bytes per stream.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "cmd": {"type": "string", "description": "Run with /bin/sh -c."},
                        "argv": {"type": "array", "items": {"type": "string"}},
                        **PROCESS_ARGS,
                    },
                    "additionalProperties": False,
                },
            }
        ]

    async def run(self, tool: str, args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        _allowed(args, ("cmd", "argv", "timeout", "check", "env"))
        if ("cmd" in args) == ("argv" in args):
            raise ToolError("shell.run needs exactly one of cmd (a string) or argv (a list).")
        if "cmd" in args:
            argv = ["/bin/sh", "-c", _string(args, "cmd")]
        else:
            argv = args["argv"]
            if not argv or not all(isinstance(part, str) for part in argv):
                raise ToolError("argv must be a non-empty list of strings.")
        return await run_process(
            argv,
            cwd=ctx.workdir,
            timeout=_timeout(args, DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S),
            env=_env(args),
            check=args.get("check", True) is not False,
        )


class PythonToolkit(Toolkit):
    """`python.run`: a script run as `sys.executable -c CODE` in the workdir."""

    slug, version, default_tool = "python", "1.0", "run"

    def schemas(self) -> list[dict[str, Any]]:
        return [
            {
                "name": "python.run",
                "description": "Run a Python script in a subprocess in the agent's workdir.",
                "parameters": {
                    "type": "object",
                    "properties": {"code": {"type": "string"}, **PROCESS_ARGS},
                    "required": ["code"],
                    "additionalProperties": False,
                },
            }
        ]

    async def run(self, tool: str, args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        _allowed(args, ("code", "timeout", "check", "env"))
        return await run_process(
            [sys.executable, "-c", _string(args, "code")],
            cwd=ctx.workdir,
            timeout=_timeout(args, DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S),
            env=_env(args),
            check=args.get("check", True) is not False,
        )


# --- files -------------------------------------------------------------------------------


def inside_workdir(workdir: Path, raw: object) -> Path:
    """The real path of `raw` (relative to the workdir), refusing anything outside it:
    absolute paths, '..', and symlinks that lead out."""
    if not isinstance(raw, str) or not raw or "\0" in raw:
        raise ToolError("path must be a non-empty string (relative to the workdir).")
    if Path(raw).is_absolute() or raw.startswith("~"):
        raise ToolError(f"{raw!r}: absolute paths are refused; give a path inside the workdir.")
    root = workdir.resolve()
    target = (root / raw).resolve()
    if target != root and root not in target.parents:
        raise ToolError(f"{raw!r} resolves to {target}, outside the workdir {root}; refused.")
    return target


class FilesToolkit(Toolkit):
    """`files.read`, `files.write`, `files.list`: inside the agent's workdir only."""

    slug, version, default_tool = "files", "1.0", None

    def schemas(self) -> list[dict[str, Any]]:
        path = {"type": "string", "description": "Relative to the agent's workdir."}
        return [
            {
                "name": "files.read",
                "description": "Read a text file from the workdir.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "path": path,
                        "max_bytes": {"type": "integer", "minimum": 1, "maximum": FILE_READ_MAX},
                    },
                    "required": ["path"],
                    "additionalProperties": False,
                },
            },
            {
                "name": "files.write",
                "description": "Write (or append to) a text file in the workdir; makes "
                "missing folders.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "path": path,
                        "content": {"type": "string"},
                        "append": {"type": "boolean", "default": False},
                    },
                    "required": ["path", "content"],
                    "additionalProperties": False,
                },
            },
            {
                "name": "files.list",
                "description": "List a folder of the workdir.",
                "parameters": {
                    "type": "object",
                    "properties": {"path": {**path, "default": "."}},
                    "additionalProperties": False,
                },
            },
        ]

    async def run(self, tool: str, args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        handlers: dict[str, Callable[[dict, Path], dict]] = {
            "read": self._read,
            "write": self._write,
            "list": self._list,
        }
        if tool not in handlers:
            raise ToolError(f"files has no tool {tool!r}; use files.read, files.write, files.list.")
        return await asyncio.to_thread(handlers[tool], args, ctx.workdir)

    def _read(self, args: dict, workdir: Path) -> dict:
        _allowed(args, ("path", "max_bytes"))
        limit = args.get("max_bytes", OUTPUT_CAP)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= FILE_READ_MAX:
            raise ToolError(f"max_bytes must be an integer from 1 to {FILE_READ_MAX}.")
        target = inside_workdir(workdir, args.get("path"))
        try:
            with target.open("rb") as handle:
                data = handle.read(limit + 1)
            size = target.stat().st_size
        except FileNotFoundError:
            raise ToolError(f"{args['path']!r} does not exist.") from None
        except IsADirectoryError:
            raise ToolError(f"{args['path']!r} is a folder; use files.list.") from None
        except OSError as exc:
            raise ToolError(f"{args['path']!r}: {exc.strerror}") from None
        return {
            "path": args["path"],
            "content": data[:limit].decode("utf-8", errors="replace"),
            "size": size,
            "truncated": len(data) > limit,
        }

    def _write(self, args: dict, workdir: Path) -> dict:
        _allowed(args, ("path", "content", "append"))
        content = args.get("content")
        if not isinstance(content, str):
            raise ToolError("content must be a string.")
        target = inside_workdir(workdir, args.get("path"))
        data = content.encode()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("ab" if args.get("append") else "wb") as handle:
                handle.write(data)
        except IsADirectoryError:
            raise ToolError(f"{args['path']!r} is a folder.") from None
        except OSError as exc:
            raise ToolError(f"{args['path']!r}: {exc.strerror}") from None
        return {"path": args["path"], "bytes": len(data), "appended": bool(args.get("append"))}

    def _list(self, args: dict, workdir: Path) -> dict:
        _allowed(args, ("path",))
        raw = args.get("path", ".")
        target = inside_workdir(workdir, raw)
        if not target.is_dir():
            raise ToolError(f"{raw!r} is not a folder.")
        entries = []
        for child in sorted(target.iterdir(), key=lambda p: p.name)[:1000]:
            kind = (
                "link"
                if child.is_symlink()
                else "dir"
                if child.is_dir()
                else "file"
                if child.is_file()
                else "other"
            )
            size = child.lstat().st_size if kind == "file" else None
            entries.append({"name": child.name, "type": kind, "size": size})
        return {"path": raw, "entries": entries}


# --- http --------------------------------------------------------------------------------

HTTP_SCHEMES = ("http", "https")


def _check_url(url: object) -> str:
    if not isinstance(url, str) or not url:
        raise ToolError("url must be a non-empty string.")
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in HTTP_SCHEMES or not parsed.netloc:
        raise ToolError(f"Only http:// and https:// URLs are allowed, not {url!r}.")
    return url


class _SchemeCheckingRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are followed to http(s) URLs only, with the same clear error."""

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers.get("location") or headers.get("uri")
        if target:
            _check_url(urllib.parse.urljoin(req.full_url, target))
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


class HttpToolkit(Toolkit):
    """`http.request` (default), `http.get`, `http.post`: http(s) only, with a timeout and
    a cap on the body kept."""

    slug, version, default_tool = "http", "1.0", "request"

    def schemas(self) -> list[dict[str, Any]]:
        properties = {
            "url": {"type": "string", "format": "uri"},
            "headers": {"type": "object", "additionalProperties": {"type": "string"}},
            "body": {"type": "string"},
            "json": {"description": "Sent as the JSON body."},
            "timeout": {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": HTTP_MAX_TIMEOUT_S,
                "default": HTTP_DEFAULT_TIMEOUT_S,
            },
            "max_bytes": {"type": "integer", "minimum": 1, "maximum": FILE_READ_MAX},
        }
        method = {"type": "string", "enum": ["GET", "POST"], "default": "GET"}

        def schema(name: str, description: str, props: dict) -> dict:
            return {
                "name": name,
                "description": description,
                "parameters": {
                    "type": "object",
                    "properties": props,
                    "required": ["url"],
                    "additionalProperties": False,
                },
            }

        return [
            schema("http.request", "GET or POST a URL.", {**properties, "method": method}),
            schema("http.get", "GET a URL.", properties),
            schema("http.post", "POST to a URL.", properties),
        ]

    async def run(self, tool: str, args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        if tool not in ("request", "get", "post"):
            raise ToolError(f"http has no tool {tool!r}; use http.request, http.get, http.post.")
        allowed = ["url", "headers", "body", "json", "timeout", "max_bytes"]
        _allowed(args, [*allowed, "method"] if tool == "request" else allowed)
        method = args.get("method", "GET") if tool == "request" else tool.upper()
        if method not in ("GET", "POST"):
            raise ToolError("method must be GET or POST.")
        return await asyncio.to_thread(self._request, method, args)

    def _request(self, method: str, args: dict) -> dict:
        url = _check_url(args.get("url"))
        timeout = _timeout(args, HTTP_DEFAULT_TIMEOUT_S, HTTP_MAX_TIMEOUT_S)
        limit = args.get("max_bytes", OUTPUT_CAP)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= FILE_READ_MAX:
            raise ToolError(f"max_bytes must be an integer from 1 to {FILE_READ_MAX}.")
        headers = args.get("headers") or {}
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise ToolError("headers must be an object of strings.")
        data = None
        if "json" in args:
            data = json.dumps(args["json"]).encode()
            headers = {"Content-Type": "application/json", **headers}
        elif "body" in args:
            data = _string(args, "body", required=False).encode()
        if method == "POST" and data is None:
            data = b""
        request = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310
        opener = urllib.request.build_opener(_SchemeCheckingRedirects())
        try:
            with opener.open(request, timeout=timeout) as response:
                return self._result(response, response.status, limit)
        except urllib.error.HTTPError as exc:
            output = self._result(exc, exc.code, limit)
            transient = exc.code in (408, 425, 429) or exc.code >= 500
            raise ToolError(
                f"HTTP {exc.code} from {url}", retryable=transient, output=output
            ) from None
        except TimeoutError:
            raise ToolError(f"{url} did not answer within {timeout:g} s", retryable=True) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise ToolError(f"{url} timed out after {timeout:g} s", retryable=True) from None
            raise ToolError(f"{url}: {exc.reason}", retryable=True) from None
        except OSError as exc:
            raise ToolError(f"{url}: {exc}", retryable=True) from None

    @staticmethod
    def _result(response, status: int, limit: int) -> dict:
        body = response.read(limit + 1) if response.fp is not None else b""
        return {
            "status": status,
            "url": response.geturl(),
            "content_type": response.headers.get("Content-Type", ""),
            "body": body[:limit].decode("utf-8", errors="replace"),
            "truncated": len(body) > limit,
        }


# --- discovery ---------------------------------------------------------------------------

BUILTINS: dict[str, type[Toolkit]] = {
    "shell": ShellToolkit,
    "python": PythonToolkit,
    "files": FilesToolkit,
    "http": HttpToolkit,
}


class ToolkitNotFound(Exception):
    pass


def available_toolkits() -> dict[str, Any]:
    """slug -> a Toolkit class (built-ins) or an entry point (loaded on use). A plug-in
    cannot take over a built-in's slug."""
    found: dict[str, Any] = dict(BUILTINS)
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in BUILTINS:
            if not entry.value.startswith("claw.device."):
                logger.warning(
                    "ignoring plug-in %s for built-in toolkit %s", entry.value, entry.name
                )
            continue
        found.setdefault(entry.name, entry)
    return found


def _instantiate(slug: str, source: Any) -> Toolkit:
    obj = source.load() if isinstance(source, importlib.metadata.EntryPoint) else source
    toolkit = obj() if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "run")) else obj
    missing = [attr for attr in ("slug", "version", "schemas", "run") if not hasattr(toolkit, attr)]
    if missing:
        raise ToolkitNotFound(f"Toolkit {slug!r} lacks {', '.join(missing)}.")
    if toolkit.slug != slug:
        raise ToolkitNotFound(f"Entry point {slug!r} gave a toolkit named {toolkit.slug!r}.")
    return toolkit


def load_toolkits(slugs: Iterable[str]) -> dict[str, Toolkit]:
    available = available_toolkits()
    loaded: dict[str, Toolkit] = {}
    for slug in slugs:
        if slug not in available:
            raise ToolkitNotFound(
                f"No toolkit {slug!r}; available: {', '.join(sorted(available))}."
            )
        loaded[slug] = _instantiate(slug, available[slug])
    return loaded


def builtin_toolkits(slugs: Iterable[str] = tuple(BUILTINS)) -> dict[str, Toolkit]:
    return {slug: BUILTINS[slug]() for slug in slugs}


def resolve_tool(toolkits: dict[str, Toolkit], name: str) -> tuple[Toolkit, str]:
    """A step's tool name ("shell" or "files.write") -> (toolkit, short tool name)."""
    slug, _, tool = name.partition(".")
    toolkit = toolkits.get(slug)
    if toolkit is None:
        raise ToolError(f"This agent has no toolkit {slug!r} (it has {', '.join(toolkits)}).")
    names = toolkit.tool_names() if hasattr(toolkit, "tool_names") else []
    if not tool:
        tool = getattr(toolkit, "default_tool", None) or ""
        if not tool:
            listed = ", ".join(f"{slug}.{n}" for n in names)
            raise ToolError(f"{slug} has no default tool; name one of {listed}.")
    elif names and tool not in names:
        raise ToolError(f"{slug} has no tool {tool!r} (it has {', '.join(names)}).")
    return toolkit, tool
