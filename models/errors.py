"""The project's exceptions: one root, split into permanent and transient.

A worker retries only :class:`TransientError`; every other error of a job is
permanent and fails it at once with its message.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line, or its type when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class AdpaError(Exception):
    """Root of every error this project raises on purpose."""

    #: Short machine-readable name written to job_logs and the job's last error.
    kind = "error"


class SettingsError(AdpaError):
    """Raised when a setting has a value the system cannot run with."""

    kind = "settings"

    def __init__(self, variable: str | None, message: str) -> None:
        self.variable = variable
        self.message = message
        text = f"invalid setting {variable}: {message}" if variable else message
        super().__init__(text)


class SchemaOutOfDate(AdpaError):
    """Raised when the database's schema revision is not the code's."""

    kind = "schema"

    def __init__(self, current: str | None, head: str | None) -> None:
        self.current = current
        self.head = head
        found = f"revision {current}" if current else "no schema (an empty database)"
        super().__init__(
            f"the database has {found}; this version needs revision {head}: "
            "run 'adpa db upgrade'"
        )


class PermanentError(AdpaError):
    """A job error that no retry can fix; the job fails at once."""

    kind = "permanent"


class TransientError(AdpaError):
    """A job error caused by something outside the job; it is retried."""

    kind = "transient"


class TemplateNotFound(PermanentError):
    """Raised when a job or a submission names a template that does not exist."""

    kind = "unknown_template"

    def __init__(self, name: str, *, where: str = "") -> None:
        self.name = name
        super().__init__(f"{where}unknown template {name!r}")


class InvalidInput(PermanentError):
    """Raised when a job's input is not a JSON object or is too large."""

    kind = "invalid_input"


class TemplateError(PermanentError):
    """Raised when a template fails to compile or to render."""

    kind = "template_error"


class MissingVariable(TemplateError):
    """Raised when a template uses a variable the input does not define."""

    kind = "missing_variable"


class SandboxViolation(TemplateError):
    """Raised when a template tries something the sandbox forbids."""

    kind = "sandbox_violation"


class OutputTooLarge(PermanentError):
    """Raised when a render produces more than the allowed output size."""

    kind = "output_too_large"


class RenderTimeout(PermanentError):
    """Raised when a render runs past its time limit."""

    kind = "render_timeout"


class InternalError(PermanentError):
    """Raised in place of an unexpected exception while a job ran."""

    kind = "internal_error"


class StorageError(TransientError):
    """Raised when a document cannot be written to the storage root."""

    kind = "storage_error"


class UnsafePath(PermanentError):
    """Raised when a document path would leave the storage root."""

    kind = "unsafe_path"


class AuthenticationError(AdpaError):
    """Raised when an API key is unknown, malformed or revoked."""

    kind = "authentication"


class InvalidValue(AdpaError):
    """Raised when a name, address or password given for an account is unusable."""

    kind = "invalid_value"


class NotFound(AdpaError):
    """Raised when a job, user or key asked for does not exist."""

    kind = "not_found"


class Conflict(AdpaError):
    """Raised when a row would break a uniqueness rule (a name already taken)."""

    kind = "conflict"
