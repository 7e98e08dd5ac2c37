"""cbatch.daemon.tmclient: which pbs_mom, which client directories may be mounted, which TM port is real.
The job's environment is the user's: a PBS_MOMPORT pbs_mom does not listen on must never become a relay
target, and a client directory anyone but root could change must never be mounted into jobs."""

import os
import socket

import pytest

from cbatch.core.config import parse
from cbatch.core.spec import Mount
from cbatch.daemon import tmclient


@pytest.fixture
def listening():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    yield s.getsockname()[1]
    s.close()


def test_tm_port_only_when_the_mom_listens_on_it(listening):
    me = tmclient.Mom(os.getpid(), "/opt/torque")        # this process plays the mom: it listens
    assert listening in tmclient.listening_ports(os.getpid())
    assert tmclient.tm_port({"PBS_MOMPORT": str(listening)}, me) == listening
    other = socket.socket()
    other.bind(("127.0.0.1", 0))                          # bound, not listening: not a mom port
    try:
        for value in (str(other.getsockname()[1]), "", "0", "65536", "-1", " 15003", "15003x", "0x3a9b"):
            assert tmclient.tm_port({"PBS_MOMPORT": value}, me) is None, value
    finally:
        other.close()
    assert tmclient.tm_port({}, me) is None


def test_no_mom_above_a_process_not_started_by_pbs_mom():
    assert tmclient.find_mom(os.getpid()) is None
    assert tmclient.find_mom(1) is None


def test_client_mounts_of_a_root_owned_prefix():
    if not (os.path.isdir("/usr/bin") and os.stat("/usr/lib").st_uid == 0):
        pytest.skip("no root-owned /usr/bin, /usr/lib")
    assert tmclient.client_mounts("/usr") == (Mount("/usr/bin", "/usr/bin", True),
                                              Mount("/usr/lib", "/usr/lib", True))


@pytest.mark.parametrize("prefix", ["relative/torque", "/", "/usr/../usr", "/nonexistent-cbatch-prefix"])
def test_client_mounts_refuse_odd_prefixes(prefix):
    assert tmclient.client_mounts(prefix) == ()


def test_client_mounts_refuse_a_prefix_others_can_change(tmp_path):
    # tmp_path lies under /tmp (world-writable): whoever can write there could swap bin/ under root's feet.
    for d in ("bin", "lib"):
        (tmp_path / d).mkdir()
    assert tmclient.client_mounts(str(tmp_path)) == ()


@pytest.mark.root
def test_client_mounts_refuse_a_user_owned_lib(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (chown)")
    base = "/run/cbatch-tmclient-test-%d" % os.getpid()
    os.mkdir(base, 0o755)
    try:
        for d in ("bin", "lib"):
            os.mkdir(os.path.join(base, d), 0o755)
        assert tmclient.client_mounts(base) == tuple(Mount(f"{base}/{d}", f"{base}/{d}", True) for d in ("bin", "lib"))
        os.chown(os.path.join(base, "lib"), 4242, 4242)
        assert tmclient.client_mounts(base) == ()
        os.chown(os.path.join(base, "lib"), 0, 0)
        os.chmod(os.path.join(base, "bin"), 0o775)
        assert tmclient.client_mounts(base) == ()
    finally:
        for d in ("bin", "lib"):
            os.rmdir(os.path.join(base, d))
        os.rmdir(base)


@pytest.mark.parametrize("text,batch", [("torque: {client: 'off'}", "torque"), ("defaults: {tm: false}", "torque"),
                                        ("", "slurm")])
def test_plan_is_none_when_not_wanted(text, batch):
    cfg = parse(text, path="site.yaml", hostname="n")
    assert tmclient.plan(cfg, cfg.defaults, batch, os.getpid(), {"PBS_MOMPORT": "15003"}) is None


def test_plan_is_none_outside_pbs_mom():
    cfg = parse("", path="site.yaml", hostname="n")
    assert tmclient.plan(cfg, cfg.defaults, "torque", os.getpid(), {"PBS_MOMPORT": "15003"}) is None


@pytest.fixture
def pbs_prefix():
    """A root-owned PBS_EXEC with bin/ and lib/ and a pbs.conf naming it, under /run (root only)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (root-owned files)")
    base = "/run/cbatch-tmclient-pbs-%d" % os.getpid()
    os.mkdir(base, 0o755)
    for d in ("bin", "lib", "etc"):
        os.mkdir(os.path.join(base, d), 0o755)
    yield base
    for name in os.listdir(os.path.join(base, "etc")):
        os.unlink(os.path.join(base, "etc", name))
    for d in ("bin", "lib", "etc"):
        os.rmdir(os.path.join(base, d))
    os.rmdir(base)


def _conf(base: str, text: str, mode: int = 0o644) -> str:
    path = os.path.join(base, "etc", "pbs.conf")
    with open(path, "w") as fh:
        fh.write(text)
    os.chmod(path, mode)
    return path


@pytest.mark.root
def test_pbs_plan_mounts_the_client_and_conf_and_relays_the_manager_port(pbs_prefix, listening):
    mom = tmclient.Mom(os.getpid(), pbs_prefix)
    conf = _conf(pbs_prefix, f"# site\nPBS_SERVER=vm\nPBS_EXEC={pbs_prefix}\nPBS_MANAGER_SERVICE_PORT={listening}\n")
    got = tmclient._pbs_plan(mom, {"PBS_MOMPORT": str(listening)}, conf)
    assert got == tmclient.TmPlan((Mount(f"{pbs_prefix}/bin", f"{pbs_prefix}/bin", True),
                                   Mount(f"{pbs_prefix}/lib", f"{pbs_prefix}/lib", True),
                                   Mount(conf, "/etc/pbs.conf", True)), listening)


@pytest.mark.root
def test_pbs_plan_relays_only_the_manager_port(pbs_prefix, listening):
    # pbs_mom listens on its batch port (15002) too: a job's PBS_MOMPORT naming it gets no relay.
    mom = tmclient.Mom(os.getpid(), pbs_prefix)
    conf = _conf(pbs_prefix, f"PBS_EXEC={pbs_prefix}\n")                # manager port: the default 15003
    got = tmclient._pbs_plan(mom, {"PBS_MOMPORT": str(listening)}, conf)
    assert got is not None and got.port is None and len(got.mounts) == 3


@pytest.mark.root
@pytest.mark.parametrize("text,mode", [("PBS_EXEC=/opt/other-pbs\n", 0o644),      # not the running mom's
                                       ("PBS_SERVER=vm\n", 0o644),                 # no PBS_EXEC at all
                                       ("PBS_EXEC={base}\n", 0o664),               # group-writable conf
                                       ("PBS_EXEC={base}\n", 0o646)])              # world-writable conf
def test_pbs_plan_refuses_a_conf_it_cannot_trust_or_another_pbs(pbs_prefix, listening, text, mode):
    mom = tmclient.Mom(os.getpid(), pbs_prefix)
    conf = _conf(pbs_prefix, text.format(base=pbs_prefix), mode)
    assert tmclient._pbs_plan(mom, {"PBS_MOMPORT": str(listening)}, conf) is None


@pytest.mark.root
def test_pbs_plan_refuses_a_user_owned_conf(pbs_prefix, listening):
    conf = _conf(pbs_prefix, f"PBS_EXEC={pbs_prefix}\n")
    os.chown(conf, 4242, 4242)
    assert tmclient._pbs_plan(tmclient.Mom(os.getpid(), pbs_prefix), {}, conf) is None
    assert tmclient.pbs_conf(conf) is None


def test_pbs_conf_under_a_world_writable_directory_is_not_read(tmp_path):
    path = tmp_path / "pbs.conf"
    path.write_text("PBS_EXEC=/opt/pbs\n")
    assert tmclient.pbs_conf(str(path)) is None


def test_plan_is_none_for_a_pbs_job_outside_pbs_mom():
    cfg = parse("", path="site.yaml", hostname="n")
    assert tmclient.plan(cfg, cfg.defaults, "pbs", os.getpid(), {"PBS_MOMPORT": "15003"}) is None
