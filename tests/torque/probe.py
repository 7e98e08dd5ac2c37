"""A probe hook: records what the process pbs_mom started looks like (argv, ids, session, stdin, descriptors,
umask, cwd, environment, limits, parent) as one JSON file, then execs the real hook (or, for a starter without
one, its own argv[1:], as a plain shell would be run). The same text runs under the real pbs_mom and under
cbatch's emulator, so the two can be compared record by record."""

from __future__ import annotations

import glob
import json
import os
from typing import Dict, List, Optional

PROBE = r'''#!/usr/bin/python3 -I
import json, os, resource, sys
OUT, REAL, KIND = {out!r}, {real!r}, {kind!r}
def link(n):
    try:
        return os.readlink("/proc/self/fd/%d" % n)
    except OSError:
        return None
fds = {{}}
for n in sorted(int(x) for x in os.listdir("/proc/self/fd")):
    target = link(n)
    if target is not None:
        fds[n] = target
mask = os.umask(0); os.umask(mask)
try:
    parent = open("/proc/%d/comm" % os.getppid()).read().strip()
except OSError:
    parent = None
rec = dict(kind=KIND, argv=sys.argv, resuid=os.getresuid(), resgid=os.getresgid(), groups=sorted(os.getgroups()),
           pid=os.getpid(), ppid=os.getppid(), pgid=os.getpgid(0), sid=os.getsid(0), parent=parent,
           stdin_tty=os.isatty(0), fds=fds, umask=mask, cwd=os.getcwd(), env=dict(os.environ),
           rlimits={{n: resource.getrlimit(getattr(resource, n)) for n in
                    ("RLIMIT_DATA", "RLIMIT_RSS", "RLIMIT_NOFILE", "RLIMIT_CORE", "RLIMIT_AS")}})
try:
    rec["tcpgrp"] = os.tcgetpgrp(0)
except OSError:
    rec["tcpgrp"] = None
job = os.environ.get("PBS_JOBID") or (sys.argv[1] if KIND != "starter" and len(sys.argv) > 1 else "nojob")
path = os.path.join(OUT, "%s.%s.%d.json" % (KIND, job.replace("/", "_"), os.getpid()))
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
os.write(fd, json.dumps(rec).encode())
os.close(fd)
if REAL:
    os.execv(REAL, [REAL] + sys.argv[1:])
if KIND == "starter":
    os.execv(sys.argv[1], sys.argv[1:])
sys.exit(0)
'''


def text(out: str, kind: str, real: Optional[str]) -> str:
    """The probe for ``kind`` (starter, prologue, epilogue) writing into ``out``, then exec'ing ``real``."""
    return PROBE.format(out=out, real=real, kind=kind)


def records(out: str, kind: str, job_id: Optional[str] = None) -> List[Dict]:
    """The records of ``kind`` (for ``job_id``), oldest first."""
    pattern = os.path.join(out, f"{kind}.{job_id or '*'}.*.json")
    found = []
    for path in glob.glob(pattern):
        with open(path) as fh:
            found.append((os.stat(path).st_mtime_ns, json.load(fh)))
    return [rec for _, rec in sorted(found, key=lambda item: item[0])]
