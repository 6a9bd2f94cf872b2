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
