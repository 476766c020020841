"""Domain errors: what is wrong with a request, in the terms of the service. The API maps each kind to its
HTTP status in one place (app.errors); nothing below the routes speaks HTTP."""


class DomainError(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


def no_such(kind: str, id_: str) -> str:
    return f"no {kind} with id {id_!r}"


class Invalid(DomainError):
    """The request names something that does not fit: a missing id it refers to, a size beyond a limit."""


class NotFound(DomainError):
    """The resource the request is about does not exist."""

    @classmethod
    def of(cls, kind: str, id_: str) -> "NotFound":
        return cls(no_such(kind, id_), param="id")


class Conflict(DomainError):
    """The resource's state forbids the change: in use, already ended, already there."""


class Gone(DomainError):
    """The resource's row exists but its files are missing from the data dir."""


class Unavailable(DomainError):
    """A service the request needs (the job queue) does not answer."""
