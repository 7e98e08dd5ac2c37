"""Job scripts and running jobs through the mom emulator, one at a time or many at a given concurrency.

Scripts are fixed templates: only the probe's path and integers are filled in. Every job is submitted as
the bench user with ``CBATCH_IMAGE`` (``qsub -v``) naming the bench image, which cbatch's policy and the
docker-run baseline both honour (the native baseline ignores it), and with ``nodes=1:ppn=1``.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, List, Optional, Tuple

from bench import IMAGE, TOOL, USER

RESOURCES = "nodes=1:ppn=1,walltime=01:00:00"
_HEAD = "#!/bin/sh\n#PBS -l nodes=1:ppn=1\n#CBATCH --image=" + IMAGE + "\n"
SCRIPTS = {
    "stamp": _HEAD + TOOL + " stamp\n",                  # its first instruction records the time
    "trivial": _HEAD + "echo hello\n",
    "sleep": _HEAD + "echo ready\nexec sleep {seconds}\n",
    "out": _HEAD + TOOL + " out {mib}\n",                 # MiB to stdout; its time on stderr
    "spin": _HEAD + TOOL + " spin {millions}\n",
    "write": _HEAD + TOOL + ' write "$HOME/bench-io.$PBS_JOBID" {mib}\n',
}


class JobFailed(RuntimeError):
    """A benchmark job did not exit 0; the message carries its status and stderr."""


def script(name: str, **numbers: int) -> bytes:
    """The named script with its integer parameters filled in."""
    return SCRIPTS[name].format(**{k: int(v) for k, v in numbers.items()}).encode()


def submit(mom, text: bytes):
    """Submit one job as the bench user to the mom's bench queue (one per engine: ``Bench.mom`` sets it);
    returns the :class:`cbatch.emulator.local.Job`."""
    return mom.submit(text, USER, queue=getattr(mom, "bench_queue", "batch"), resources=RESOURCES,
                      variables={"CBATCH_IMAGE": IMAGE}, name="bench")


def check(result) -> None:
    """Raise JobFailed unless the job exited 0."""
    if result.exit_status != 0:
        raise JobFailed(f"job {result.job_id} exited {result.exit_status}: "
                        f"{result.stderr.decode(errors='replace').strip()[-800:]}")


def run_one(mom, text: bytes, timeout: float = 600.0, settle: bool = False) -> Tuple[object, float]:
    """Run one job to the end; return (Result, seconds from submit to the mom's end of the job).

    ``settle``: first ``sync`` the host, so the write-back of an earlier job's data cannot slow this one.
    """
    if settle:
        os.sync()
    t0 = time.monotonic()
    result = submit(mom, text).wait(timeout)
    elapsed = time.monotonic() - t0
    check(result)
    return result, elapsed


def stamps(data: bytes) -> List[float]:
    """The ``stamp <seconds>`` values in job output, in order."""
    return [float(line.split()[1]) for line in data.decode(errors="replace").splitlines()
            if line.startswith("stamp ")]


def tagged(data: bytes, tag: str) -> List[List[str]]:
    """The fields after ``tag`` of every line starting with it (``spin``, ``write``, ``out``)."""
    return [line.split()[1:] for line in data.decode(errors="replace").splitlines()
            if line.startswith(tag + " ")]


def run_many(mom, text: bytes, count: int, concurrency: int,
             on_result: Optional[Callable[[object], None]] = None) -> Tuple[float, int]:
    """Run ``count`` jobs keeping ``concurrency`` in flight; return (seconds for all, failed jobs)."""
    lock = threading.Lock()
    left = [count]
    failed = [0]

    def worker() -> None:
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            result = submit(mom, text).wait(600)
            with lock:
                if result.exit_status != 0:
                    failed[0] += 1
                if on_result:
                    on_result(result)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - t0, failed[0]
