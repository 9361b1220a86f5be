"""Passwords of the study's store URLs (``storage``, ``tracking.uri``): given by reference,
resolved only where a connection opens, shown as ``***``.

A URL names its password by reference, ``postgresql://p3b:${P3B_DB_PASSWORD}@db:5432/optuna``.
The study file, the study folder's copy and every pickled study config hold that text;
:func:`resolve_url` puts the environment variable's value in place of each ``${NAME}``
(percent-encoded, so the value may hold any character) just before a connection opens.
:func:`lift_password` takes a password written into a URL out of it (the loader keeps it in
the environment under a reference of its own); :func:`redact_secrets` shows every URL's
password in a text as ``***``.

A URL's password is what lies between the ``:`` after its user name and the URL's last ``@``,
so a password written with a raw ``@``, ``:``, ``/`` or ``%`` is found whole; within a text, a
URL ends at white space or a quote (a password given by reference is percent-encoded when
resolved, so a resolved URL holds neither).
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from urllib.parse import quote, unquote

#: ``${NAME}``: the value of environment variable NAME.
REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
_IN_URL = re.compile(_SCHEME + r"[^/:@]*:(?P<password>.+)@", re.DOTALL)
_IN_TEXT = re.compile(r"(?P<head>" + _SCHEME + r"[^\s'\"/:@]*:)(?P<password>[^\s'\"]+)@")
HIDDEN = "***"


class MissingVariable(ValueError):
    """A URL of setting ``field`` names environment variable ``name``, which is not set."""

    def __init__(self, field: str, name: str):
        super().__init__(f"{field}: environment variable {name} is not set: export it "
                         f"(the URL's ${{{name}}} stands for its value)")
        self.field, self.name = field, name


def references(url: str) -> list[str]:
    """Names of the environment variables ``url`` refers to, in order, each once."""
    return list(dict.fromkeys(REFERENCE.findall(url)))


def resolve_url(url: str, field: str, environ: Mapping[str, str] = os.environ) -> str:
    """``url`` with every ``${NAME}`` replaced by ``environ[NAME]``, percent-encoded; raises
    :class:`MissingVariable` naming ``field`` (the setting) for a variable that is not set."""
    missing = [name for name in references(url) if name not in environ]
    if missing:
        raise MissingVariable(field, missing[0])
    return REFERENCE.sub(lambda match: quote(environ[match.group(1)], safe=""), url)


def lift_password(url: str, name: str) -> tuple[str, str | None]:
    """``url`` with its written password replaced by ``${name}``, and that password
    (percent-decoded); ``(url, None)`` when it has no password or gives it by reference."""
    match = _IN_URL.match(url)
    if match is None or "${" in match["password"]:
        return url, None
    start, end = match.span("password")
    return f"{url[:start]}${{{name}}}{url[end:]}", unquote(match["password"])


def redact_secrets(text: str) -> str:
    """``text`` (a URL, a log line, an error message) with every URL's password as ``***``."""
    return _IN_TEXT.sub(lambda match: f"{match['head']}{HIDDEN}@", text)


__all__ = ["HIDDEN", "REFERENCE", "MissingVariable", "lift_password", "redact_secrets", "references", "resolve_url"]
