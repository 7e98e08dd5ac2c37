"""``#CBATCH`` directives in a job script's leading comment block, and the same options for ``cbatch run``.

The rule is qsub's rule for ``#PBS``: directives are read from the first lines of the script - the shebang,
blank lines and comments - and the first line that is anything else ends the block; a ``#CBATCH`` after it
is an ordinary comment. Lines are tokenised with :mod:`shlex` (quotes work, nothing is ever evaluated).

The script is hostile input read by a root daemon, hence the hard limits: only the first 1 MiB is looked
at, a directive line may be at most 4096 bytes, at most 256 directives, no NUL bytes in the comment block,
and directive text must be valid UTF-8 (other comment lines may be in any encoding).

Stdlib only: the job starter imports this module.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from cbatch.core.errors import DirectiveError

PREFIX = "#CBATCH"
MAX_SCAN_BYTES = 1 << 20
MAX_LINE_BYTES = 4096
MAX_DIRECTIVES = 256
NATIVE = "native"

SINGLE = ("image", "workdir", "network")        # may be given once
MULTI = ("mount", "env")                        # may repeat
FLAGS = ("readonly", "entrypoint")              # take no value
OPTIONS_HINT = "options: --image=REF, --mount=SRC:DST[:ro|rw], --env=KEY=VALUE, --workdir=DIR, " \
               "--network=NAME, --readonly, --entrypoint"

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_NETWORK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")

# The distribution reference grammar (github.com/distribution/reference, regexp.go):
#   reference := name [ ":" tag ] [ "@" digest ]
#   name      := [domain '/'] path-component ['/' path-component]*
#   domain    := host [':' port-number]   (host: dns labels separated by '.', or an [IPv6] literal)
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = _ALNUM + r"(?:" + _SEPARATOR + _ALNUM + r")*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = _DOMAIN_COMPONENT + r"(?:\." + _DOMAIN_COMPONENT + r")*"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_DOMAIN = r"(?:" + _DOMAIN_NAME + r"|" + _IPV6 + r")(?::[0-9]+)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_NAME = r"(?:" + _DOMAIN + r"/)?" + _PATH_COMPONENT + r"(?:/" + _PATH_COMPONENT + r")*"
REFERENCE = re.compile(r"^(" + _NAME + r")(?::(" + _TAG + r"))?(?:@(" + _DIGEST + r"))?\Z")
_SHA256 = re.compile(r"^sha256:[0-9a-f]{64}\Z")
MAX_NAME = 255


def valid_reference(ref: str) -> bool:
    """True if ``ref`` is a valid Docker image reference (``registry:5000/a/b:tag@sha256:<64 hex>``)."""
    if not isinstance(ref, str) or len(ref) > 1024:
        return False
    m = REFERENCE.match(ref)
    if not m:
        return False
    name, _tag, digest = m.groups()
    if len(name) > MAX_NAME:
        return False
    # The grammar allows any registered algorithm; Docker only knows sha256 and checks its length.
    return digest is None or bool(_SHA256.match(digest))


@dataclass(frozen=True)
class UserMount:
    """A bind mount the user asked for. ``line`` is the script line (0 for ``cbatch run`` options)."""

    source: str
    target: str
    read_only: bool
    line: int


@dataclass(frozen=True)
class Directives:
    """The parsed options. Everything defaults to "not asked for"; the policy fills in the site's defaults."""

    image: Optional[str] = None
    mounts: Tuple[UserMount, ...] = ()
    env: Tuple[Tuple[str, str], ...] = ()
    workdir: Optional[str] = None
    network: Optional[str] = None
    readonly: bool = False
    entrypoint: bool = False


def parse_mount(spec: str) -> Tuple[str, str, Optional[bool]]:
    """Split ``SRC[:DST][:ro|rw]`` into (source, target, read_only or None). Raises ValueError.

    Paths must be absolute; ``DST`` defaults to ``SRC``. Paths containing ``:`` cannot be expressed.
    """
    parts = spec.split(":")
    mode: Optional[bool] = None
    if len(parts) >= 2 and parts[-1] in ("ro", "rw"):
        mode = parts.pop() == "ro"
    if len(parts) == 1:
        parts.append(parts[0])
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise ValueError("expected SRC:DST[:ro|rw]")
    src, dst = parts
    if not src.startswith("/") or not dst.startswith("/"):
        raise ValueError("mount paths must be absolute")
    return src, dst, mode


class _Builder:
    """Accumulates options across lines, remembering where single-valued ones were first given."""

    def __init__(self, where) -> None:
        self.where = where                  # line number -> subject text
        self.single: dict = {}
        self.first_line: dict = {}
        self.mounts: List[UserMount] = []
        self.env: List[Tuple[str, str]] = []
        self.flags = {f: False for f in FLAGS}
        self.count = 0

    def error(self, line: int, problem: str, value: object = None, hint: Optional[str] = None):
        return DirectiveError(self.where(line), problem, value, hint)

    def add(self, line: int, name: str, value: Optional[str], raw: str) -> None:
        self.count += 1
        if self.count > MAX_DIRECTIVES:
            raise self.error(line, "too many directives", self.count, f"at most {MAX_DIRECTIVES}")
        if name in FLAGS:
            if value is not None:
                raise self.error(line, f"--{name} takes no value", raw, OPTIONS_HINT)
            self.flags[name] = True
            return
        if value is None:
            raise self.error(line, f"--{name} needs a value", raw, OPTIONS_HINT)
        if value == "":
            raise self.error(line, f"--{name} has an empty value", raw, OPTIONS_HINT)
        if name in SINGLE:
            if name in self.single:
                first = self.first_line[name]
                raise self.error(line, f"--{name} given twice", raw,
                                 f"first given on line {first}; give it once" if first else "give it once")
            self._check_single(line, name, value, raw)
            self.single[name] = value
            self.first_line[name] = line
        elif name == "mount":
            try:
                src, dst, ro = parse_mount(value)
            except ValueError as exc:
                raise self.error(line, "malformed --mount", value,
                                 "SRC:DST[:ro|rw] with absolute paths") from exc
            self.mounts.append(UserMount(source=src, target=dst, read_only=bool(ro), line=line))
        elif name == "env":
            key, eq, val = value.partition("=")
            if not eq or not _ENV_KEY.match(key):
                raise self.error(line, "malformed --env", value, "KEY=VALUE with KEY made of A-Z, a-z, 0-9, _")
            self.env.append((key, val))

    def _check_single(self, line: int, name: str, value: str, raw: str) -> None:
        if name == "workdir" and not value.startswith("/"):
            raise self.error(line, "--workdir is not an absolute path", value, "give an absolute directory")
        if name == "network" and not _NETWORK.match(value):
            raise self.error(line, "malformed --network", value, "a Docker network name")
        if name == "image" and value != NATIVE and not valid_reference(value):
            raise self.error(line, "not a valid image reference", value,
                             "[registry[:port]/]name[:tag][@sha256:<64 hex>], lowercase name, or native")

    def parse_tokens(self, line: int, tokens: Sequence[str]) -> None:
        i = 0
        while i < len(tokens):
            raw = tokens[i]
            i += 1
            if not raw.startswith("--") or len(raw) == 2:
                hint = OPTIONS_HINT + ("; trailing comments are not supported" if raw.startswith("#") else "")
                raise self.error(line, "unexpected argument", raw, hint)
            name, eq, value = raw[2:].partition("=")
            if name not in SINGLE + MULTI + FLAGS:
                raise self.error(line, "unknown option", "--" + name, OPTIONS_HINT)
            if not eq:
                value = None
                if name not in FLAGS and i < len(tokens) and not tokens[i].startswith("--"):
                    value = tokens[i]
                    i += 1
            self.add(line, name, value, raw if eq or value is None else f"{raw} {value}")

    def build(self) -> Directives:
        return Directives(image=self.single.get("image"), mounts=tuple(self.mounts), env=tuple(self.env),
                          workdir=self.single.get("workdir"), network=self.single.get("network"),
                          readonly=self.flags["readonly"], entrypoint=self.flags["entrypoint"])


def _leading_block(data: bytes):
    """Yield (line number, raw line bytes) of the leading comment block, within the scan limit."""
    truncated = len(data) > MAX_SCAN_BYTES
    data = data[:MAX_SCAN_BYTES]
    lines = data.split(b"\n")
    if truncated and len(lines) > 1:
        lines.pop()                         # cut off mid-line by the scan limit: not a line we read
    for number, raw in enumerate(lines, start=1):
        stripped = raw.strip(b" \t\r\f\v")
        if stripped and not stripped.startswith(b"#"):
            return
        yield number, raw


def parse_script(data: bytes) -> Directives:
    """Parse the ``#CBATCH`` directives of a job script (raw bytes). Raises DirectiveError.

    Errors name the line: ``cbatch: directive line 3: unknown option: --imgae (options: ...)``.
    """
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    b = _Builder(lambda n: f"directive line {n}")
    for number, raw in _leading_block(data):
        if b"\0" in raw:
            raise b.error(number, "NUL byte in the script's comment block", None,
                          "job scripts must be text")
        stripped = raw.strip(b" \t\r\f\v")
        if not (stripped.startswith(PREFIX.encode()) and
                (len(stripped) == len(PREFIX) or stripped[len(PREFIX):len(PREFIX) + 1] in (b" ", b"\t"))):
            continue
        if len(raw) > MAX_LINE_BYTES:
            raise b.error(number, "directive line too long", f"{len(raw)} bytes", f"at most {MAX_LINE_BYTES}")
        try:
            text = stripped[len(PREFIX):].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise b.error(number, "directive is not valid UTF-8",
                          stripped.decode("utf-8", "backslashreplace"), "write directives in UTF-8") from exc
        try:
            tokens = shlex.split(text)
        except ValueError as exc:
            raise b.error(number, "malformed directive", text.strip(), f"{exc}; quote like a shell") from exc
        b.parse_tokens(number, tokens)
    return b.build()


def parse_options(args: Sequence[str], source: str = "cbatch run") -> Directives:
    """Parse the same options given as command-line arguments (``cbatch run --image=X ...``).

    Errors have the subject ``source`` (``cbatch: cbatch run: unknown option: --foo (...)``).
    """
    b = _Builder(lambda n: source)
    for arg in args:
        if "\0" in arg or len(arg.encode("utf-8", "surrogateescape")) > MAX_LINE_BYTES:
            raise b.error(0, "invalid argument", arg, f"no NUL, at most {MAX_LINE_BYTES} bytes")
    b.parse_tokens(0, list(args))
    return b.build()
