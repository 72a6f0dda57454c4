"""The benchmark's bar charts (bench/charts.py): one readable PNG per results table, showing that table's numbers.

They are drawn from the last run's bench/results.json (written by `make bench`
and versioned with bench/results.md) into a temporary folder, never into
bench/charts/, and no benchmark runs.
"""

from __future__ import annotations

import importlib.util
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from matplotlib import image as mpimg
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_charts():
    spec = importlib.util.spec_from_file_location("bench_charts", ROOT / "bench" / "charts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


charts = load_charts()


@pytest.fixture(scope="module")
def results() -> dict:
    return json.loads(RESULTS.read_text())


@pytest.fixture(scope="module")
def drawn(results: dict, tmp_path_factory: pytest.TempPathFactory):
    outdir = tmp_path_factory.mktemp("charts")
    return outdir, charts.draw_charts(results, outdir)


def compared(key: str) -> str:
    """The field a table compares: the idle tables measure memory, all the others a rate."""
    return "rss_mb" if key.startswith("idle-") else "rate"


def assert_readable_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert 600 <= width <= 1000 and 300 <= height <= 600, (path, width, height)
    assert mpimg.imread(path).shape[:2] == (height, width)
    assert path.stat().st_size < 100_000, (path, path.stat().st_size)


def test_one_png_per_results_table(results: dict, drawn) -> None:
    outdir, made = drawn
    assert results, "bench/results.json holds no table"
    assert sorted(p.name for p in outdir.iterdir()) == sorted(f"{key}.png" for key in results)
    assert [chart.key for chart in made] == list(results)
    for chart in made:
        assert chart.path == outdir / f"{chart.key}.png"
        assert_readable_png(chart.path)


def test_each_chart_shows_its_tables_numbers(results: dict, drawn) -> None:
    _, made = drawn
    for chart in made:
        table = results[chart.key]
        field = compared(chart.key)
        assert chart.labels == list(table), chart.key  # every server of the table, in its order
        for name, value, low, high, printed in zip(chart.labels, chart.values, chart.lows, chart.highs,
                                                   chart.printed):
            measured = [run[field] for run in table[name] if field in run]
            if not measured:
                assert value is None and printed == "failed", (chart.key, name)
                continue
            assert value == pytest.approx(statistics.median(measured)), (chart.key, name)
            assert (low, high) == pytest.approx((min(measured), max(measured))), (chart.key, name)
            assert float(printed.replace(",", "")) == pytest.approx(value, abs=0.51), (chart.key, name, printed)


def test_titles_say_what_was_measured_and_with_how_many_connections(results: dict, drawn) -> None:
    _, made = drawn
    for chart in made:
        count = int(re.search(r"-(\d+)$", chart.key).group(1))
        assert f"{count:,}" in chart.title, (chart.key, chart.title)
        assert ("memory" in chart.title.lower()) == chart.key.startswith("idle-"), chart.title
        assert chart.unit == ("MB RSS" if chart.key.startswith("idle-") else
                              "conn/s" if chart.key.startswith("connrate-") else "msg/s")


def test_a_failed_server_and_an_older_revision_still_get_a_row(tmp_path: Path) -> None:
    """What a run with --against, where one server never started, gives: every name on the chart."""
    rounds = [{"rate": 1000.0 * (i + 1), "seconds": 3.0} for i in range(3)]
    results = {"pingpong-50": {"netpool-events": rounds, "asyncio": rounds[:2],
                               "netpool-events@abc1234": [{"error": "RuntimeError: did not start"}]}}
    (chart,) = charts.draw_charts(results, tmp_path)
    assert chart.labels == list(results["pingpong-50"])
    assert chart.values[0] == pytest.approx(statistics.median(r["rate"] for r in rounds))
    assert chart.values[2] is None and chart.printed[2] == "failed"
    assert_readable_png(chart.path)


def test_runnable_alone_from_an_existing_results_json(results: dict, tmp_path: Path) -> None:
    """python bench/charts.py RESULTS.json OUTDIR redraws without running anything."""
    some = dict(list(results.items())[:2])
    source = tmp_path / "run.json"
    source.write_text(json.dumps(some))
    outdir = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "charts.py"), str(source), str(outdir)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in outdir.iterdir()) == sorted(f"{key}.png" for key in some)
    for path in outdir.iterdir():
        assert_readable_png(path)
