"""`llmserve bench --plot out.png`: throughput, time to first token and inter-token latency
against concurrency, one colour per system, from a run's results (or its JSON file).

Needs matplotlib (the `bench` extra); imported only here, so the bench runs without it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PERCENTILES = (("p50", "-"), ("p95", "--"), ("p99", ":"))


class PlotUnavailable(RuntimeError):
    pass


def _series(results: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[Mapping]]:
    """Results by (system, cell), each sorted by concurrency; a cell is the workload and
    cache state where a run had several of either, else empty."""
    cells = {(r.get("workload", "free"), r.get("cache", "cold")) for r in results}
    several_workloads = len({w for w, _ in cells}) > 1
    several_caches = len({c for _, c in cells}) > 1
    out: dict[tuple[str, str], list[Mapping]] = {}
    for r in results:
        parts = ([r.get("workload", "free")] if several_workloads else []) + \
                ([r.get("cache", "cold")] if several_caches else [])
        out.setdefault((r["system"], ", ".join(parts)), []).append(r)
    return {k: sorted(v, key=lambda r: r["concurrency"]) for k, v in out.items()}


def require_matplotlib() -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
    except ImportError as exc:
        raise PlotUnavailable("--plot needs matplotlib: pip install 'llmserve[bench]'") from exc


def figure(results: Sequence[Mapping[str, Any]], title: str | None = None) -> Figure:
    """Three panels side by side: output tok/s, TTFT percentiles, ITL percentiles."""
    require_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    series = _series(results)
    systems = list(dict.fromkeys(system for system, _ in series))
    colours = {s: f"C{i % 10}" for i, s in enumerate(systems)}
    cells = list(dict.fromkeys(cell for _, cell in series))
    markers = {c: "osD^v<>"[i % 7] for i, c in enumerate(cells)}
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    tok, ttft, itl = fig.subplots(1, 3)
    for (system, cell), rows in series.items():
        x = [r["concurrency"] for r in rows]
        style = {"color": colours[system], "marker": markers[cell]}
        label = f"{system} ({cell})" if cell else system
        tok.plot(x, [r["tok_s"] for r in rows], label=label, **style)
        for ax, key in ((ttft, "ttft_ms"), (itl, "itl_ms")):
            for i, (_, dash) in enumerate(PERCENTILES):
                points = [(c, r[key][i]) for c, r in zip(x, rows) if r[key][i] is not None]
                if points:
                    ax.plot(*zip(*points), linestyle=dash, **style)
    for ax, what in ((tok, "output tokens/s (all streams)"), (ttft, "time to first token (ms)"),
                     (itl, "inter-token latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(what)
        ax.grid(True, which="both", alpha=0.3)
        levels = sorted({r["concurrency"] for r in results})
        ax.set_xticks(levels, [str(c) for c in levels])
    for ax in (ttft, itl):
        ax.set_yscale("log")  # latencies span decades from 1 stream to many
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    tok.legend(fontsize="small")
    itl.legend(handles=[Line2D([], [], color="grey", linestyle=d, label=p)
                        for p, d in PERCENTILES], fontsize="small", title="percentile")
    if title:
        fig.suptitle(title)
    return fig


def save_plot(results: Sequence[Mapping[str, Any]], out: Path, title: str | None = None) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    figure(results, title).savefig(out, dpi=110)
    return out


def title_of(run: Mapping[str, Any]) -> str:
    """A one-line caption from a bench JSON file's header."""
    model = Path(str(run.get("model", "?"))).name
    return (f"{model}, {run.get('engine', '?')} engine, {run.get('max_tokens', '?')} tokens "
            f"per request, {run.get('threads', '?')} threads, {run.get('cores', '?')} cores")
