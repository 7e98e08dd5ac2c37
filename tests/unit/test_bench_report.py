"""The bench's pure logic: which modes run (and why one does not), the CBATCH_TIMING parser, the report's
targets and tables, and the SVG plot (bench/modes.py, timing.py, report.py, reportmd.py, plot.py)."""

import json
import xml.etree.ElementTree as ET

import pytest

from bench import modes, plot, report, reportmd, scaling, timing

SVG = "{http://www.w3.org/2000/svg}"


def test_plan_all_available_orders_baselines_then_engine_by_client():
    got, missing = modes.plan(["docker", "direct"], ["python", "c"], "/nowhere", "", problems={})
    assert [m.name for m in got] == ["native", "docker_run", "cbatch_docker_py", "cbatch_docker_c",
                                     "cbatch_direct_py", "cbatch_direct_c"]
    assert missing == {}
    assert {m.queue for m in got if m.kind == "cbatch"} == {"bench_docker", "bench_direct"}
    assert modes.engines_in(got) == ["docker", "direct"]


def test_plan_reports_each_missing_part_with_its_reason():
    got, missing = modes.plan(["docker", "direct"], ["python", "c"], "/nowhere",
                              problems={"direct": "no direct engine", "c": "no C client"})
    assert [m.name for m in got] == ["native", "docker_run", "cbatch_docker_py"]
    assert missing == {"cbatch_docker_c": "not available: no C client",
                       "cbatch_direct_py": "not available: no direct engine",
                       "cbatch_direct_c": "not available: no direct engine; no C client"}


def test_c_client_problem_names_a_missing_binary(tmp_path):
    why = modes.c_client_problem(str(tmp_path / "cbatch-client"))
    assert why.startswith("no C client at ") and str(tmp_path) in why


def test_timing_parse_finds_steps_after_any_log_prefix_and_ignores_the_rest():
    text = ("2026-12-03 07:00:00 cbatchd[12]: INFO timing direct.rootfs 4.25\n"
            "cbatchd: job 1.x started\n"
            "timing direct.runc_create 31\n"
            "cbatchd: timing direct.rootfs 5.75 ms\n"
            "the timing of this is not a step line\n"
            "timing direct.bad notanumber\n")
    assert timing.parse(text) == {"direct.rootfs": [4.25, 5.75], "direct.runc_create": [31.0]}
    b = timing.breakdown(text)
    assert list(b) == ["direct.rootfs", "direct.runc_create", "_sum_of_steps"]
    assert b["direct.rootfs"]["median"] == 5.0 and b["direct.rootfs"]["n"] == 2
    assert b["_sum_of_steps"]["median"] == 36.0


def test_timing_total_step_is_not_summed_and_gives_the_unaccounted_rest():
    text = "timing direct.inspect 5\ntiming direct.runc 140\ntiming direct.start 150\n"
    b = timing.breakdown(text)
    assert b["_sum_of_steps"] == {"median": 145.0, "n": 2}
    assert b["_unaccounted"] == {"median": 5.0, "n": 1}


def test_timing_breakdown_of_a_log_without_steps_is_empty():
    assert timing.breakdown("cbatchd: listening\n") == {}


def test_scaling_levels():
    assert scaling.levels_up_to(64) == [1, 2, 4, 8, 16, 32, 64]
    assert scaling.levels_up_to(4) == [1, 2, 4]
    assert scaling.levels_up_to(6) == [1, 2, 4, 6]
    assert scaling.levels_up_to(0) == [1]


def _s(median):
    return {"median": median, "min": median, "max": median, "n": 1, "values": [median]}


def _scaling_result():
    return {"levels": [1, 2, 4],
            "latency_ms": {"native": {"1": _s(2.0), "2": _s(2.5), "4": _s(3.0)},
                           "runc": {"1": _s(45.0), "2": _s(60.0), "4": _s(None)},
                           "cbatch_direct_c<&>": {"1": _s(80.0), "2": _s(120.0), "4": _s(300.0)}},
            "daemon_cpu_ms_per_job": {"cbatch_direct_c<&>": {"1": 12.0, "2": 11.0, "4": 10.5}},
            "burst_s": {}}


def test_svg_is_valid_xml_with_a_line_per_mode_and_escaped_names():
    doc = plot.svg(_scaling_result())
    root = ET.fromstring(doc)
    lines = root.findall(f"{SVG}polyline")
    assert len(lines) == 4          # three latency lines, one CPU line
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "cbatch_direct_c<&>" in texts        # escaped in the file, the same text once parsed
    assert "<&>" not in doc


def test_svg_latency_is_higher_on_the_page_for_slower_modes_and_skips_missing_points():
    root = ET.fromstring(plot.svg(_scaling_result()))
    latency = root.findall(f"{SVG}polyline")[:3]
    by_mode = [[tuple(map(float, p.split(","))) for p in line.get("points").split()] for line in latency]
    native, runc, direct = by_mode
    assert len(runc) == 2                       # the level without a value is not drawn
    assert native[0][0] == direct[0][0] < direct[1][0] < direct[2][0]      # x grows with the level
    assert direct[0][1] < runc[0][1] < native[0][1]                         # y shrinks as ms grow
    assert plot.points(_scaling_result())["runc"] == [(1, 45.0), (2, 60.0)]


def test_svg_without_data_says_so():
    root = ET.fromstring(plot.svg({}))
    assert [t.text for t in root.iter(f"{SVG}text")].count("no data") == 2
    assert root.findall(f"{SVG}polyline") == []


def _results():
    def lat(**ms):
        return {m: _s(v) for m, v in ms.items()}
    return {
        "latency": {"reps": 3,
                    "latency_ms": lat(native=2.0, docker_run=300.0, cbatch_docker_py=330.0,
                                      cbatch_direct_c=80.0, runc=45.0),
                    "exit_ms": lat(native=3.0), "job_wall_ms": lat(native=10.0),
                    "daemon_trace_ms": {}, "profile": {},
                    "timing_ms": {"direct.rootfs": _s(4.0), "_sum_of_steps": {"median": 4.0, "n": 1}}},
        "throughput": {"count": 4, "jobs_per_s": {"c1": {"native": 20.0, "docker_run": 2.0,
                                                         "cbatch_docker_py": 1.5, "cbatch_direct_c": 7.0}},
                       "cpu_ms_per_job": {}},
        "footprint": {"cbatch_modes": {
            "cbatch_docker_py": {"jobs": 2, "rss_mib": _s(10.2), "pss_mib": _s(4.0), "shim_rss_mib": _s(None),
                                 "shim_pss_mib": _s(None), "daemon_idle": {"rss": 36.0},
                                 "daemon_before": {"rss": 37.0}, "daemon": {"rss": 38.0},
                                 "daemon_growth_per_job_mib": 0.5},
            "cbatch_direct_c": {"jobs": 2, "rss_mib": _s(0.6), "pss_mib": _s(0.2), "shim_rss_mib": _s(None),
                                "shim_pss_mib": _s(None), "daemon_idle": {"rss": 36.0},
                                "daemon_before": {"rss": 37.0}, "daemon": {"rss": 37.5},
                                "daemon_growth_per_job_mib": 0.25}},
            "docker_run": {"jobs": 2, "rss_mib": _s(38.0), "pss_mib": _s(12.0), "shim_rss_mib": _s(7.0),
                           "shim_pss_mib": _s(2.0)}},
        "scaling": _scaling_result(),
        "clicalls": {"error": "RuntimeError: boom"},
    }


def _doc():
    return report.headline(_results(), 0.0, {"latency_reps": 3},
                           ["native", "docker_run", "cbatch_docker_py", "cbatch_direct_c"],
                           {"cbatch_direct_py": "not available: because"}, "cbatch_direct_c")


def test_headline_targets_per_mode():
    doc = _doc()
    t = doc["targets"]
    assert t["start_cbatch_direct_c_vs_runc"]["value"] == pytest.approx(80 / 45, abs=0.001)
    assert t["start_cbatch_direct_c_vs_runc"]["met"] is True
    assert t["start_cbatch_direct_c_vs_docker_run"]["met"] is True              # 80 / 300 <= 1/3
    assert t["start_cbatch_docker_py_vs_docker_run"]["met"] is False            # 1.1
    assert "start_cbatch_docker_py_vs_runc" not in t
    assert t["throughput_c1_cbatch_direct_c"]["value"] == 3.5
    assert t["throughput_c1_cbatch_direct_c"]["met"] is True
    assert t["throughput_c1_cbatch_docker_py"]["met"] is False
    assert t["starter_rss_cbatch_direct_c"]["met"] is True
    assert t["starter_rss_cbatch_docker_py"]["met"] is False
    assert t["mode_cbatch_direct_py"] == {"target": "measured", "value": None, "met": None,
                                          "note": "not available: because"}
    assert t["output"]["met"] is None and t["output"]["target"].startswith("cbatch_direct_c")
    assert doc["daemon_growth_per_job_mib"] == {"cbatch_docker_py": 0.5, "cbatch_direct_c": 0.25}
    assert doc["errors"] == {"clicalls": "RuntimeError: boom"}
    assert doc["scaling_latency_ms"]["runc"] == {"1": 45.0, "2": 60.0, "4": None}
    assert doc["timing_breakdown_ms"]["direct.rootfs"] == 4.0
    json.dumps(doc)


def test_markdown_lists_missing_modes_tables_and_the_plot(tmp_path):
    doc = _doc()
    md = reportmd.markdown(doc)
    assert "- cbatch_direct_py: not available: because" in md
    assert "| mode_cbatch_direct_py | measured | n/a | not available: because |" in md
    assert "| c1 | 20.0 | 2.0 | 1.5 | 7.0 | 0.75 | 3.5 |" in md
    assert "| direct.rootfs | 1 | 4 (4–4) |" in md
    assert "![start latency and cbatchd CPU against concurrent starts](scaling.svg)" in md
    assert "| runc | 45.0 | 60.0 | n/a |" in md
    assert "| cbatch_direct_c | 2 | 36.0 | 37.0 | 37.5 | 0.25 |" in md
    assert "- clicalls: RuntimeError: boom" in md
    report.write(doc, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["modes"][-1] == "cbatch_direct_c"
    assert (tmp_path / "results.md").read_text() == md


def test_markdown_of_an_empty_run_still_renders():
    doc = report.headline({}, 0.0, {}, [], {}, None)
    md = reportmd.markdown(doc)
    assert md.startswith("# cbatch benchmark results")


def test_fallbacks_to_docker_are_found_and_reported():
    log = ("cbatchd: WARNING container cbatch-1_x-abc: engine docker instead of direct: no runc at /x\n"
           "cbatchd: container cbatch-2: started\n")
    assert timing.fallbacks(log) == ["no runc at /x"]
    results = _results()
    results["latency"]["direct_fallbacks"] = timing.fallbacks(log)
    doc = report.headline(results, 0.0, {}, ["native", "docker_run", "cbatch_direct_c"], {}, "cbatch_direct_c")
    assert doc["direct_fallbacks"] == 1
    assert "fell back to the docker engine (cbatchd's log: no runc at /x)" in reportmd.markdown(doc)


def test_readme_table_has_a_column_per_mode_and_the_scaling_top():
    table = reportmd.readme_table(_doc()).splitlines()
    assert table[0] == "| | native | docker run | runc | cbatch docker py | cbatch direct c |"
    assert table[2] == "| start latency, ms (median) | 2.0 | 300.0 | 45.0 | 330.0 | 80.0 |"
    assert "| throughput, jobs/s at 1 in flight | 20.0 | 2.0 | n/a | 1.5 | 7.0 |" in table
    assert "| starter RSS, MiB | n/a | 38.0 | n/a | 10.2 | 0.6 |" in table
    assert "| start latency with 4 starting at once, ms | 3.0 | n/a | n/a | n/a | n/a |" in table
