"""The one place a secret (an HF or GitHub token) is read from its environment variable, and the
one place that knows every form it can take in text, so that no output can carry it.

`read(VAR)` strips surrounding whitespace (`$(cat token)` ends in a newline), refuses any other
control character with a one-line bad-input error naming the variable (never the value), and
registers the value: `redact(text)` then replaces every representation of every value read in
this process (raw, repr, JSON-escaped, URL-encoded, HTML- and XML-escaped, the Authorization
header) wherever text leaves provision: the console, the JSON-lines logs, report.json,
report.html and junit.xml.

Not to be confused with the standard library's `secrets` (random tokens): this module is
`provisioner.secrets`.
"""

from __future__ import annotations

import html
import json
import os
import threading
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterable, Mapping

from provisioner.errors import UsageError

REDACTED = "***"
MIN_LENGTH = 4              # shorter values would redact ordinary words; no real token is this short


def _control(ch: str) -> bool:
    # Cc: C0, DEL, C1; Zl/Zp: U+2028/U+2029, which break a line as surely as a newline.
    return unicodedata.category(ch) in ("Cc", "Zl", "Zp")


def read(var: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The secret in `$var`, stripped; None when unset or blank. A control character inside the
    value is bad input: an HTTP header cannot carry it, and it is the sign of a pasted mistake."""
    raw = (os.environ if environ is None else environ).get(var)
    value = (raw or "").strip()
    if not value:
        return None
    bad = next((ch for ch in value if _control(ch)), None)
    if bad is not None:
        raise UsageError(f"${var} holds a control character ({_name(bad)}) inside the token; "
                         f"set it to the token alone (e.g. export {var}=\"$(tr -d '[:space:]' < FILE)\")")
    register(value)
    return value


def _name(ch: str) -> str:
    return f"U+{ord(ch):04X}"


_ENCODINGS: tuple[Callable[[str], str], ...] = (
    lambda s: s,
    lambda s: repr(s)[1:-1],                                  # a Python message quoting it
    lambda s: repr(s.encode("utf-8"))[2:-1],                  # ... as bytes (http.client's errors)
    lambda s: json.dumps(s)[1:-1],                            # JSON: a log record, report.json
    lambda s: json.dumps(s, ensure_ascii=False)[1:-1],
    lambda s: urllib.parse.quote(s, safe=""),                 # a URL's query or path
    urllib.parse.quote,
    urllib.parse.quote_plus,
    lambda s: html.escape(s, quote=True),                     # HTML
    lambda s: html.escape(s, quote=False),
    # XML as junit.xml (ElementTree) and report.html (Jinja's autoescape) write it: xml.sax.saxutils'
    # escape, without its import (it pulls urllib.request in, 20 ms of every run)
    lambda s: html.escape(s, quote=False).replace('"', "&quot;"),
    lambda s: html.escape(s, quote=False).replace('"', "&#34;").replace("'", "&#39;"),
)


def forms(secret: str) -> frozenset[str]:
    """Every way `secret` can appear in text provision writes: raw, Python repr (str and bytes),
    JSON-escaped (ASCII or not), URL-encoded (path and form), HTML- and XML-escaped, each of
    those escaped once more (the JSON of a repr, the HTML of a JSON), and the Authorization
    header that carries it."""
    out = {outer(inner(secret)) for inner in _ENCODINGS for outer in _ENCODINGS}
    out |= {f"Bearer {secret}"}
    return frozenset(f for f in out if len(f) >= MIN_LENGTH)


class Redactor:
    """Replaces every form of the secrets it knows, longest first (a form may contain another)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._forms: tuple[str, ...] = ()
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str | None) -> None:
        if not secret or len(secret) < MIN_LENGTH:
            return
        with self._lock:
            self._forms = tuple(sorted(set(self._forms) | forms(secret), key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for form in self._forms:
            if form in text:
                text = text.replace(form, REDACTED)
        return text


_known = Redactor()


def register(secret: str | None) -> None:
    """Make a secret known to `redact` (read() does this for every value it returns)."""
    _known.add(secret)


def redact(text: str) -> str:
    """`text` with every form of every secret this process has read replaced by ***."""
    return _known(text)


_become_password: list[str] = []


def give_become_password(value: str) -> None:
    """The become password -K/--ask-become-pass read (a prompt, or stdin's first line): used for
    every host that becomes, and redacted like every other secret."""
    value = value.rstrip("\r\n")
    if any(_control(ch) for ch in value):
        raise UsageError("the become password holds a control character; give it alone on one line")
    register(value)
    _become_password[:] = [value]


def become_password(var: str | None) -> str | None:
    """The password sudo gets: the one -K gave, else the variable the inventory names
    (provision_become_password_env), else None (sudo must not ask: NOPASSWD)."""
    if _become_password:
        return _become_password[0]
    return read(var) if var else None
