"""The one error hierarchy and the one message format.

Every error cbatch reports reads ``cbatch: <subject>: <problem>: <value>`` on a single line, optionally
followed by `` (<hint>)``. Users find these lines in their job's .e file, admins in the journal, so the
message must stand alone: say what is wrong, the offending value, and what is allowed.

Stdlib only: the job starter imports this module.
"""

from __future__ import annotations

# Exit statuses cbatch itself uses when the job script never ran, borrowed from `docker run` so that
# they do not collide with the common script statuses 0..2: 125 = cbatch or the engine failed,
# 126 = the command could not be invoked, 127 = the command (shell, interpreter) was not found.
EXIT_CBATCH = 125
EXIT_CANNOT_INVOKE = 126
EXIT_NOT_FOUND = 127


def _clean(text: object) -> str:
    """One line, printable: a hostile value (NUL, newlines, escapes) must not forge further lines."""
    out = []
    for ch in str(text):
        if ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif not ch.isprintable():
            out.append("\\x%02x" % ord(ch) if ord(ch) < 0x100 else "\\u%04x" % ord(ch))
        else:
            out.append(ch)
    line = "".join(out)
    return line if len(line) <= 400 else line[:397] + "..."


class CbatchError(Exception):
    """Base of every error cbatch raises on purpose.

    ``subject`` names the thing at fault (``image``, ``/etc/cbatch/cbatch.yaml: queues.batch.images``,
    ``directive line 3``), ``problem`` what is wrong with it, ``value`` the offending value, and ``hint``
    what is allowed or what to do. ``exit_code`` is the status a front end exits with.
    """

    exit_code = EXIT_CBATCH

    def __init__(self, subject: str, problem: str, value: object = None, hint: str | None = None):
        self.subject = subject
        self.problem = problem
        self.value = value
        self.hint = hint
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """The single-line message, already sanitised."""
        parts = ["cbatch", _clean(self.subject), _clean(self.problem)]
        if self.value is not None:
            parts.append(_clean(self.value))
        line = ": ".join(parts)
        if self.hint:
            line += " (" + _clean(self.hint) + ")"
        return line

    def __str__(self) -> str:
        return self.message

    def to_wire(self) -> dict:
        """A JSON-safe form for the daemon protocol; :func:`from_wire` rebuilds it on the client."""
        return {"class": type(self).__name__, "subject": self.subject, "problem": self.problem,
                "value": None if self.value is None else str(self.value), "hint": self.hint,
                "exit_code": self.exit_code}


class ConfigError(CbatchError):
    """The site config is unreadable, unsafe or invalid. The subject is ``<file>: <key path>``."""

    def __init__(self, path: str, key: str, problem: str, value: object = None, hint: str | None = None):
        self.path = path
        self.key = key
        super().__init__(f"{path}: {key}" if key else path, problem, value, hint)


class DirectiveError(CbatchError):
    """A ``#CBATCH`` line (or a ``cbatch run`` option) is malformed or unknown."""


class PolicyError(CbatchError):
    """The request is well-formed but the site policy refuses it (image, mount, network, uid 0...)."""


class EngineError(CbatchError):
    """The container engine is unreachable or failed (pull, create, start, wait)."""


class DaemonError(CbatchError):
    """cbatchd is unreachable, or the conversation with it broke (protocol, version, size)."""


class AccessDenied(CbatchError):
    """The peer is not allowed to do this (wrong uid, not in the job, not root)."""


class JobError(CbatchError):
    """The job itself could not run as asked (script vanished, shell missing, out of memory)."""


_CLASSES = {cls.__name__: cls for cls in
            (CbatchError, ConfigError, DirectiveError, PolicyError, EngineError, DaemonError, AccessDenied,
             JobError)}


def from_wire(data: dict) -> CbatchError:
    """Rebuild an error sent by :meth:`CbatchError.to_wire` (unknown classes become the base class)."""
    cls = _CLASSES.get(str(data.get("class")), CbatchError)
    err = CbatchError.__new__(cls)
    CbatchError.__init__(err, str(data.get("subject", "daemon")), str(data.get("problem", "failed")),
                         data.get("value"), data.get("hint"))
    code = data.get("exit_code")
    if isinstance(code, int) and 0 < code < 256:
        err.exit_code = code
    return err
