"""Bar charts of a benchmark run: one PNG per table of bench/results.md, drawn from bench/results.json.

bench/run.py calls :func:`draw_charts` after writing its report, and the
report shows each chart under its table. To redraw from an existing
results.json without running any benchmark::

    python bench/charts.py [results.json] [outdir]

The default is bench/results.json into bench/charts/ (for another X.json,
X-charts/ beside it). Each chart is a horizontal bar per server: the median
of the rounds, a thin line for their min-max spread, the median written at
the end; netpool in blue, the references in grey. The footnote gives the
rounds, the seconds per run, and the machine and date from the report beside
the JSON (X.md), when there is one.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; only the Agg canvas below is used, never pyplot

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
from PIL import Image  # noqa: E402 - matplotlib's own dependency

HERE = Path(__file__).resolve().parent
SIZE = (8.0, 4.5)  # inches: 800x450 px at DPI
DPI = 100
NETPOOL = "#1f6fb4"
NETPOOL_OTHER = "#8fb8de"  # netpool as of another revision (run.py --against)
REFERENCE = "#9a9a9a"
SPREAD = "#333333"

# What each kind of table measures, by the prefix of its key in results.json
# (bench/run.py's Config.key): the field compared, the unit, the axis label,
# and whether more is better.
KINDS = {
    "idle": ("rss_mb", "MB RSS", "server's resident memory (MB RSS), lower is better", False),
    "connrate": ("rate", "conn/s", "connections per second (conn/s), higher is better", True),
}
PINGPONG = ("rate", "msg/s", "echoed messages per second (msg/s), higher is better", True)


@dataclass
class Chart:
    """One drawn chart: what it shows, bar by bar from the top (read back from the figure), and where it went."""

    key: str
    title: str
    path: Path
    unit: str
    labels: list[str]
    values: list[float | None]  # the bars' lengths: each server's median; None where every round failed
    lows: list[float | None]  # the ends of the min-max line
    highs: list[float | None]
    printed: list[str]  # the figure written at the end of each bar ("failed" where there is none)


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def title_for(key: str) -> str:
    """What a table measured, with how many connections, from its key (pingpong-50, blocking-1ms-1000, ...)."""
    kind, _, rest = key.partition("-")
    ms, _, n = rest.rpartition("-")
    ms = ms.removesuffix("ms")
    if not n.isdigit():
        return key
    conns = plural(int(n), "connection")
    titles = {
        "pingpong": f"64-byte echo ping-pong, {conns}",
        "connrate": f"Connection rate (connect, echo, close), {int(n):,} parallel slots",
        "idle": f"Memory holding {plural(int(n), 'idle connection')}",
        "tls": f"TLS 64-byte echo ping-pong, {conns}",
        "redis": f"Ping-pong, handler does a redis-py GET, {conns}",
        "blocking": f"Ping-pong, handler blocks {ms} ms per message, {conns}",
        "mixed": (f"Ping-pong, half the connections block {ms} ms, {conns}" if ms not in ("", "0")
                  else f"Mixed ping-pong, nothing blocks (baseline), {conns}"),
    }
    return titles.get(kind, key)


def kind_of(key: str) -> tuple[str, str, str, bool]:
    """(field compared, unit, axis label, higher is better) for a table's key."""
    return KINDS.get(key.partition("-")[0], PINGPONG)


def format_value(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:,.1f}"


def run_facts(machine: str, date: str = "") -> str:
    """The footnote's line about the run: ``machine`` as bench/run.py describes it, ``date`` as YYYY-MM-DD."""
    return (f"Run on {date}: " if date else "Machine: ") + machine.rstrip(".")


def report_facts(report: Path) -> str:
    """:func:`run_facts` from the Machine and Run lines of a bench/run.py report (results.md); "" without one."""
    try:
        text = report.read_text()
    except OSError:
        return ""
    machine = re.search(r"^Machine: (.*)$", text, re.M)
    when = re.search(r"^Run: .* on (\d{4}-\d\d-\d\d) ", text, re.M)
    return run_facts(machine.group(1), when.group(1) if when else "") if machine else ""


def summarise(runs_by_server: dict[str, list[dict]], field: str):
    """Per server, in the JSON's order: (name, median, min, max), the numbers None where no round has ``field``."""
    rows = []
    for name, runs in runs_by_server.items():
        values = [r[field] for r in runs if field in r]
        if values:
            rows.append((name, statistics.median(values), min(values), max(values)))
        else:
            rows.append((name, None, None, None))
    return rows


def footnote(runs_by_server: dict[str, list[dict]], facts: str) -> str:
    runs = [r for rs in runs_by_server.values() for r in rs]
    rounds = max((len(rs) for rs in runs_by_server.values()), default=0)
    seconds = sorted({round(r["seconds"]) for r in runs if "seconds" in r})
    each = f" of {'/'.join(str(s) for s in seconds)} s each" if seconds else ""
    lines = [f"Bar: median of {plural(rounds, 'round')}{each}; line: min-max of the rounds."]
    return "\n".join(lines + textwrap.wrap(facts, 150))


def save_png(fig: Figure, path: Path) -> None:
    """The figure as a 256-colour PNG: a third of the bytes of matplotlib's own, the same bytes every draw."""
    fig.canvas.draw()
    width, height = (int(v) for v in fig.canvas.get_width_height())
    image = Image.frombuffer("RGBA", (width, height), fig.canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, format="PNG", optimize=True)


def draw_chart(key: str, runs_by_server: dict[str, list[dict]], path: Path, facts: str = "") -> Chart:
    field, unit, xlabel, _ = kind_of(key)
    rows = summarise(runs_by_server, field)
    title = title_for(key)
    fig = Figure(figsize=SIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ys = range(len(rows))
    top = max((hi for *_, hi in rows if hi is not None), default=1.0) or 1.0
    bars, spreads, printed = {}, {}, {}
    for y, (name, med, lo, hi) in zip(ys, rows):
        ours = name.startswith("netpool")
        colour = (NETPOOL_OTHER if "@" in name else NETPOOL) if ours else REFERENCE
        if med is None:
            printed[y] = ax.text(top * 0.012, y, "failed", va="center", ha="left", fontsize=9, color="#b00020")
            continue
        bars[y] = ax.barh(y, med, height=0.62, color=colour, zorder=2).patches[0]
        spreads[y] = ax.plot([lo, hi], [y, y], color=SPREAD, linewidth=1.2, solid_capstyle="butt", zorder=3)[0]
        printed[y] = ax.text(max(med, hi) + top * 0.012, y, format_value(med), va="center", ha="left", fontsize=9,
                             fontweight="bold" if ours else "normal", zorder=4)
    ax.set_yticks(list(ys), [name for name, *_ in rows], fontsize=10)
    for label in ax.get_yticklabels():
        if label.get_text().startswith("netpool"):
            label.set_fontweight("bold")
    ax.set_ylim(len(rows) - 0.5, -0.5)  # the first server of the table on top, a full row for a failed one
    ax.set_xlim(0, top * 1.16)  # room for the value after the longest bar
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.tick_params(axis="x", labelsize=9)
    ax.tick_params(axis="y", length=0)
    ax.grid(axis="x", color="#e3e3e3", linewidth=0.8, zorder=0)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel(xlabel, fontsize=10)
    ax.set_title(title, fontsize=12, fontweight="bold", loc="left", pad=10)
    note = footnote(runs_by_server, facts)
    fig.text(0.01, 0.012, note, fontsize=7, color="#555555", ha="left", va="bottom")
    # Leave the server names the width they take, and the footnote its lines.
    renderer = fig.canvas.get_renderer()
    names = max((t.get_window_extent(renderer).width for t in ax.get_yticklabels()), default=0.0)
    lines = note.count("\n") + 1
    fig.subplots_adjust(left=min(0.45, (names + 16) / fig.bbox.width), right=0.97, top=0.89,
                        bottom=0.135 + 0.028 * lines)
    save_png(fig, path)
    # What the figure shows, read back from it: the names on the axis, the bars' lengths, the spreads' ends.
    return Chart(key, ax.get_title(loc="left"), path, unit,
                 labels=[t.get_text() for t in ax.get_yticklabels()],
                 values=[bars[y].get_width() if y in bars else None for y in ys],
                 lows=[min(spreads[y].get_xdata()) if y in spreads else None for y in ys],
                 highs=[max(spreads[y].get_xdata()) if y in spreads else None for y in ys],
                 printed=[printed[y].get_text() for y in ys])


def draw_charts(results: dict[str, dict[str, list[dict]]], outdir: str | Path, facts: str = "") -> list[Chart]:
    """One PNG per table in ``results`` (results.json's data), as ``outdir/KEY.png``, in the tables' order.

    ``facts`` (the machine, the date) goes into each chart's footnote.
    """
    outdir = Path(outdir)
    return [draw_chart(key, runs, outdir / f"{key}.png", facts) for key, runs in results.items() if runs]


def default_outdir(results_json: Path) -> Path:
    """bench/results.json draws into bench/charts/; any other X.json into X-charts/ beside it."""
    if results_json.name == "results.json":
        return results_json.with_name("charts")
    return results_json.with_name(results_json.stem + "-charts")


def main(argv: list[str]) -> int:
    if len(argv) > 2 or any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    source = Path(argv[0]) if argv else HERE / "results.json"
    outdir = Path(argv[1]) if len(argv) > 1 else default_outdir(source)
    if not source.exists():
        print(f"{source} does not exist: make bench writes it", file=sys.stderr)
        return 2
    charts = draw_charts(json.loads(source.read_text()), outdir, report_facts(source.with_suffix(".md")))
    for chart in charts:
        print(chart.path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
