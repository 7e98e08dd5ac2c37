"""End-to-end 2: the script runs through the user's shell, with its qsub -F arguments, as pbs_mom runs it."""

from __future__ import annotations


from torque_helpers import cbatch_lines, job_containers, script


def _kv(result):
    out = {}
    for line in result.stdout.decode().splitlines():
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


def test_shell_args_dollar0_cwd_and_pbs_env(mom, alice, workdir):
    job = mom.submit(script("""
echo "zero=$0"
echo "n=$#"
for a in "$@"; do echo "arg=$a"; done
echo "cwd=$(pwd)"
echo "bash=$BASH"
echo "jobid=$PBS_JOBID"
echo "queue=$PBS_QUEUE"
echo "workdir=$PBS_O_WORKDIR"
echo "np=$PBS_NP"
echo "nodes=$(wc -l < "$PBS_NODEFILE")"
echo "env=$PBS_ENVIRONMENT"
echo "jobname=$PBS_JOBNAME"
"""), alice.name, args=["first", "second"], initdir=str(workdir), workdir=str(workdir),
        resources="nodes=1:ppn=2,walltime=00:05:00", name="argtest")
    r = job.wait(120)
    assert r.exit_status == 0, r.stderr
    kv = _kv(r)
    assert kv["zero"] == [job.script_path]
    assert kv["n"] == ["2"] and kv["arg"] == ["first", "second"]
    assert kv["bash"] == ["/bin/bash"]
    assert kv["cwd"] == [str(workdir)]
    assert kv["jobid"] == [job.job_id]
    assert kv["queue"] == ["batch"]
    assert kv["workdir"] == [str(workdir)]
    assert kv["np"] == ["2"] and kv["nodes"] == ["2"]
    assert kv["env"] == ["PBS_BATCH"]
    assert kv["jobname"] == ["argtest"]


def test_plain_args(mom, alice):
    r = mom.submit(script('printf "%s|" "$0" "$@"'), alice.name, args=["a", "b c"]).wait(120)
    assert r.exit_status == 0, r.stderr
    # pbs_mom joins the -F arguments with blanks on the stdin line; the shell splits them again.
    assert r.stdout.decode().split("|")[1:-1] == ["a", "b", "c"]


def test_unbalanced_quote_is_the_shells_business(mom, alice):
    # pbs_mom writes "<script> it's" on the shell's stdin: bash itself reports the quote, exit 2, as natively.
    r = mom.submit(script("echo never"), alice.name, args=["it's"]).wait(120)
    assert r.exit_status == 2
    assert b"unexpected EOF" in r.stderr and b"cbatch" not in r.stderr


def test_cwd_defaults_to_home(mom, alice):
    r = mom.submit(script("pwd; echo $HOME"), alice.name).wait(120)
    assert r.exit_status == 0, r.stderr
    assert r.stdout.decode().split() == [alice.home, alice.home]


def test_shebang_applies(mom, alice):
    # The shell runs the .SC path, so the kernel honours its #! line: /bin/cat prints the script itself.
    body = b"#!/bin/cat\n#CBATCH --image=cbatch-test/debian:12\nhello from cat\n"
    r = mom.submit(body, alice.name).wait(120)
    assert r.exit_status == 0, r.stderr
    assert r.stdout == body


def test_missing_shell_in_image_is_127(mom, daemon, alice):
    job = mom.submit(script("echo never", image="cbatch-test/noshell:1"), alice.name)
    r = job.wait(60)
    assert r.exit_status == 127, (r.stdout, r.stderr)
    assert r.stdout == b""
    lines = cbatch_lines(r.stderr)
    assert len(lines) == 1 and "/bin/bash" in lines[0], r.stderr
    assert not job_containers(daemon.instance, job.job_id)


def test_busybox_image_with_sh_user(mom, carol):
    r = mom.submit(script('echo "$0 $(id -un)"', image="cbatch-test/busybox:1", shebang="#!/bin/sh"),
                   carol.name).wait(120)
    assert r.exit_status == 0, r.stderr
    assert r.stdout.decode().split() == [r.stdout.decode().split()[0], carol.name]
    assert r.stdout.decode().startswith(mom.jobs_dir)
