"""cbatch's benchmark suite (issue #6): ``scripts/bench`` runs it all and writes ``bench/results.json`` and
``bench/results.md``.

Every number is measured in the same run against baselines on the same machine: native (the shell runs the
script, as pbs_mom does without a job starter), ``docker run`` with the flags cbatch uses, and ``runc run``
on the same root filesystem. Jobs are driven through the one pbs_mom emulator, :class:`cbatch.emulator.local.Mom`;
the probe inside jobs is the static ``benchtool`` (``bench/benchtool.c``), at the same path on the host and
in the bench image, so native and container runs execute the very same binary.

Modules: :mod:`bench.env` (set-up: probe, user, image, daemon, moms), :mod:`bench.jobs` (scripts, running
jobs, concurrency), :mod:`bench.stats` (medians and ranges), one module per benchmark (``latency``,
``throughput``, ``footprint``, ``output``, ``overhead``, ``clicalls``, ``scaling``), :mod:`bench.modes` (which
engines and clients are measured, and why one is not available), :mod:`bench.timing` (``CBATCH_TIMING=1``
log lines), :mod:`bench.report` and :mod:`bench.reportmd` (results files), :mod:`bench.plot` (scaling.svg).
"""

import os

# Host path == path in the bench image (rebuilt when it differs); CBATCH_BENCH_TOOL moves it, e.g. out of the
# shared /opt/cbatch.
TOOL = os.environ.get("CBATCH_BENCH_TOOL", "/opt/cbatch/bench/benchtool")
IMAGE = "cbatch-bench/busybox:1"
USER = "cbt-bench"                          # shell /bin/sh (the image has no bash), in the docker group
