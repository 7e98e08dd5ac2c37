"""Benchmark 1: job start latency, and where cbatch's part of it goes.

Interval: from the exec of the job starter (the stamping interpreter writes ``stamp <CLOCK_REALTIME>`` into
the job's stdout, then execs the starter) to the first instruction of the job script (``benchtool stamp``,
the script's first command, in the container or natively). Modes, interleaved round-robin so that noise
from other users of the machine hits all of them alike, after one unrecorded warm-up each:

- ``native``: the shell runs the script (pbs_mom without a job starter);
- ``cbatch_<engine>_<client>`` (every one :mod:`bench.modes` found available): the real starter (Python or
  the C client) -> cbatchd (registry, policy, engine create + start: Docker, or runc for ``direct``) ->
  init -> cbatch-exec -> shell -> script;
- ``docker_run``: the docker CLI with cbatch's flags (``bench/starters/docker-run``);
- ``runc``: ``runc run`` of the same root filesystem (:mod:`bench.runc`), no engine at all.

For the mom-driven modes two more intervals are recorded: the exit path (the script's only instruction ->
the mom reaps the starter: container exit noticed, reported, removed) and the whole job's wall time (submit
to the mom's end of the job: prologue, start, run, exit, epilogue, clean-up).

``timing_ms`` is the breakdown of the direct path: the daemon runs with ``CBATCH_TIMING=1`` and the direct
engine logs ``timing <step> <ms>`` per step of each start (:mod:`bench.timing` parses the log written during
these jobs). The daemon also runs with timing probes (:mod:`bench.tracedaemon`): ``daemon_trace_ms`` is what
each step of its start, register and unregister handling took during these jobs (the warm-up job included).

The profile splits cbatch's interval (of ``bench.cbatch``, the cbatch mode the single-mode benchmarks use)
into parts measured separately in the same run: the starter's Python start-up (the real shim run with no
arguments: interpreter + imports + exit), the policy decision as the daemon makes it (``policy.decide`` with
the forking ``resolve_as_user``), and the engine's create + start of an equivalent container through
:class:`cbatch.engines.docker.Engine` (plus the time from that call to the container's first instruction, and
the removal). The rest is the daemon's request handling. The root prologue and epilogue shims (register /
unregister of a job with no container) are timed the same way: they are not in the start interval but are in
every job's wall time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import IMAGE, TOOL
from bench import jobs, timing
from bench.env import ENGINE_URL, HELPER
from bench.runc import Bundle
from bench.stats import summary


def run(bench, reps: int) -> dict:
    """Measure every mode ``reps`` times; return per-mode summaries (ms) and the cbatch profile."""
    text = jobs.script("stamp")
    bundle = Bundle(bench.run_dir, bench.user, text)
    bench.daemon.trace()                        # from here on the daemon's probes see only these jobs
    log_at = bench.daemon.log_size()
    MOM_MODES = bench.mode_names
    lat = {m: [] for m in MOM_MODES + ("runc",)}
    wall = {m: [] for m in MOM_MODES}
    done = {m: [] for m in MOM_MODES}
    offset = time.time() - time.monotonic()     # Result.ended_at is monotonic; stamps are CLOCK_REALTIME
    try:
        for i in range(reps + 1):
            for mode in MOM_MODES:
                result, elapsed = jobs.run_one(bench.mom(mode, stamped=True), text)
                t = jobs.stamps(result.stdout)
                if len(t) != 2:
                    raise jobs.JobFailed(f"{mode}: expected 2 stamps, got {result.stdout[:200]!r}")
                if i:
                    lat[mode].append((t[1] - t[0]) * 1000)
                    wall[mode].append(elapsed * 1000)
                    done[mode].append((result.ended_at + offset - t[1]) * 1000)
            seconds, _ = bundle.run()
            if i:
                lat["runc"].append(seconds * 1000)
    finally:
        bundle.close()
    daemon = {k: summary(v, 2) for k, v in sorted(bench.daemon.trace().items())}
    return {"reps": reps,
            "latency_ms": {m: summary(v, 1) for m, v in lat.items()},
            "job_wall_ms": {m: summary(v, 1) for m, v in wall.items()},
            "exit_ms": {m: summary(v, 1) for m, v in done.items()},
            "daemon_trace_ms": daemon,
            "timing_ms": timing.breakdown(bench.daemon.log(log_at)),
            "direct_fallbacks": timing.fallbacks(bench.daemon.log(log_at)),
            "profile": profile(bench, max(5, reps // 2))}


def _timed(fn, n: int) -> list:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def profile(bench, n: int) -> dict:
    """The parts of cbatch's start path (of the mode ``bench.cbatch``), each measured ``n`` times (ms
    summaries)."""
    shim = bench.mom("cbatch").starter
    python = sys.executable
    quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = {
        "python_bare": summary(_timed(lambda: subprocess.run([python, "-I", "-c", "pass"], **quiet), n), 1),
        "starter_startup": summary(_timed(lambda: subprocess.run([shim], **quiet), n), 1),
        "policy_decide": summary(_policy_times(bench, n), 2),
    }
    parts.update(_engine_times(bench, n))
    parts.update(_hook_times(bench, n))
    return parts


def _hook_times(bench, n: int) -> dict:
    """The installed prologue and epilogue shims, run as pbs_mom runs them, for a job with no container."""
    mom = bench.mom("cbatch")
    user = bench.user
    env = {"PATH": "/bin:/usr/bin", "LANG": "C.UTF-8"}
    pro, epi = [], []
    for i in range(n + 1):
        job_id = f"hook{i}-{os.getpid()}.{bench.host}"
        script = os.path.join(mom.jobs_dir, job_id + ".SC")
        args = [job_id, user.pw_name, user.pw_name, "bench", jobs.RESOURCES, "batch", ""]
        t0 = time.perf_counter()
        subprocess.run([mom.prologue, *args, script], env=env, cwd=mom.mom_priv, check=True,
                       stdin=subprocess.DEVNULL, capture_output=True)
        t1 = time.perf_counter()
        subprocess.run([mom.epilogue_path, job_id, user.pw_name, user.pw_name, "bench", str(os.getpid()),
                        jobs.RESOURCES, "cput=00:00:00", "batch", "", "0", script], env=env, cwd=mom.mom_priv,
                       check=True, stdin=subprocess.DEVNULL, capture_output=True)
        t2 = time.perf_counter()
        if i:
            pro.append((t1 - t0) * 1000)
            epi.append((t2 - t1) * 1000)
    return {"prologue_hook": summary(pro, 1), "epilogue_hook": summary(epi, 1)}


def _policy_times(bench, n: int) -> list:
    """``policy.decide`` for a job like the benchmark's, with the daemon's resolver (the job's paths resolved
    as the user in one child, :func:`cbatch.daemon.launch._resolver`)."""
    from cbatch.core import config as configmod
    from cbatch.core import policy
    from cbatch.core.directives import parse_script
    from cbatch.core.job import Identity, JobContext, Registration
    from cbatch.daemon.launch import _resolver

    user = bench.user
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        os.chmod(tmp, 0o755)
        script, nodefile = Path(tmp, "job.SC"), Path(tmp, "nodefile")
        script.write_bytes(jobs.script("stamp"))
        nodefile.write_text(bench.host + "\n")
        os.chown(script, user.pw_uid, user.pw_gid)
        cfg = configmod.load(str(bench.daemon.config_path))
        reg = Registration.from_prologue_argv(["1.bench", user.pw_name, user.pw_name, "bench", jobs.RESOURCES,
                                               "batch", "", str(script)])
        identity = Identity.lookup(user.pw_name)
        env = {"HOME": user.pw_dir, "PBS_NODEFILE": str(nodefile), "CBATCH_IMAGE": IMAGE, "PATH": "/bin"}

        def decide() -> None:
            directives = parse_script(script.read_bytes())
            job = JobContext.for_start(reg, identity, "/bin/sh", f"{script}\n", user.pw_dir, env)
            policy.decide(cfg, job, directives, _resolver(job))

        return _timed(decide, n)


def _engine_times(bench, n: int) -> dict:
    """Engine.start (create + start) of a container like a job's, its first instruction, and removal."""
    from cbatch.engines.docker import Engine, Stdio
    from cbatch.core.spec import ContainerSpec, Mount

    user = bench.user
    engine = Engine(ENGINE_URL)
    start, first, remove = [], [], []
    for i in range(n + 1):
        with tempfile.NamedTemporaryFile(dir="/var/tmp", prefix="cbatch-bench-") as out:
            os.chown(out.name, user.pw_uid, user.pw_gid)
            spec = ContainerSpec(
                name=f"{bench.daemon.instance}-probe-{i}", image=IMAGE, argv=(TOOL, "stamp"),
                uid=user.pw_uid, gid=user.pw_gid, groups=tuple(os.getgrouplist(user.pw_name, user.pw_gid)),
                workdir=user.pw_dir, env=(("HOME", user.pw_dir),),
                mounts=(Mount("/etc/passwd", "/etc/passwd"), Mount("/etc/group", "/etc/group"),
                        Mount(user.pw_dir, user.pw_dir, read_only=False)),
                pids_limit=256, cpus=1.0)
            t0 = time.time()
            cid = engine.start(spec, Stdio(stdout_path=out.name), bench.daemon.instance, HELPER)
            t1 = time.time()
            engine.wait(cid)
            t2 = time.perf_counter()
            engine.remove(cid)
            t3 = time.perf_counter()
            stamp = jobs.stamps(Path(out.name).read_bytes())
        if i:
            start.append((t1 - t0) * 1000)
            first.append((stamp[0] - t0) * 1000)
            remove.append((t3 - t2) * 1000)
    return {"engine_create_start": summary(start, 1), "engine_call_to_first_instruction": summary(first, 1),
            "engine_remove": summary(remove, 1)}
