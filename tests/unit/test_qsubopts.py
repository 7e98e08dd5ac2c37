"""qsub's reading of its options (cbatch.core.qsubopts): the one reader behind the submit filter, ``cbatch check``
and ``cbatch local``. Their own tests only check that they use it."""

from __future__ import annotations

from cbatch.core import qsubopts
from cbatch.core.qsubopts import QsubRequest, read

ENV = {"HOME": "/home/alice", "FROM_ENV": "yes", "CBATCH_IMAGE": "evil/x:1"}


def test_getopt_clusters_attached_values_and_permutation():
    assert qsubopts.options(["-l", "nodes=1", "-Vq", "gpu", "s.sh", "-N", "x"]) == [
        ("l", "nodes=1"), ("V", ""), ("q", "gpu"), ("N", "x")]
    assert qsubopts.options(["-qbatch", "-I", "-x", "--", "-q", "no"]) == [("q", "batch"), ("I", ""), ("x", "")]
    assert qsubopts.options(["-q"]) == [("q", "")]


def test_leading_block_only_with_shebang_colon_and_blank_lines():
    script = (b"#!/bin/sh\n\n: colon line\n  #PBS -q gpu\n# plain comment\n#PBS -N one\r\n"
              b"echo start\n#PBS -N ignored\n")
    assert qsubopts.script_options(script) == [("q", "gpu"), ("N", "one")]


def test_backslash_continuation_quotes_and_any_bytes():
    script = b"#PBS -l nodes=1 \\\n -N 'two words'\n# caf\xe9 \xff\n#PBS -q 'unbalanced\ntrue\n"
    assert qsubopts.script_options(script) == [("l", "nodes=1"), ("N", "two words"), ("q", "'unbalanced")]


def test_prefix_from_C_then_PBS_DPREFIX_and_empty_prefix_disables():
    script = b"#PBS -q a\n#XYZ -q b\ntrue\n"
    assert read(script, environ={}).queue == "a"
    assert read(script, environ={"PBS_DPREFIX": "#XYZ"}).queue == "b"
    assert read(script, ["-C", "#XYZ"], environ={}).queue == "b"
    assert read(script, ["-C", ""], environ={}).queue is None


def test_command_line_overrides_script_last_wins():
    script = b"#PBS -q gpu -N fromscript\n#PBS -q long\ntrue\n"
    assert read(script, environ={}).queue == "long"
    req = read(script, ["job.sh", "-q", "batch@server", "-N", "cmd"], environ={})
    assert (req.queue, req.name) == ("batch", "cmd")
    assert read(b"", ["-q", "@server"], environ={}, default_queue="batch").queue == "batch"
    assert read(b"", environ={}).queue is None


def test_resources_accumulate_one_value_per_resource():
    script = b"#PBS -l nodes=1:ppn=2,walltime=00:10:00\n#PBS -l mem=1gb\n"
    req = read(script, ["-l", "WALLTIME=01:00:00", "-l", "gpus=1"], environ={})
    assert req.resources == ("nodes=1:ppn=2", "WALLTIME=01:00:00", "mem=1gb", "gpus=1")
    assert req.resource_list == "nodes=1:ppn=2,WALLTIME=01:00:00,mem=1gb,gpus=1"
    assert read(b"", environ={}).resource_list == ""


def test_shell_is_first_path_of_the_list():
    assert read(b"#PBS -S /bin/sh\n", environ={}).shell == "/bin/sh"
    assert read(b"#PBS -S /bin/zsh@node1,/bin/bash\n", ["-S", "/bin/ksh@n2,/bin/sh"], environ={}).shell == "/bin/ksh"
    assert read(b"#!/bin/bash\ntrue\n", environ={}).shell is None


def test_variables_from_lists_environment_and_V():
    script = b"#PBS -v A=1,FROM_ENV,MISSING\n"
    req = read(script, ["-v", "A=2, B = 'q' "], environ=ENV)
    assert req.variables == {"A": "2", "FROM_ENV": "yes", "B": "q"} and not req.export_all
    req = read(b"#PBS -V\n", ["-v", "CBATCH_IMAGE=cbatch-test/busybox:1"], environ=ENV)
    assert req.export_all and req.variables == {**ENV, "CBATCH_IMAGE": "cbatch-test/busybox:1"}


def test_request_is_frozen_and_keeps_every_option_in_order():
    req = read(b"#PBS -m abe -q a\n", ["-W", "x=y"], environ={})
    assert req.options == (("m", "abe"), ("q", "a"), ("W", "x=y"))
    assert isinstance(req, QsubRequest)
    try:
        req.queue = "b"
    except AttributeError:
        pass
    else:
        raise AssertionError("QsubRequest must be frozen")
