"""Domain errors: raised by services, rendered by the API and protocol layers as
`{"code": ..., "message": ...}` with the matching HTTP status."""


class DomainError(Exception):
    code = "conflict"
    status = 409

    def __init__(self, message: str, *, code: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.details = details or {}

    def as_dict(self) -> dict:
        body = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class InvalidInput(DomainError):
    code = "invalid"
    status = 422


class InvalidTransition(DomainError):
    code = "invalid_transition"
    status = 409


class StaleAttempt(DomainError):
    code = "stale_attempt"
    status = 409


class Forbidden(DomainError):
    code = "forbidden"
    status = 403


class NotFound(DomainError):
    code = "not_found"
    status = 404


class Unauthorized(DomainError):
    code = "unauthorized"
    status = 401


class Throttled(DomainError):
    code = "throttled"
    status = 429


class DatabaseUnavailable(DomainError):
    code = "database_unavailable"
    status = 503
    # Seconds a client should wait before trying again (the Retry-After header).
    retry_after = 5


# SQLSTATEs of a server that went away or refuses sessions: class 08 (connection
# exception) and the shutdowns of class 57 (not 57014, a cancelled statement).
_UNAVAILABLE_SQLSTATES = ("08", "57P01", "57P02", "57P03", "57P04")


def database_unavailable(exc: BaseException) -> DatabaseUnavailable | None:
    """The domain error for a database error that means the database cannot be reached
    (down, restarting, the connection cut, no pooled connection free in time), or None
    for any other error (a bug, a deadlock, a constraint), which stays a 500."""
    import psycopg
    from django.db import InterfaceError, OperationalError

    if not isinstance(exc, OperationalError | InterfaceError | psycopg.Error):
        return None
    if pool_timed_out(exc):
        return DatabaseUnavailable(
            "No database connection could be had in time: the database is down or "
            "overloaded. Try again shortly."
        )
    cause = exc if isinstance(exc, psycopg.Error) else exc.__cause__
    if isinstance(cause, psycopg.InterfaceError) or (
        isinstance(cause, psycopg.OperationalError)
        # psycopg raises a bare OperationalError, without a SQLSTATE, when it cannot
        # connect or the connection is lost mid-statement.
        and (cause.sqlstate is None or cause.sqlstate.startswith(_UNAVAILABLE_SQLSTATES))
    ):
        return DatabaseUnavailable("The database is unavailable. Try again shortly.")
    return None


def pool_timed_out(exc: BaseException) -> bool:
    """Whether a database error (Django's, or psycopg's under it) is a wait for a pooled
    connection that ran out: trying again at once would only wait as long again."""
    from psycopg_pool import PoolTimeout

    return isinstance(exc, PoolTimeout) or isinstance(exc.__cause__, PoolTimeout)
