"""One-line error messages: the first line of an exception's text."""
from __future__ import annotations


def first_line(error: BaseException) -> str:
    """The first non-empty line of ``str(error)``, or the exception's type name when it has no text."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


class RegistryError(RuntimeError):
    """Registering an exported model failed; the message is one line naming the option and the fix."""
