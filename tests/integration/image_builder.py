"""Hostile images built inside a test: a busybox-static rootfs with files the test writes, `docker import`ed.

``hostile_image(tag, files=..., links=..., changes=...)`` builds ``cbatch-test/<tag>`` (the test daemons
allow ``cbatch-test/*``) and returns the tag; ``remove(tag)`` deletes it. Nothing is pulled.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, Sequence

PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def busybox_rootfs(root: Path, with_shell: bool = True) -> None:
    """/bin/busybox with its applets (or only the binary, no /bin/sh, when ``with_shell`` is False)."""
    for d in ("bin", "etc", "tmp", "root", "home", "proc", "sys", "dev", "var/tmp", "opt"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "var/tmp", 0o1777)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    if with_shell:
        applets = subprocess.run(["/bin/busybox", "--list"], check=True, capture_output=True,
                                 text=True).stdout.split()
        for applet in applets:
            if applet != "busybox":
                os.symlink("busybox", root / "bin" / applet)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")


def hostile_image(tag: str, files: Dict[str, str] = None, links: Dict[str, str] = None,
                  changes: Sequence[str] = (), with_shell: bool = True) -> str:
    """Build ``cbatch-test/<tag>``: busybox rootfs, then ``files`` (path -> text), ``links`` (path -> target)."""
    ref = f"cbatch-test/{tag}"
    with tempfile.TemporaryDirectory(prefix="cbt-img-") as tmp:
        root = Path(tmp) / "rootfs"
        root.mkdir()
        busybox_rootfs(root, with_shell)
        for path, text in (files or {}).items():
            p = root / path.lstrip("/")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
        for path, target in (links or {}).items():
            p = root / path.lstrip("/")
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            p.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, p)
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(root), "-cf", "-", "."],
                               stdout=subprocess.PIPE)
        argv = ["docker", "import", "--change", f"ENV PATH={PATH_ENV}"]
        for change in changes:
            argv += ["--change", change]
        subprocess.run(argv + ["-", ref], stdin=tar.stdout, check=True, capture_output=True)
        tar.stdout.close()
        assert tar.wait() == 0
    return ref


def remove(ref: str) -> None:
    """Remove the image (its containers are gone by then; a failure is left for the next run)."""
    subprocess.run(["docker", "rmi", "-f", ref], capture_output=True)
