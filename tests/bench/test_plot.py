"""`llmserve bench --plot`: a small fixed result set drawn, one colour per system, each
panel's points where the results put them; and a plot from an earlier run's JSON file."""

from __future__ import annotations

import json

from llmserve.bench.plot import figure
from llmserve.bench.run import main


def result(system: str, concurrency: int, tok_s: float, ttft: float, itl: float,
           cache: str = "cold") -> dict:
    return {"system": system, "concurrency": concurrency, "tok_s": tok_s, "cache": cache,
            "workload": "free", "ttft_ms": [ttft, ttft * 2, ttft * 3],
            "itl_ms": [itl, itl * 2, None]}


RESULTS = [result(s, c, tok * c, 100 * c, 10 * c ** 0.5)
           for s, tok in (("llmserve", 50.0), ("llama-server", 40.0)) for c in (4, 1, 16)]


def test_each_system_a_colour_and_its_points_against_concurrency():
    fig = figure(RESULTS, "title")
    tok, ttft, itl = fig.axes
    lines = {line.get_label(): line for line in tok.get_lines()}
    assert set(lines) == {"llmserve", "llama-server"}
    assert lines["llmserve"].get_color() != lines["llama-server"].get_color()
    assert list(lines["llmserve"].get_xdata()) == [1, 4, 16]  # sorted by concurrency
    assert list(lines["llmserve"].get_ydata()) == [50.0, 200.0, 800.0]
    assert len(ttft.get_lines()) == 2 * 3  # p50, p95, p99 per system
    assert len(itl.get_lines()) == 2 * 2  # p99 unknown: not drawn
    p95 = [line for line in ttft.get_lines()
           if line.get_color() == lines["llama-server"].get_color()
           and line.get_linestyle() == "--"]
    assert [list(line.get_ydata()) for line in p95] == [[200.0, 800.0, 3200.0]]
    assert [a.get_xscale() for a in fig.axes] == ["log"] * 3


def test_several_cache_states_are_series_of_their_own():
    fig = figure(RESULTS + [result("llmserve", 1, 70.0, 50, 5, cache="warm")])
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["llmserve (cold)", "llama-server (cold)", "llmserve (warm)"]


def test_plot_from_an_earlier_json_file(tmp_path):
    source = tmp_path / "bench.json"
    source.write_text(json.dumps({"model": "/m/x.gguf", "engine": "llamacpp", "max_tokens": 8,
                                  "threads": 2, "cores": 2, "results": RESULTS}))
    assert main(["--plot-from", str(source)]) == 0
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "other" / "p.png"
    assert main(["--plot-from", str(source), "--plot", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
