"""bench/report.py: markdown from small hand-built pytest-benchmark JSON documents."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

REPORT_PATH = Path(__file__).resolve().parents[1] / "bench" / "report.py"


@pytest.fixture(scope="module")
def report():
    # bench/ is not a package and `make bench` runs report.py as a script: load it from its path.
    spec = importlib.util.spec_from_file_location("bench_report", REPORT_PATH)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up in sys.modules while the class is built.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def bench(file: str, median_ms: float | None, **info) -> dict:
    extra = {"device": "cpu", "device_name": "cpu-test-2c", "dtype": "float32", "timer": "perf_counter", **info}
    if median_ms is not None:
        extra["median_ms"] = median_ms
    return {"fullname": f"bench/test_bench_{file}.py::test_case[{info.get('impl', 'x')}]", "extra_info": extra}


def document(*benchmarks) -> dict:
    return {"benchmarks": list(benchmarks), "machine_info": {"cpu": {"brand_raw": "Test CPU"}},
            "commit_info": {"id": "0123456789abcdef", "dirty": False}, "datetime": "2026-11-21T12:00:00"}


def lora(impl: str, mode: str, median_ms: float, stage: int = 3, layer: str = "proj", **extra) -> dict:
    c = 384 if stage == 3 else 768
    return bench("lora", median_ms, impl=impl, mode=mode, stage=stage, layer=layer, batch=1,
                 tokens=(28 if stage == 3 else 14) ** 2, in_features=c, out_features=c if layer == "proj" else 4 * c,
                 tasks=4, ranks=[64, 4, 4, 4, 4], backend="cpp" if impl.startswith("fused") else None, **extra)


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The cells of the first table after ``### heading``."""
    section = markdown.split(f"### {heading}\n", 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            break
    return rows


def render(report, doc, detail=False) -> str:
    return "\n\n".join(report.render_result(report.load_data(doc, "results.json"), detail)) + "\n"


def test_lora_table_columns_and_speedups(report):
    doc = document(
        lora("mtlora-loop", "fwd", 6.0), lora("fused", "fwd", 2.0), lora("peft", "fwd", 12.0),
        lora("fused-cpp", "fwd", 2.5),
        lora("mtlora-loop", "fwdbwd", 9.0), lora("fused", "fwdbwd", 4.5),
        lora("mtlora-loop", "fwd", 3.0, stage=4, layer="fc1"), lora("fused", "fwd", 1.2, stage=4, layer="fc1"),
    )
    md = render(report, doc)
    assert md.startswith("**cpu-test-2c (Test CPU)**, float32, timer: perf_counter; 2026-11-21T12:00:00, "
                         "commit 0123456789; source `results.json`")
    assert "(T = 4, shared rank 64, task rank 4): median time and speed-up over the MTLoRA-style eager loop " \
           "(`mtlora-loop`)." in md
    rows = table_rows(md, "Multi-task LoRA linear")
    # The op, its forced backends, then the baselines; fwd cases before fwdbwd.
    assert rows[0] == ["mode", "case", "fused", "fused-cpp", "mtlora-loop", "peft"]
    assert rows[1] == ["---", "---", "---:", "---:", "---:", "---:"]
    assert rows[2] == ["fwd", "stage 3 proj 384→384, 1×28²", "2.000 ms (3.00×)", "2.500 ms (2.40×)", "6.000 ms",
                       "12.000 ms (0.50×)"]
    assert rows[3] == ["fwd", "stage 4 fc1 768→3072, 1×14²", "1.200 ms (2.50×)", "–", "3.000 ms", "–"]
    assert rows[4] == ["fwdbwd", "stage 3 proj 384→384, 1×28²", "4.500 ms (2.00×)", "–", "9.000 ms", "–"]
    assert len(rows) == 5


def test_lora_detail_rows(report):
    md = render(report, document(lora("mtlora-loop", "fwd", 6.0, gbps=1.5), lora("fused", "fwd", 2.0, gbps=4.5)),
                detail=True)
    detail = [line for line in md.splitlines() if line.startswith("| fwd |") and "| cpp |" in line]
    assert detail == ["| fwd | stage 3 proj 384→384, 1×28² | fused | cpp | 2.000 | 3.00× | 4.5 | – | – | – | – | – |"]


def test_missing_baseline_gives_times_without_speedups(report):
    md = render(report, document(lora("fused", "fwd", 2.0), lora("peft", "fwd", 8.0)))
    rows = table_rows(md, "Multi-task LoRA linear")
    assert rows[0] == ["mode", "case", "fused", "peft"]
    assert rows[2][2:] == ["2.000 ms", "8.000 ms"]
    assert "no baseline implementation among `fused`, `peft`" in md


def test_unknown_suite_generic_rendering(report):
    doc = document(*(
        bench("widget", ms, impl=impl, mode="fwd", size=size, tasks=4, backend=backend, first_call_s=0.1,
              gbps=1.0, speedup_vs_x=2.0)
        for impl, backend, size, ms in [("fused", "cpp", 8, 1.0), ("widget-loop", None, 8, 4.0),
                                        ("widget-loop-compiled", None, 8, 2.0),
                                        ("fused", "cpp", 16, 5.0), ("widget-loop", None, 16, 10.0)]))
    md = render(report, doc)
    assert "### widget\n" in md
    assert "speed-up over the eager loop or reference (`widget-loop`)" in md
    rows = table_rows(md, "widget")
    # The case label is what varies within an implementation: not the backend, tasks or measurements.
    assert rows[0] == ["mode", "case", "fused", "widget-loop", "widget-loop-compiled"]
    assert rows[2] == ["fwd", "size 8", "1.000 ms (4.00×)", "4.000 ms", "2.000 ms (2.00×)"]
    assert rows[3] == ["fwd", "size 16", "5.000 ms (2.00×)", "10.000 ms", "–"]


def test_suite_key_and_variant_columns(report):
    # extra_info["suite"] names the suite; "variant" stands in for "impl"; no mode column.
    doc = document(*(
        {"fullname": f"bench/test_bench_other_file.py::t[{v}-{b}]",
         "extra_info": {"suite": "timesteps", "variant": v, "batch": b, "k": 4, "latent_side": 32,
                        "median_ms": ms, "device": "cpu", "device_name": "cpu-test-2c", "dtype": "float32"}}
        for v, b, ms in [("sequential-unet", 1, 40.0), ("sequential", 1, 20.0), ("batched", 1, 10.0),
                         ("sequential-unet", 2, 60.0), ("batched", 2, 12.0)]))
    md = render(report, doc)
    rows = table_rows(md, "Diffusion features at k timesteps")
    assert rows[0] == ["case", "sequential-unet", "sequential", "batched"]
    assert rows[2] == ["B1 4×32×32, k = 4", "40.000 ms", "20.000 ms (2.00×)", "10.000 ms (4.00×)"]
    assert rows[3] == ["B2 4×32×32, k = 4", "60.000 ms", "–", "12.000 ms (5.00×)"]
    assert "### other_file" not in md


def test_attn_sdpa_group_has_its_own_baseline(report):
    shape = dict(layer="sd1-16x16", batch=1, heads=8, tokens=256, head_dim=40, concepts=77, mode="fwd")
    doc = document(*(bench("attn_aggregate", ms, impl=impl, includes_sdpa=impl.startswith("sdpa"), **shape)
                     for impl, ms in [("fused", 1.0), ("reference", 3.0), ("sdpa+probs", 8.0),
                                      ("sdpa-lse+fused", 2.0)]))
    rows = table_rows(render(report, doc), "Attention-mask aggregation")
    assert rows[0] == ["mode", "case", "fused", "reference", "sdpa+probs", "sdpa-lse+fused"]
    assert rows[2] == ["fwd", "sd1-16x16 B1 H8 L256 d40 N77", "1.000 ms (3.00×)", "3.000 ms", "8.000 ms",
                       "2.000 ms (4.00×)"]


def test_skill_adapter_falls_back_to_its_loop(report):
    base = dict(mode="fwdbwd", stage=4, layer="fc1", batch=1, tokens=196, in_features=768, out_features=3072)
    doc = document(bench("skill_adapter", 2.0, impl="fused", **base),
                   bench("skill_adapter", 7.0, impl="tdss-loop", **base),
                   bench("skill_adapter", 5.0, impl="tdss-loop-compiled", **base))
    md = render(report, doc)
    rows = table_rows(md, "TDSS skill-gated transform")
    assert rows[2] == ["fwdbwd", "stage 4 fc1 768→3072, 1×14²", "2.000 ms (3.50×)", "7.000 ms", "5.000 ms (1.40×)"]


def test_tts_shows_share_of_training_step(report):
    info = dict(suite="tts", k=4, batch=2, latent=[4, 16, 16], widths=[32, 64], max_candidates=8, goal_pct=10.0)
    doc = document(bench("tts", 50.0, case="train-step", train_step_ms=None, **info),
                   bench("tts", 2.0, case="tts-round-cached-first-accept", train_step_ms=50.0,
                         round_over_step_pct=4.04, candidates_drawn=1, **info))
    rows = table_rows(render(report, doc), "Task-aware timestep selection round")
    assert rows[0] == ["case", "median"]
    assert rows[2] == ["train-step", "50.000 ms"]
    assert rows[3] == ["tts-round-cached-first-accept", "2.000 ms (4.0 % of a step)"]


def test_synthetic_throughput_and_untimed_rows_skipped(report):
    doc = document(
        bench("synthetic", 320.0, suite="synthetic", case="single", resolution=128, images=64, tasks=12,
              images_per_s=200.0, images_per_cpu_s=190.4),
        bench("synthetic", 900.0, suite="synthetic", case="workers2", resolution=128, images=256, tasks=12,
              images_per_s=284.4),
        bench("synthetic", None, suite="synthetic", case="single", resolution=256, images=16, tasks=12),
        bench("lora", None, impl="fused", mode="fwd"),  # --benchmark-disable: no median
    )
    md = render(report, doc)
    assert "Multi-task LoRA" not in md
    rows = table_rows(md, "SyntheticScenes throughput")
    assert rows[0] == ["case", "images/s", "median ms per round", "images per CPU-s"]
    assert rows[2:] == [["single, 128×128, 64 images", "200", "320.0", "190"],
                        ["workers2, 128×128, 256 images", "284", "900.0", "–"]]


def test_lora_first_then_known_then_unknown(report):
    doc = document(bench("zeta", 1.0, impl="a", n=1), bench("synthetic", 10.0, suite="synthetic", case="single",
                                                             resolution=64, images=4, images_per_s=400.0),
                   bench("q_sample", 1.0, impl="fused", mode="fwd", batch=1, latent=[4, 64, 64], k=4,
                         noise="shared"),
                   bench("q_sample", 3.0, impl="diffusers-loop", mode="fwd", batch=1, latent=[4, 64, 64], k=4,
                         noise="shared"),
                   lora("mtlora-loop", "fwd", 6.0))
    md = render(report, doc)
    headings = re.findall(r"^### (.*)$", md, re.M)
    assert headings == ["Multi-task LoRA linear", "Multi-timestep noising (q_sample_multi)",
                        "SyntheticScenes throughput", "zeta"]
    assert table_rows(md, "Multi-timestep noising (q_sample_multi)")[2] == [
        "fwd", "B1 4×64×64, k = 4, shared noise", "1.000 ms (3.00×)", "3.000 ms"]


def test_empty_file(report):
    assert report.render_result(report.load_data({"benchmarks": []}, "x.json")) == [
        "`x.json`: no timed benchmarks in this file."]


def test_readme_block_replaced_and_cli(report, tmp_path):
    results = tmp_path / "cpu.json"
    results.write_text(json.dumps(document(lora("mtlora-loop", "fwd", 6.0), lora("fused", "fwd", 2.0))))
    readme = tmp_path / "README.md"
    before, after = "# Title\n\nintro\n\n", "\n\n## Tests\n\nend\n"
    readme.write_text(before + report.README_BEGIN + "\nold table\n| a |\n" + report.README_END + after)
    out = tmp_path / "table.md"
    assert report.main([str(results), "--readme", str(readme), "-o", str(out)]) == 0
    table = out.read_text()
    assert "| fwd | stage 3 proj 384→384, 1×28² | 2.000 ms (3.00×) | 6.000 ms |" in table
    assert readme.read_text() == before + report.README_BEGIN + "\n" + table.rstrip() + "\n" + report.README_END + after
    # Running it again changes nothing.
    report.main([str(results), "--readme", str(readme)])
    assert readme.read_text() == before + report.README_BEGIN + "\n" + table.rstrip() + "\n" + report.README_END + after


def test_readme_without_markers_is_an_error(report, tmp_path):
    results = tmp_path / "cpu.json"
    results.write_text(json.dumps(document(lora("fused", "fwd", 2.0))))
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\n" + report.README_BEGIN + "\nno end marker\n")
    with pytest.raises(SystemExit, match="markers .* not found"):
        report.main([str(results), "--readme", str(readme)])
    assert readme.read_text() == "# Title\n\n" + report.README_BEGIN + "\nno end marker\n"


def test_suites_are_named_after_op_families_and_old_names_still_read(report):
    shape = dict(mode="fwd", batch=1, latent=[4, 64, 64], k=4, noise="shared")
    old = render(report, document(bench("q_sample", 1.0, impl="fused", **shape),
                                  bench("q_sample", 3.0, impl="diffusers-loop", **shape)))
    new = render(report, document(bench("q_sample_multi", 1.0, impl="fused", **shape),
                                  bench("other_file", 3.0, impl="diffusers-loop", suite="q_sample_multi", **shape)))
    assert old == new
    assert table_rows(new, "Multi-timestep noising (q_sample_multi)")[2] == [
        "fwd", "B1 4×64×64, k = 4, shared noise", "1.000 ms (3.00×)", "3.000 ms"]
    assert set(report.RENAMED_SUITES.values()) <= set(report.SUITES)
    assert {"lora", "dtf", "attn_mask_aggregate", "skill_gated_transform", "q_sample_multi"} <= set(report.SUITES)


def test_committed_results_render_as_the_readme_table(report):
    # The README's table is generated from the committed file, which may predate the op-family suite names,
    # with links (from the README's folder) to the charts committed next to it.
    root = REPORT_PATH.parents[1]
    path = "bench/results/cpu-intel-xeon-2c.json"
    data = json.loads((root / path).read_text())
    readme = (root / "README.md").read_text()
    block = readme.split(report.README_BEGIN + "\n", 1)[1].split("\n" + report.README_END, 1)[0]
    charts = report.chart_links(root / path, root)
    assert "\n\n".join(report.render_result(report.load_data(data, path), charts=charts)) in block
    for _, link in charts:
        assert (root / link).is_file()


# ----------------------------------------------------------------------------- memory
def test_memory_in_cells_detail_and_note(report):
    doc = document(lora("mtlora-loop", "fwd", 6.0, memory_over_inputs_mb=12.25),
                   lora("fused", "fwd", 2.0, memory_over_inputs_mb=3.5, memory_source="profiler memory events"),
                   lora("fused-cpp", "fwd", 2.5, memory_over_inputs_mb=0.125), lora("peft", "fwd", 12.0))
    md = render(report, doc)
    assert "after · the call's peak memory over its inputs." in md
    rows = table_rows(md, "Multi-task LoRA linear")
    # memory_source is bookkeeping, not part of the case; a row without a figure gets none.
    assert rows[0] == ["mode", "case", "fused", "fused-cpp", "mtlora-loop", "peft"]
    assert rows[2] == ["fwd", "stage 3 proj 384→384, 1×28²", "2.000 ms (3.00×) · 3.5 MB",
                       "2.500 ms (2.40×) · 0.12 MB", "6.000 ms · 12.2 MB", "12.000 ms (0.50×)"]
    detail = render(report, doc, detail=True)
    assert "| max mem MB | mem over inputs MB |" in detail
    line = next(row for row in detail.splitlines() if row.startswith("| fwd |") and "| fused | cpp |" in row)
    assert line.endswith("| – | 3.5 |")


def test_memory_column_in_throughput_table(report):
    doc = document(bench("synthetic", 320.0, suite="synthetic", case="single", resolution=128, images=64, tasks=12,
                         images_per_s=200.0, memory_over_inputs_mb=150.4))
    rows = table_rows(render(report, doc), "SyntheticScenes throughput")
    assert rows[0] == ["case", "images/s", "median ms per round", "memory MB"]
    assert rows[2] == ["single, 128×128, 64 images", "200", "320.0", "150"]


def _attn(impl, mode, ms, tokens, mb):
    return bench("attn_mask_aggregate", ms, impl=impl, mode=mode, layer=f"sd-{tokens}", batch=1, heads=8,
                 tokens=tokens, head_dim=40, concepts=77, includes_sdpa=False, memory_over_inputs_mb=mb)


def test_chart_data_speedups_and_memory_sweep(report):
    doc = document(lora("mtlora-loop", "fwd", 6.0), lora("fused", "fwd", 2.0), lora("fused-cpp", "fwd", 3.0),
                   lora("mtlora-loop", "fwd", 4.0, stage=4), lora("fused", "fwd", 5.0, stage=4),
                   _attn("reference", "fwd", 4.0, 1024, 40.0), _attn("fused", "fwd", 1.0, 1024, 2.0),
                   _attn("reference", "fwd", 1.0, 256, 3.0), _attn("fused", "fwd", 0.5, 256, 0.5))
    result = report.load_data(doc, "x.json")
    panels = {title: (labels, bars) for title, labels, bars in report.speedup_panels(result)}
    labels, bars = panels["Multi-task LoRA linear"]
    assert labels == ["fwd · stage 3 proj 384→384, 1×28²", "fwd · stage 4 proj 768→768, 1×14²"]
    assert bars == {"fused": [3.0, 0.8], "fused-cpp": [2.0, None]}  # the baseline gets no bar
    assert panels["Attention-mask aggregation"][1] == {"fused": [4.0, 2.0]}
    memory = report.memory_panels(result)
    # Only suites that sweep a size, and only rows with a memory figure (the LoRA rows have none).
    assert memory == [("Attention-mask aggregation (fwd)", "tokens L",
                       {"reference": [(256.0, 3.0), (1024.0, 40.0)], "fused": [(256.0, 0.5), (1024.0, 2.0)]})]


def test_plot_writes_charts_and_readme_links_them(report, tmp_path):
    pytest.importorskip("matplotlib", reason="bench/report.py --plot needs matplotlib (pip install matplotlib)")
    results = tmp_path / "results" / "cpu.json"
    results.parent.mkdir()
    results.write_text(json.dumps(document(
        lora("mtlora-loop", "fwd", 6.0, memory_over_inputs_mb=12.0),
        lora("fused", "fwd", 2.0, memory_over_inputs_mb=3.0),
        _attn("reference", "fwd", 4.0, 1024, 40.0), _attn("fused", "fwd", 1.0, 1024, 2.0),
        _attn("reference", "fwd", 1.0, 256, 3.0), _attn("fused", "fwd", 0.5, 256, 0.5))))
    readme = tmp_path / "README.md"
    readme.write_text(report.README_BEGIN + "\n" + report.README_END + "\n")
    assert report.main([str(results), "--plot", "--readme", str(readme)]) == 0
    for kind in ("speedup", "memory"):
        png = tmp_path / "results" / f"cpu-{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert f"![{report.CHARTS[kind]}](results/cpu-{kind}.png)" in readme.read_text()


def test_plot_without_memory_figures_writes_only_the_speedups(report, tmp_path):
    pytest.importorskip("matplotlib", reason="bench/report.py --plot needs matplotlib (pip install matplotlib)")
    results = tmp_path / "cpu.json"
    results.write_text(json.dumps(document(lora("mtlora-loop", "fwd", 6.0), lora("fused", "fwd", 2.0))))
    assert report.plot_result(report.load(results), results) == [tmp_path / "cpu-speedup.png"]
    assert not (tmp_path / "cpu-memory.png").exists()


def test_plot_without_matplotlib_says_what_to_install(report, tmp_path, monkeypatch):
    results = tmp_path / "cpu.json"
    results.write_text(json.dumps(document(lora("mtlora-loop", "fwd", 6.0), lora("fused", "fwd", 2.0))))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(SystemExit, match="needs matplotlib: pip install matplotlib"):
        report.main([str(results), "--plot"])
