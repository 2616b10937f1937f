"""tools/main_job.py --update-docs: the run's table, plot and Visualizer grid into the docs."""

from __future__ import annotations

from tools import main_job


def test_update_docs_replaces_the_schedule_block_and_copies_plot_and_grid(tmp_path, monkeypatch):
    docs = tmp_path / "docs" / "benchmark.md"
    docs.parent.mkdir()
    docs.write_text("# B\n\n<!-- results:quick -->\nold\n<!-- /results:quick -->\n\ntail\n")
    monkeypatch.setattr(main_job, "DOCS", str(docs))
    run = tmp_path / "run"
    run.mkdir()
    (run / "benchmark.md").write_text("| Model | AP |\n|---|---|\n| A | 30.0 |\n")
    (run / "benchmark.png").write_bytes(b"plot")
    (run / "benchmark_grid.png").write_bytes(b"grid")
    main_job.update_docs(str(run), "quick")
    text = docs.read_text()
    assert "old" not in text and "| A | 30.0 |" in text and text.endswith("\n\ntail\n")
    assert "(benchmark_quick.png)" in text and "(benchmark_quick_grid.png)" in text
    assert (docs.parent / "benchmark_quick_grid.png").read_bytes() == b"grid"
    assert (docs.parent / "benchmark_quick.png").read_bytes() == b"plot"
