"""Figures from timings, and the printed table."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from llmserve.bench.load import Timing


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class LevelResult:
    system: str
    concurrency: int
    requests: int
    errors: int
    output_tokens: int
    wall_s: float
    tok_s: float
    req_s: float
    ttft_ms: tuple[float | None, float | None, float | None]
    itl_ms: tuple[float | None, float | None, float | None]
    max_gap_ms: float | None
    e2e_s: tuple[float | None, float | None]
    cpu_s: float | None = None
    api_cpu_s: float | None = None  # the server's own process (the API layer), not its children
    peak_rss_mb: float | None = None
    first_error: str | None = None
    workload: str = "free"  # workloads.py
    cache: str = "cold"  # what the system's cache held of the measured prompts: cold or warm
    spec_draft_tokens: int | None = None  # speculative decoding, where the system counts it
    spec_accepted_tokens: int | None = None

    @property
    def acceptance(self) -> float | None:
        """Drafted tokens accepted, where any were drafted."""
        if not self.spec_draft_tokens or self.spec_accepted_tokens is None:
            return None
        return self.spec_accepted_tokens / self.spec_draft_tokens

    def to_json(self) -> dict:
        return {**asdict(self), "acceptance": self.acceptance}


def summarize(system: str, concurrency: int, timings: list[Timing], wall: float) -> LevelResult:
    ok = [t for t in timings if t.error is None]
    ttft = [t.ttft * 1000 for t in ok if t.ttft is not None]
    gaps = [
        (b - a) * 1000 for t in ok for a, b in zip(t.arrivals, t.arrivals[1:], strict=False)
    ]
    e2e = [t.end - t.start for t in ok]
    tokens = sum(t.tokens for t in ok)
    errors = [t.error for t in timings if t.error is not None]
    return LevelResult(
        system=system,
        concurrency=concurrency,
        requests=len(timings),
        errors=len(errors),
        output_tokens=tokens,
        wall_s=wall,
        tok_s=tokens / wall if wall > 0 else 0.0,
        req_s=len(ok) / wall if wall > 0 else 0.0,
        ttft_ms=tuple(percentile(ttft, q) for q in (0.5, 0.95, 0.99)),
        itl_ms=tuple(percentile(gaps, q) for q in (0.5, 0.95, 0.99)),
        max_gap_ms=max(gaps) if gaps else None,
        e2e_s=(percentile(e2e, 0.5), percentile(e2e, 0.95)),
        first_error=errors[0] if errors else None,
    )


def _f(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def table(results: list[LevelResult]) -> str:
    head = (
        f"{'system':<20} {'workload':<8} {'cache':<5} {'conc':>4} {'req':>4} {'err':>3} "
        f"{'tok/s':>7} {'req/s':>6} "
        f"{'TTFT p50/p95/p99 ms':>21} {'ITL p50/p95/p99 ms':>19} {'gap ms':>7} "
        f"{'e2e p50 s':>9} {'cpu s':>6} {'api s':>6} {'rss MB':>7} {'accept':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        ttft = "/".join(_f(v) for v in r.ttft_ms)
        itl = "/".join(_f(v, 1) for v in r.itl_ms)
        lines.append(
            f"{r.system:<20} {r.workload:<8} {r.cache:<5} {r.concurrency:>4} {r.requests:>4} "
            f"{r.errors:>3} {r.tok_s:>7.1f} "
            f"{r.req_s:>6.2f} {ttft:>21} {itl:>19} {_f(r.max_gap_ms):>7} "
            f"{_f(r.e2e_s[0], 2):>9} {_f(r.cpu_s, 1):>6} {_f(r.api_cpu_s, 2):>6} "
            f"{_f(r.peak_rss_mb):>7} {_pct(r.acceptance):>6}"
        )
    return "\n".join(lines)


def ratios(results: list[LevelResult], subject: str, baselines: list[str]) -> tuple[str, list[dict]]:
    """`subject` against each of `baselines`, row by row of the same workload, cache state
    and concurrency."""
    by = {(r.system, r.workload, r.cache, r.concurrency): r for r in results}
    rows, out = [], []
    cases = sorted({(r.workload, r.cache, r.concurrency) for r in results},
                   key=lambda c: (c[2], c[0], c[1]))
    for workload, cache, conc in cases:
        s = by.get((subject, workload, cache, conc))
        if s is None:
            continue
        row: dict = {"system": subject, "workload": workload, "cache": cache,
                     "concurrency": conc}
        parts = [f"{workload:<8} {cache:<4} conc {conc:>3}:"]
        if s.acceptance is not None:
            row["acceptance"] = s.acceptance
            parts.append(f"{subject} accepted {s.acceptance:.0%} of drafts")
        for base in baselines:
            b = by.get((base, workload, cache, conc))
            if b is None or not b.tok_s:
                continue
            row[f"tok_s_vs_{base}"] = s.tok_s / b.tok_s
            parts.append(f"tok/s {subject}/{base} = {s.tok_s / b.tok_s:.2f}x")
            if s.ttft_ms[0] is not None and b.ttft_ms[0] is not None:
                row[f"ttft_p50_minus_{base}_ms"] = s.ttft_ms[0] - b.ttft_ms[0]
                parts.append(f"TTFT p50 {s.ttft_ms[0] - b.ttft_ms[0]:+.0f} ms vs {base}")
            per_token = _api_cpu_per_token(s), _api_cpu_per_token(b)
            if None not in per_token and per_token[1]:
                row[f"api_cpu_vs_{base}"] = per_token[0] / per_token[1]
                parts.append(f"API CPU/token {per_token[0] / per_token[1]:.2f}x")
        rows.append(row)
        out.append("  ".join(parts))
    return "\n".join(out), rows


def _api_cpu_per_token(r: LevelResult) -> float | None:
    if r.api_cpu_s is None or not r.output_tokens:
        return None
    return r.api_cpu_s / r.output_tokens
