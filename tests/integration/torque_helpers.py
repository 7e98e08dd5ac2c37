"""Helpers for the Torque end-to-end tests (imported by conftest.py and the tests)."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Dict, List, Optional

# The direct engine's bundles of every test daemon (they use the default daemon.mount_dir).
DIRECT_BUNDLES = "/run/cbatch/direct"
RUNC_ROOT = DIRECT_BUNDLES + "/runc"


def direct_containers(labels: Dict[str, str]) -> List[str]:
    """Ids of the direct engine's containers with ``labels`` (its bundles on disk, plus runc's own list)."""
    inst = labels.get("cbatch.instance")
    out = []
    base = os.path.join(DIRECT_BUNDLES, inst) if inst else None
    try:
        names = os.listdir(base) if base else []
    except FileNotFoundError:
        names = []
    for name in names:
        try:
            with open(os.path.join(base, name, "meta.json")) as fh:
                meta = json.load(fh)
        except (OSError, ValueError):
            meta = {"labels": {"cbatch.instance": inst}}     # a bundle being made counts as a container
        if all(meta.get("labels", {}).get(k) == v for k, v in labels.items()):
            out.append("direct-" + name)
    return out


def instance_containers(instance: str) -> List[str]:
    """Ids of every container (running or not) labelled with this daemon instance, both engines."""
    out = subprocess.run(["docker", "ps", "-a", "-q", "--no-trunc", "--filter", f"label=cbatch.instance={instance}"],
                         check=True, capture_output=True, text=True).stdout
    return out.split() + direct_containers({"cbatch.instance": instance})


def job_containers(instance: str, job_id: str) -> List[str]:
    """Ids of the containers of one job of this instance, both engines."""
    out = subprocess.run(["docker", "ps", "-a", "-q", "--no-trunc", "--filter", f"label=cbatch.instance={instance}",
                          "--filter", f"label=cbatch.job={job_id}"], check=True, capture_output=True, text=True).stdout
    return out.split() + direct_containers({"cbatch.instance": instance, "cbatch.job": job_id})


def direct_bundle_file(cid: str, filename: str) -> Optional[str]:
    """The path of ``filename`` in the direct container ``cid``'s bundle (whichever instance made it), or None."""
    name = cid[len("direct-"):]
    for inst in os.listdir(DIRECT_BUNDLES):
        path = os.path.join(DIRECT_BUNDLES, inst, name, filename)
        if os.path.exists(path):
            return path
    return None


def direct_json(cid: str, filename: str) -> dict:
    """A JSON file of the direct container's bundle (``config.json``: its OCI spec; ``meta.json``: cbatch's)."""
    path = direct_bundle_file(cid, filename)
    if path is None:
        raise FileNotFoundError(cid)
    with open(path) as fh:
        return json.load(fh)


def direct_config(cid: str) -> dict:
    """The OCI config.json the direct engine gave a running container."""
    return direct_json(cid, "config.json")


def container_pid(cid: str) -> int:
    """The host pid of a container's init (0 while it has none: being made, or ended), either engine."""
    if cid.startswith("direct-"):
        path = direct_bundle_file(cid, "pid")
        try:
            with open(path or "") as fh:
                return int(fh.read().strip() or 0)
        except (OSError, ValueError):
            return 0
    out = subprocess.run(["docker", "inspect", "--format", "{{.State.Pid}}", cid], capture_output=True, text=True)
    return int(out.stdout.strip() or 0) if out.returncode == 0 else 0


def container_cgroup(cid: str):
    """(the container's cgroup parent, the name of its own cgroup directory), as its engine set them up."""
    if cid.startswith("direct-"):
        return tuple(direct_config(cid)["linux"]["cgroupsPath"].rsplit("/", 1))
    parent = subprocess.run(["docker", "inspect", "-f", "{{.HostConfig.CgroupParent}}", cid],
                            capture_output=True, text=True, check=True).stdout.strip()
    return parent, cid


def remove_instance_containers(instance: str) -> List[str]:
    """Remove this instance's containers and image holders (ours only: filtered by our unique label)."""
    ids = instance_containers(instance)
    docker_ids = [i for i in ids if not i.startswith("direct-")]
    holders = subprocess.run(["docker", "ps", "-a", "-q", "--no-trunc", "--filter", f"label=cbatch.hold={instance}"],
                             capture_output=True, text=True).stdout.split()
    if docker_ids or holders:
        subprocess.run(["docker", "rm", "-f", *docker_ids, *holders], capture_output=True)
    if len(docker_ids) < len(ids):
        from cbatch.engines.direct import DirectEngine
        from cbatch.engines.docker import Engine
        direct = DirectEngine(Engine(), DIRECT_BUNDLES, instance)
        for cid in ids:
            if cid.startswith("direct-"):
                direct.remove(cid)
    return ids


def script(body: str, image: Optional[str] = "cbatch-test/debian:12", shebang: str = "#!/bin/bash") -> bytes:
    """A job script with ``#CBATCH --image`` (none when image is None)."""
    head = [shebang, "#PBS -N test"]
    if image:
        head.append(f"#CBATCH --image={image}")
    return ("\n".join(head) + "\n" + body.strip("\n") + "\n").encode()


def docker_inspect(cid: str) -> dict:
    """``docker inspect`` of one container, as a dict."""
    import json
    out = subprocess.run(["docker", "inspect", cid], check=True, capture_output=True, text=True).stdout
    return json.loads(out)[0]


def run_epilogue(mom, job, exit_status: int = 0) -> subprocess.CompletedProcess:
    """Run the mom's installed epilogue by hand (for a Mom made with run_epilogue=False), root, 11 args."""
    plan = job.plan
    args = [job.job_id, plan["user"], plan["group"], plan["name"], str(job.session_id), plan["resource_list"],
            "cput=00:00:00,vmem=0kb,walltime=00:00:01,mem=0kb,energy_used=0", plan["queue"], plan["account"],
            str(exit_status), plan["script"]]
    return subprocess.run([mom.epilogue_path, *args], env=plan["hook_env"], capture_output=True,
                          stdin=subprocess.DEVNULL, cwd=mom.mom_priv, timeout=60)


def reattached(daemon, job_id: str) -> int:
    """How many of ``job_id``'s clients have taken their containers back from ``daemon`` (its log lines)."""
    return sum(f"job {job_id}: container " in ln and ln.endswith("reattached") for ln in daemon.log().splitlines())


def wait_until(predicate, timeout: float, interval: float = 0.05) -> Optional[float]:
    """Poll ``predicate`` until true; return the seconds it took, or None on timeout."""
    import time
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(interval)
    return None


def cbatch_lines(data: bytes) -> List[str]:
    """The lines of a spool file that cbatch wrote (they all start with "cbatch")."""
    return [l for l in data.decode(errors="replace").splitlines() if l.startswith("cbatch")]


def container_events(cid: str, since: float) -> List[dict]:
    """The engine's events for one container since ``since`` (epoch seconds): action, signal, exit code.
    Direct containers: the direct engine's own event record (``<bundles>/events/<instance>.jsonl``)."""
    import json
    import time
    if cid.startswith("direct-"):
        events = []
        base = os.path.join(DIRECT_BUNDLES, "events")
        for name in (os.listdir(base) if os.path.isdir(base) else []):
            with open(os.path.join(base, name)) as fh:
                for line in fh:
                    e = json.loads(line)
                    if e["id"] == cid and e["time"] >= since:
                        events.append({"action": e["action"], "signal": e.get("signal"), "exit": e.get("exitCode"),
                                       "time": e["time"]})
        return events
    out = subprocess.run(["docker", "events", "--since", f"{since:.3f}", "--until", f"{time.time() + 0.5:.3f}",
                          "--filter", f"container={cid}", "--format", "{{json .}}"],
                         check=True, capture_output=True, text=True, timeout=30).stdout
    events = []
    for line in out.splitlines():
        e = json.loads(line)
        attrs = (e.get("Actor") or {}).get("Attributes") or {}
        events.append({"action": e.get("Action") or e.get("status"), "signal": attrs.get("signal"),
                       "exit": attrs.get("exitCode"), "time": e.get("timeNano", 0) / 1e9})
    return events
