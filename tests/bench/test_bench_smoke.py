"""The bench runs end to end at low concurrency and writes well-formed output. Figures are
not asserted here: speed lives in the benchmark's own output, not in timed tests."""

import json
import subprocess
import sys

import pytest

NOT_BUILT = ("llama-server is not built for this llama-cpp-python and CPU: `make llama-server` "
             "builds and caches it (about 12 minutes on 2 cores); the bench builds it on first use")


def test_bench_runs_every_system(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "llmserve.cli", "bench", "--levels", "1,2", "--max-tokens", "8",
         "--requests", "2", "--context-length", "256", "--json", str(out), "--logs", str(tmp_path),
         "--no-llama-server"],  # its own test below: it may need a build of minutes first
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["cache"] == ["cold", "warm"] and report["workloads"] == ["free"]  # defaults
    rows = [(r["system"], r["concurrency"], r["cache"]) for r in report["results"]]
    names = ("llmserve", "llmserve json_schema", "llama-cpp-python", "in-process")
    assert sorted(rows) == sorted((s, c, m) for s in names for c in (1, 2)
                                  for m in ("cold", "warm"))
    for r in report["results"]:
        # every system runs in two blocks (A, B, C, D, D, C, B, A) of half the requests, at
        # least one per stream: here 2 x 1 and 2 x 2
        blocks = 2 if r["concurrency"] == 2 else 1
        assert r["workload"] == "free" and r["acceptance"] is None, r
        assert r["errors"] == 0, r
        assert r["requests"] == 2 * blocks
        assert r["output_tokens"] == 2 * blocks * 8, r  # equal lengths: ignore_eos / EOS banned
        assert r["tok_s"] > 0 and r["ttft_ms"][0] > 0
        # the API layer's own CPU: llmserve's top process (its engine runs in a child);
        # none for llama-cpp-python (one process) nor in-process (no server)
        if r["system"].startswith("llmserve"):
            assert r["api_cpu_s"] is not None and 0 <= r["api_cpu_s"] <= r["cpu_s"], r
        else:
            assert r["api_cpu_s"] is None, r
    # a ratio compares rows of the same cache state, each state at each level
    assert sorted((row["cache"], row["concurrency"]) for row in report["ratios"]) == [
        ("cold", 1), ("cold", 2), ("warm", 1), ("warm", 2)]
    for row in report["ratios"]:
        assert row["tok_s_vs_in-process"] > 0 and row["tok_s_vs_llama-cpp-python"] > 0
        assert "api_cpu_vs_llama-cpp-python" not in row
    assert [row["tok_s_vs_llmserve"] > 0 for row in report["constrained_ratios"]] == [True] * 4
    assert report["speculative_ratios"] == []
    # The printed table names every system, its rows' cache state, and the ratios.
    assert "llmserve/in-process" in proc.stdout and "llmserve/llama-cpp-python" in proc.stdout
    assert "llmserve json_schema/llmserve" in proc.stdout
    assert "free     cold" in proc.stdout and "free     warm" in proc.stdout


def test_bench_grounded_workload_with_speculation_off_and_ngram(tmp_path):
    """llmserve with --speculative off and ngram, each its own server, and the engine
    in-process likewise, on prompts whose answers copy from them: rows of each, the drafts'
    acceptance where there is speculation, and the ratios on against off."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "llmserve.cli", "bench", "--workload", "grounded",
         "--speculative", "off,ngram", "--cache", "warm", "--levels", "1", "--max-tokens", "8",
         "--requests", "2", "--context-length", "512", "--no-constrained",
         "--no-llama-cpp-python", "--no-llama-server", "--json", str(out),
         "--logs", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["speculative"] == ["off", "ngram"] and report["workloads"] == ["grounded"]
    names = ("llmserve", "llmserve ngram", "in-process", "in-process ngram")
    rows = [(r["system"], r["workload"], r["cache"], r["concurrency"]) for r in report["results"]]
    assert sorted(rows) == sorted((s, "grounded", "warm", 1) for s in names)
    for r in report["results"]:
        assert r["errors"] == 0 and r["output_tokens"] == 2 * 8, r
        if r["system"].endswith("ngram"):
            # one stream copying its prompt: drafts proposed, counted from /metrics (over
            # HTTP) or the engine (in-process), some accepted
            assert r["spec_draft_tokens"] > 0 and 0 < r["acceptance"] <= 1, r
        else:
            assert r["spec_draft_tokens"] is None and r["acceptance"] is None, r
    assert {row["system"] for row in report["ratios"]} == {"llmserve", "llmserve ngram"}
    for row in report["ratios"]:
        assert row[f"tok_s_vs_{row['system'].replace('llmserve', 'in-process')}"] > 0, row
    spec = {row["system"]: row for row in report["speculative_ratios"]}
    assert spec["llmserve ngram"]["tok_s_vs_llmserve"] > 0
    assert spec["in-process ngram"]["tok_s_vs_in-process"] > 0
    assert 0 < spec["llmserve ngram"]["acceptance"] <= 1
    assert "llmserve ngram/llmserve" in proc.stdout and "in-process ngram/in-process" in proc.stdout
    assert "grounded warm" in proc.stdout
    assert (tmp_path / "llmserve-ngram.log").exists()  # a server of its own


def test_bench_measures_llama_server_beside_llmserve(tmp_path):
    from llmserve.bench.llama_server import cached_binary

    binary = cached_binary()
    if binary is None:
        pytest.skip(NOT_BUILT)
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "llmserve.cli", "bench", "--levels", "1,2", "--max-tokens", "8",
         "--requests", "2", "--context-length", "256", "--no-limit", "--no-constrained",
         "--no-llama-cpp-python", "--json", str(out), "--logs", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "building llama-server" not in proc.stderr  # the cached binary, found
    report = json.loads(out.read_text())
    systems = {(r["system"], r["concurrency"]) for r in report["results"]}
    assert systems == {(s, c) for s in ("llmserve", "llama-server") for c in (1, 2)}
    for r in report["results"]:
        blocks = 2 if r["concurrency"] == 2 else 1  # A, B, B, A blocks (see above)
        assert r["errors"] == 0, r
        assert r["output_tokens"] == 2 * blocks * 8, r  # ignore_eos honoured, usage counted
        assert r["tok_s"] > 0 and r["ttft_ms"][0] > 0
        if r["system"] == "llama-server":  # one process: no API layer apart
            assert r["api_cpu_s"] is None and r["cpu_s"] > 0, r
    # a row per cache state and level: cold and warm, llama-server keeping its prompt cache
    assert [row["tok_s_vs_llama-server"] > 0 for row in report["ratios"]] == [True] * 4
    assert "llmserve/llama-server" in proc.stdout
    log = (tmp_path / "llama-server.log").read_text(errors="replace")
    assert "n_slots = 2" in log  # -np = the highest level, as llmserve's --max-sequences


def test_bench_transformers_engine_measures_hf_generate_beside_it(tmp_path):
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    from conftest import hf_model_dir

    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "llmserve.cli", "bench", "--engine", "transformers",
         "--model", str(hf_model_dir()),
         "--levels", "1,2", "--max-tokens", "6", "--requests", "2", "--no-constrained",
         "--context-length", "256", "--threads", "2", "--json", str(out), "--logs", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["engine"] == "transformers"
    systems = {(r["system"], r["concurrency"]) for r in report["results"]}
    assert systems == {(s, c) for s in ("llmserve", "in-process", "hf generate") for c in (1, 2)}
    for r in report["results"]:
        # llmserve and the engine in-process run in two blocks at concurrency 2 (see above);
        # hf generate once, cold and warm alike (it keeps no cache between batches)
        blocks = 2 if r["system"] != "hf generate" and r["concurrency"] == 2 else 1
        assert r["errors"] == 0, r
        assert r["requests"] == 2 * blocks
        # every request its 6 tokens: min_new_tokens = max_new_tokens for hf generate
        assert r["output_tokens"] == 2 * blocks * 6, r
        assert r["tok_s"] > 0 and r["ttft_ms"][0] > 0
    for row in report["ratios"]:
        assert row["tok_s_vs_hf generate"] > 0 and row["tok_s_vs_in-process"] > 0
    assert "llmserve/hf generate" in proc.stdout and "in-process/hf generate" in proc.stdout


def test_soak_runs_with_hostile_clients_and_finds_no_leak(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "llmserve.cli", "bench", "--soak", "--duration", "8",
         "--baseline", "3", "--healthy", "4", "--abandoned", "8", "--slow", "2",
         "--slow-hold", "4", "--context-length", "1024", "--json", str(out),
         "--logs", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["healthy_errors"] == {"baseline": 0, "soak": 0}
    assert report["healthy_requests"]["soak"] > 0 and report["abandoned_errors"] == 0
    assert report["leaked_running"] == 0 and report["leaked_waiting"] == 0
    assert "leaked slots" in proc.stdout
