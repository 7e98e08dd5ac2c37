"""Torque resource lists -> numbers."""

import pytest

from cbatch.core.errors import JobError
from cbatch.core.resources import NodeSpec, Resources, parse_resource_list, parse_size, parse_walltime


@pytest.mark.parametrize("text,expected", [
    ("0", 0), ("4096", 4096), ("10b", 10), ("1kb", 1024), ("100mb", 100 << 20), ("2gb", 2 << 30),
    ("1tb", 1 << 40), ("100MB", 100 << 20), ("2Gb", 2 << 30), ("16w", 128), ("2kw", 2048 * 8),
    ("1mw", 8 << 20), ("1gw", 8 << 30), (" 64mb ", 64 << 20), ("3B", 3),
])
def test_parse_size_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "mb", "-1mb", "1.5gb", "64m", "10 kb mb", "1xb", "1e3", "١٢mb"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("text,expected", [
    ("3600", 3600), ("0", 0), ("30:00", 1800), ("01:00:00", 3600), ("1:02:03", 3723), ("100:00:00", 360000),
    ("1:00:00:00", 86400), ("00:01:00", 60),
])
def test_parse_walltime(text, expected):
    assert parse_walltime(text) == expected


@pytest.mark.parametrize("text", ["", "1:75", "1:60:00", "1:2:3:4:5", "a", "1h", "-5", "1::2", "2:24:00:00"])
def test_parse_walltime_rejects(text):
    with pytest.raises(ValueError):
        parse_walltime(text)


def test_full_torque_list_from_the_prologue():
    r = parse_resource_list("nodes=1:ppn=2,walltime=01:00:00,mem=100mb,neednodes=1:ppn=2")
    assert r.nodes == (NodeSpec(count=1, host=None, ppn=2, gpus=0),)
    assert r.node_count == 1 and r.ppn == 2
    assert r.walltime == 3600 and r.mem == 100 << 20
    assert r.extra == (("neednodes", "1:ppn=2"),)
    assert r.cpus_on() == 2 and r.memory_on() == 100 << 20
    assert r.raw.startswith("nodes=")


def test_keys_case_insensitive_and_all_known_keys():
    r = parse_resource_list("NODES=2:PPN=4,Walltime=90,MEM=1GB,ncpus=3,pmem=10mb,gpus=2")
    assert r.node_count == 2 and r.ppn == 4
    assert r.ncpus == 3 and r.pmem == 10 << 20 and r.gpus == 2 and r.walltime == 90
    assert r.cpus_on() == 3            # ncpus wins over ppn


@pytest.mark.parametrize("text,seconds", [("cput=00:00:03", 3), ("cput=3", 3), ("CPUT=1:30:00", 5400),
                                          ("cput=100:00:00", 360000), ("cput=1:00:00:00", 86400)])
def test_cput_is_seconds(text, seconds):
    r = parse_resource_list(f"nodes=1,{text},walltime=00:10:00")
    assert r.cput == seconds and r.walltime == 600
    assert r.extra == () and r.to_dict()["cput"] == seconds


def test_no_cput_is_none():
    assert parse_resource_list("nodes=1,pcput=00:00:05").cput is None     # per-process cput is not cput


def test_host_list_and_cpus_on_this_node():
    r = parse_resource_list("nodes=node1+node2:ppn=2")
    assert [n.host for n in r.nodes] == ["node1", "node2"]
    assert [n.ppn for n in r.nodes] == [1, 2]
    assert r.node_count == 2
    assert r.cpus_on("node1") == 1
    assert r.cpus_on("node2.cluster.example") == 2
    assert r.cpus_on("elsewhere") == 2          # largest ppn when this node is not named
    assert parse_resource_list("nodes=vm+vm:ppn=2").cpus_on("vm") == 3


def test_node_properties_and_gpus():
    r = parse_resource_list("nodes=2:ppn=4:gpus=1:bigmem")
    assert r.nodes[0].properties == ("bigmem",)
    assert r.gpus == 1


def test_pmem_times_ppn_when_no_mem():
    r = parse_resource_list("nodes=1:ppn=4,pmem=100mb")
    assert r.memory_on() == 400 << 20
    assert parse_resource_list("pmem=1gb").memory_on() == 1 << 30


def test_empty_list():
    r = parse_resource_list("")
    assert r == Resources(raw="")
    assert r.cpus_on() is None and r.memory_on() is None and r.node_count == 1


@pytest.mark.parametrize("text,message", [
    ("mem=lots", "cbatch: resource list: malformed mem: mem=lots (an integer with an optional unit b, kb, mb, "
                 "gb, tb, w (8-byte words), kw, mw, gw; e.g. 100mb)"),
    ("walltime=1:75", "cbatch: resource list: malformed walltime: walltime=1:75 "
                      "(seconds, MM:SS, HH:MM:SS or DD:HH:MM:SS)"),
    ("nodes=0:ppn=1", "cbatch: resource list: node count must be at least 1: nodes=0:ppn=1 "
                      "(nodes=N[:ppn=M] or host[:ppn=M]+host...)"),
    ("nodes=1:ppn=x", "cbatch: resource list: malformed ppn: nodes=1:ppn=x (ppn=<positive integer>)"),
    ("nodes=1:ppn=0", "cbatch: resource list: ppn must be at least 1: nodes=1:ppn=0 (ppn=<positive integer>)"),
    ("nodes=bad host", "cbatch: resource list: malformed nodes: nodes=bad host "
                       "(nodes=N[:ppn=M] or host[:ppn=M]+host...)"),
    ("mem", "cbatch: resource list: malformed resource: mem (key=value[,key=value...])"),
    ("mem=1mb,mem=2mb", "cbatch: resource list: resource given twice: mem=2mb (give each resource once)"),
    ("ncpus=-1", "cbatch: resource list: malformed ncpus: ncpus=-1 (a non-negative integer)"),
    ("cput=00:61:00", "cbatch: resource list: malformed cput: cput=00:61:00 "
                      "(seconds, MM:SS, HH:MM:SS or DD:HH:MM:SS)"),
    ("cput=1h", "cbatch: resource list: malformed cput: cput=1h (seconds, MM:SS, HH:MM:SS or DD:HH:MM:SS)"),
])
def test_errors(text, message):
    with pytest.raises(JobError) as exc:
        parse_resource_list(text)
    assert exc.value.message == message


def test_to_dict_is_json_safe():
    import json
    json.dumps(parse_resource_list("nodes=2:ppn=2,mem=1gb,feature=x").to_dict())
