"""``cbatch check --node`` on an OpenPBS / PBS Pro node: are cbatch's hooks present, enabled and current?

Where PBS keeps a hook, in the order asked:

- the server, through ``qmgr`` (``PBS_EXEC/bin/qmgr``; answers on the server host): ``list hook NAME`` gives
  its attributes, ``export hook NAME application/x-python default`` its body;
- the files of ``PBS_HOME``: ``server_priv/hooks/NAME.HK|.PY`` on the server host, ``mom_priv/hooks/NAME.HK|.PY``
  on an execution host (the server sends site hooks with execjob events to every mom; a ``queuejob`` hook
  stays on the server). A ``.HK`` file holds only the attributes that differ from PBS's defaults
  (OpenPBS 23.06 src/lib/Libutil/hook.c ``hook_save``: ``enabled`` is written only when false), so an
  absent key means the default (``enabled`` true, ``order`` 1, ``alarm`` 30).

Checks per hook (:data:`cbatch.admin.pbshooks.EXEC_HOOK` on every PBS node, the queuejob hook where the server
answers or keeps its files): present; enabled; its events; ``order`` after ``pbs_cgroups``; and *current*: the
body is exactly what this cbatch's ``install-hooks --pbs`` writes with the settings baked into it (python,
socket, starter, config), those settings name this node's daemon socket, and its interpreter and starter
exist here. A node without ``/etc/pbs.conf`` is no PBS node: nothing is checked.
"""

from __future__ import annotations

import ast
import os
import subprocess
from typing import Dict, Iterator, Optional, Tuple

from cbatch.admin import pbshooks

PBS_CONF = "/etc/pbs.conf"
HK_DEFAULTS = {"enabled": "true", "order": "1", "alarm": "30"}     # hook.h HOOK_*_DEFAULT
BAKED = ("PYTHON", "SOCKET", "STARTER", "CONFIG")
HOOKS = ((pbshooks.EXEC_HOOK, "exec", {"execjob_launch", "execjob_end"}),
         (pbshooks.QUEUE_HOOK, "queuejob", {"queuejob"}))
MAX_BODY = 1 << 20


def read_conf(path: str = PBS_CONF) -> Optional[Dict[str, str]]:
    """``/etc/pbs.conf`` as a dict (None when there is none: not a PBS node)."""
    try:
        with open(path) as fh:
            text = fh.read(65536)
    except OSError:
        return None
    conf = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            conf[key.strip()] = value.strip()
    return conf


def _qmgr(pbs_exec: str, command: str) -> Optional[str]:
    """qmgr's stdout, or None when qmgr is absent, fails or does not answer (not the server host)."""
    exe = os.path.join(pbs_exec, "bin", "qmgr")
    if not os.access(exe, os.X_OK):
        return None
    try:
        done = subprocess.run([exe, "-c", command], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              timeout=30, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.decode("utf-8", "replace") if done.returncode == 0 else None


def _listed(text: str) -> Dict[str, str]:
    """``list hook NAME`` output (``    key = value`` lines) as a dict."""
    attrs = {}
    for line in text.splitlines():
        key, sep, value = line.partition(" = ")
        if sep:
            attrs[key.strip()] = value.strip()
    return attrs


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read(MAX_BODY)
    except OSError:
        return None


def find_hook(name: str, pbs_exec: str, pbs_home: str, server_ok: bool) -> Tuple[Optional[str], Dict[str, str],
                                                                                  Optional[str]]:
    """``(where, attributes, body)`` of hook ``name`` (where is None when PBS has no such hook here).
    ``server_ok``: qmgr answered on this host (then its word is final)."""
    if server_ok:
        listed = _qmgr(pbs_exec, f"list hook {name}")
        if listed is None:
            return None, {}, None
        body = _qmgr(pbs_exec, f"export hook {name} application/x-python default")
        return "qmgr", _listed(listed), body
    for side in ("server_priv", "mom_priv"):
        base = os.path.join(pbs_home, side, "hooks", name)
        hk = _read(base + ".HK")
        if hk is None:
            continue
        attrs = dict(HK_DEFAULTS)
        for line in hk.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                attrs[key.strip()] = value.strip()
        return base + ".HK", attrs, _read(base + ".PY")
    return None, {}, None


def baked(body: str) -> Dict[str, str]:
    """The settings a cbatch hook body was written with (its top-level string constants)."""
    found = {}
    try:
        tree = ast.parse(body)
    except SyntaxError:
        return found
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in BAKED and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, str):
            found[node.targets[0].id] = node.value.value
    return found


def check_hook(name: str, kind: str, events: set, attrs: Dict[str, str], body: Optional[str],
               socket_path: str) -> Tuple[bool, str]:
    """``(ok, detail)`` for one hook PBS has (see the module docstring)."""
    problems = []
    if attrs.get("enabled", "true").lower() != "true":
        problems.append("disabled (qmgr -c \"set hook %s enabled = true\")" % name)
    have = {e.strip() for e in attrs.get("event", "").replace('"', "").split(",") if e.strip()}
    if not events <= have:
        problems.append(f"events {','.join(sorted(have)) or 'none'}, needs {','.join(sorted(events))}")
    if kind == "exec" and attrs.get("order", "1") != str(pbshooks.HOOK_ORDER):
        problems.append(f"order {attrs.get('order', '1')}, install-hooks sets {pbshooks.HOOK_ORDER} "
                        "(after pbs_cgroups)")
    settings = baked(body or "")
    if body is None or pbshooks.MARKER not in body[:4096]:
        problems.append("not written by cbatch install-hooks")
    elif set(settings) != set(BAKED):
        problems.append("not a hook this cbatch writes (re-run cbatch install-hooks --pbs)")
    else:
        want = pbshooks.hook_text(kind, settings["PYTHON"], settings["SOCKET"], settings["STARTER"],
                                  settings["CONFIG"])
        if body.rstrip("\n") != want.rstrip("\n"):
            problems.append("written by another cbatch version (re-run cbatch install-hooks --pbs)")
        if settings["SOCKET"] != socket_path:
            problems.append(f"talks to {settings['SOCKET']}, the daemon listens on {socket_path}")
        for key in (("PYTHON", "STARTER") if kind == "exec" else ("PYTHON",)):
            if not os.access(settings[key], os.X_OK):
                problems.append(f"{key.lower()} {settings[key]} is not executable on this node")
    detail = f"{name}: enabled, events {','.join(sorted(have))}, current" if not problems else \
        f"{name}: " + "; ".join(problems)
    return not problems, detail


def lines(socket_path: str, conf_path: str = PBS_CONF) -> Iterator[Tuple[bool, str, str]]:
    """``(ok, what, detail)`` for cbatch's PBS hooks; nothing on a node without PBS."""
    conf = read_conf(conf_path)
    if conf is None:
        return
    pbs_exec = conf.get("PBS_EXEC", "/opt/pbs")
    pbs_home = conf.get("PBS_HOME", "/var/spool/pbs")
    server_ok = _qmgr(pbs_exec, "list server") is not None
    for name, kind, events in HOOKS:
        where, attrs, body = find_hook(name, pbs_exec, pbs_home, server_ok)
        if where is None:
            if kind == "queuejob" and not server_ok and \
                    not os.path.isdir(os.path.join(pbs_home, "server_priv", "hooks")):
                continue        # an execution host: the queuejob hook lives on the server only
            yield False, "PBS hook", f"{name}: not installed (cbatch install-hooks --pbs --pbs-exec {pbs_exec})"
            continue
        ok, detail = check_hook(name, kind, events, attrs, body, socket_path)
        yield ok, "PBS hook", f"{detail} [{where}]"
