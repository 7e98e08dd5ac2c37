"""qsub's reading of a job's options: its command line and the ``#PBS`` lines of the job script.

The one reader for everything in cbatch that must see a job "as qsub would" (the submit filter, ``cbatch
check``, ``cbatch local``). It follows TORQUE 6.1 ``qsub_functions.c``:

- The command line is parsed like glibc getopt with qsub's option string: clusters (``-Vq batch``),
  attached values (``-qbatch``), options after the script name (getopt permutes), ``--`` ends options.
- ``get_script`` reads directives from the leading block only: lines up to the first executable line (not
  blank, not a comment, not ``#!``, not starting with ``:``). The prefix is ``-C``, else ``PBS_DPREFIX``,
  else ``#PBS``; an empty prefix turns directives off. Leading blanks are allowed and a trailing ``\\``
  continues a directive on the next line.
- The command line overrides the script; within each, the last value wins. ``-l`` accumulates (one
  resource list, per resource the last value wins), ``-v`` lists accumulate, ``-V`` exports the whole
  submitting environment, ``-S`` is ``path[@host][,path[@host]...]`` of which the first path is taken.

Stdlib only and no I/O beyond the ``environ`` mapping it is given: the submit filter imports it on every
qsub.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

# qsub's getopt string (TORQUE 6.1 qsub_functions.c GETOPT_ARGS): letters followed by ':' take a value.
QSUB_OPTSTRING = "a:A:b:c:C:d:D:e:EfF:hIj:J:k:l:m:M:nN:o:p:P:q:r:S:t:T:u:v:Vw:W:Xxz-:"
DEFAULT_PREFIX = "#PBS"
MAX_SCAN_BYTES = 1 << 20          # qsub reads more, but no leading block is anywhere near this long

_VALUED = {c for c, nxt in zip(QSUB_OPTSTRING, QSUB_OPTSTRING[1:] + " ") if nxt == ":" and c != ":"}

Options = List[Tuple[str, str]]


@dataclass(frozen=True)
class QsubRequest:
    """What qsub would submit. ``queue`` is None when neither side named one and there is no default;
    ``resources`` are ``key=value`` items (one per resource, in first-seen order); ``shell`` is the ``-S``
    path (None: pbs_mom uses the user's login shell); ``options`` are all ``(letter, value)`` pairs, the
    script's first, for anything this type does not name."""

    queue: Optional[str] = None
    resources: Tuple[str, ...] = ()
    name: Optional[str] = None
    shell: Optional[str] = None
    variables: Dict[str, str] = field(default_factory=dict, hash=False)
    export_all: bool = False
    options: Tuple[Tuple[str, str], ...] = ()

    @property
    def resource_list(self) -> str:
        """The resources as Torque's comma-separated list (``""`` when none were asked for)."""
        return ",".join(self.resources)


def options(args: Sequence[str]) -> Options:
    """(letter, value) pairs in order, parsed like getopt (clusters ``-Vq batch``, ``-qbatch``, options after
    the script name because glibc getopt permutes); loose words (the script path) are skipped."""
    out: Options = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            continue
        j = 1
        while j < len(arg):
            letter = arg[j]
            j += 1
            if letter in _VALUED:
                if j < len(arg):
                    value = arg[j:]
                elif i < len(args):
                    value = args[i]
                    i += 1
                else:
                    value = ""
                out.append((letter, value))
                break
            out.append((letter, ""))
    return out


def _split(text: str) -> List[str]:
    try:
        return shlex.split(text, comments=False)
    except ValueError:            # an unmatched quote: qsub would complain itself; take plain words
        return text.split()


def script_options(script: bytes, prefix: str = DEFAULT_PREFIX) -> Options:
    """qsub's reading of the directive lines (``get_script``): up to the first executable line (not blank,
    not a comment, not ``#!``, not starting with ``:``), leading blanks allowed, ``\\`` continues."""
    out: Options = []
    if not prefix:
        return out
    # latin-1 maps every byte to one character: any encoding survives, and option letters are ASCII.
    lines = script[:MAX_SCAN_BYTES].decode("latin-1").split("\n")
    n = 0
    while n < len(lines):
        line = lines[n].rstrip("\r")
        n += 1
        if line.startswith(":") or line.startswith("#!"):
            continue
        stripped = line.lstrip()
        if stripped.startswith(prefix):
            body = stripped[len(prefix):]
            while body.endswith("\\") and n < len(lines):
                body = body[:-1] + lines[n].rstrip("\r")
                n += 1
            out.extend(options(_split(body)))
            continue
        if stripped and not stripped.startswith("#"):
            break
    return out


def queue_name(dest: str) -> Optional[str]:
    """``batch@server`` -> ``batch``; ``@server`` or empty -> None (the server's default queue)."""
    name = dest.split("@", 1)[0].strip()
    return name or None


def shell_path(value: str) -> Optional[str]:
    """``-S /bin/sh@node1,/bin/bash`` -> ``/bin/sh``: the first path of the list (None when empty)."""
    path = value.split(",", 1)[0].split("@", 1)[0].strip()
    return path or None


def variables(values: Sequence[str], export_all: bool, environ: Mapping[str, str]) -> Dict[str, str]:
    """The job variables qsub would set from ``-v`` lists (``A=1,B``: B from ``environ``) and ``-V``."""
    env = dict(environ) if export_all else {}
    for value in values:
        for item in value.split(","):
            key, eq, val = item.partition("=")
            key = key.strip()
            if not key:
                continue
            if eq:
                env[key] = val.strip().strip('"').strip("'")
            elif key in environ:
                env[key] = environ[key]
    return env


def _merge_resources(values: Sequence[str]) -> Tuple[str, ...]:
    """One item per resource name (case-insensitive), the last value winning, in first-seen order."""
    merged: Dict[str, str] = {}
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if item:
                merged[item.partition("=")[0].strip().lower()] = item
    return tuple(merged.values())


def read(script: bytes, qsub_args: Sequence[str] = (), environ: Optional[Mapping[str, str]] = None,
         default_queue: Optional[str] = None) -> QsubRequest:
    """The request qsub would make for ``script`` submitted with ``qsub_args`` (qsub's own arguments, the
    script path among them or not) from a shell whose environment is ``environ`` (default ``os.environ``)."""
    environ = os.environ if environ is None else environ
    cmdline = options(qsub_args)
    prefix = environ.get("PBS_DPREFIX") or DEFAULT_PREFIX
    for letter, value in cmdline:
        if letter == "C":
            prefix = value
    both = script_options(script, prefix) + cmdline      # the command line comes last, so it wins
    last: Dict[str, str] = {}
    for letter, value in both:
        last[letter] = value
    queue = queue_name(last["q"]) if "q" in last else None
    export_all = "V" in last
    return QsubRequest(
        queue=queue or default_queue,
        resources=_merge_resources([v for letter, v in both if letter == "l"]),
        name=last.get("N") or None,
        shell=shell_path(last.get("S", "")),
        variables=variables([v for letter, v in both if letter == "v"], export_all, environ),
        export_all=export_all, options=tuple(both))
