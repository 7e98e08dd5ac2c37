"""Issue #9.2: a hostile ``cbatch run`` client cannot keep a proxy thread alive past its session.

The attack (reproduced with the real daemon and engine): bob's ``cbatch run`` writes into a FIFO that bob
keeps open but never reads, so the daemon's proxy blocks on a full pipe; bob SIGKILLs the client. The old
daemon closed the session's descriptors while the proxy thread was still blocked writing to one of them;
the numbers were reused by the next session (alice's job), and when bob drained the FIFO the old thread
wrote bob's bytes into alice's descriptors (or broke her connection: "daemon: lost", status 125). Threads
leaked with every killed client.

Against the old code, ``test_killed_client_with_full_pipe_leaves_no_thread`` failed on the first round (the
thread count never came back to idle: the proxy thread stayed blocked in write()).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from torque_helpers import script, wait_until

CBATCH = str(Path(sys.executable).parent / "cbatch")
PY = sys.executable
IMG = "cbatch-test/busybox:1"
ROUNDS = 3

ATTACKER = """
C={cbatch}
rm -f p go; mkfifo p
exec 7<>p                                   # a reader that never reads: the pipe fills and stays full
$C run --image {img} sh -c 'while :; do echo ATTACKER-BYTES-ATTACKER-BYTES; done' >p &
pid=$!
{py} -c 'import fcntl, struct, termios, time
# Full: the level stops moving while the container keeps writing (a pipe is full when its page slots are,
# which can be well below its capacity in bytes).
last, same = -1, 0
while same < 4:
    time.sleep(0.25)
    n = struct.unpack("i", fcntl.ioctl(7, termios.FIONREAD, bytes(4)))[0]
    same = same + 1 if n == last and n > 0 else 0
    last = n'
echo full
kill -9 $pid
wait $pid
echo killed
while [ ! -e go ]; do sleep 0.1; done
timeout 5 cat <&7 >/dev/null                # now release whatever the daemon still had blocked on the pipe
echo drained
"""

VICTIM = """
C={cbatch}
$C run --image {img} sh -c 'echo victim-start; sleep 4; i=0; while [ $i -lt 300 ]; do echo victim-$i; i=$((i+1)); done' | cat
echo rc=${{PIPESTATUS[0]}}
"""


@pytest.fixture(scope="module")
def sdaemon(daemon_factory):
    return daemon_factory("streams")


def _threads(daemon) -> int:
    return len(os.listdir(f"/proc/{daemon.proc.pid}/task"))


def test_killed_client_with_full_pipe_leaves_no_thread(mom_factory, sdaemon, alice, bob, workdir_for):
    mom = mom_factory(sdaemon)
    # Idle: no session open. Measured after a first job so lazily started threads (engine pools) exist.
    warm = mom.submit(script(f"{CBATCH} run --image {IMG} true", image=None), alice.name,
                      variables={"CBATCH_SOCKET": sdaemon.socket})
    assert warm.wait(120).exit_status == 0
    assert wait_until(lambda: "unregistered" in sdaemon.log(), 10) is not None
    time.sleep(1.0)     # the last request threads end (a lower idle would only make the test stricter)
    idle = _threads(sdaemon)
    expected = "victim-start\n" + "".join(f"victim-{i}\n" for i in range(300)) + "rc=0\n"
    for n in range(ROUNDS):
        work = workdir_for(bob)
        attacker = mom.submit(script(ATTACKER.format(cbatch=CBATCH, img=IMG, py=PY), image=None), bob.name,
                              variables={"CBATCH_SOCKET": sdaemon.socket}, workdir=str(work), initdir=str(work))
        assert attacker.wait_output(b"killed", timeout=60), (n, attacker.peek(), sdaemon.log()[-1500:])
        # The daemon saw the client go (the moment under test was reached) ...
        assert wait_until(lambda: sdaemon.log().count("went away") > n, 10) is not None, sdaemon.log()[-2000:]
        # ... and no thread of that session survives it, although bob's pipe is still full.
        settled = wait_until(lambda: _threads(sdaemon) <= idle, 15)
        assert settled is not None, f"round {n}: {_threads(sdaemon)} threads, idle {idle}"
        victim = mom.submit(script(VICTIM.format(cbatch=CBATCH, img=IMG), image=None), alice.name,
                            variables={"CBATCH_SOCKET": sdaemon.socket})
        assert victim.wait_output(b"victim-start", timeout=60), victim.peek()
        (work / "go").touch()
        assert attacker.wait_output(b"drained", timeout=30), attacker.peek()
        r = victim.wait(120)
        assert r.stdout.decode() == expected, r.stdout[-500:]
        assert b"ATTACKER" not in r.stderr and r.exit_status == 0, r.stderr[-500:]
        attacker.wait(60)
        assert wait_until(lambda: _threads(sdaemon) <= idle, 15) is not None, \
            f"round {n}: {_threads(sdaemon)} threads after both jobs, idle {idle}"
