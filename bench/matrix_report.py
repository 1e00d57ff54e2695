"""The matrix's summary and outputs: per-scenario means and noise, the gap each strategy
closes, where scored is worse than round_robin, whether the shares settle; results.csv,
summary.json, chart.png and the printed tables."""
from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from bench.mixed_report import WARMUP_S
from bench.scenario import WINDOW_S

# A share has settled when every window of the run's last third lies within this
# of their mean. 5 points: the binomial noise of a 150-attempt window (bench
# mixed's load) on a share of a third is 3.8 points, of a 1000-attempt one 1.5.
SETTLED_BAND = 0.05


# --- summary: the targets -------------------------------------------------------

def summarize(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Per-scenario means and noise, the gap each strategy closes, and where
    `scored` is worse than `round_robin` beyond run-to-run noise."""
    by_cell = _by_cell(rows)
    scenarios = sorted({s for s, _ in by_cell}, key=_scenario_order)
    strategies = sorted({t for _, t in by_cell})
    per_scenario = {}
    for scenario in scenarios:
        per_scenario[scenario] = {}
        for strategy in strategies:
            cell = by_cell.get((scenario, strategy), [])
            if cell:
                per_scenario[scenario][strategy] = _cell_stats(cell)
    totals = {}
    for strategy in strategies:
        cells = [per_scenario[s][strategy] for s in scenarios if strategy in per_scenario[s]]
        totals[strategy] = {
            "errors": sum(c["errors"] for c in cells),
            "p99_geomean_ms": _geomean(c["p99_ms"] for c in cells),
        }
    summary: dict[str, Any] = {"per_scenario": per_scenario, "totals": totals}
    if {"round_robin", "scored", "oracle"} <= set(totals):
        rr, sc, orc = totals["round_robin"], totals["scored"], totals["oracle"]
        summary["gap_closed"] = {
            "errors": _closed(rr["errors"], sc["errors"], orc["errors"]),
            "p99_geomean": _closed(rr["p99_geomean_ms"], sc["p99_geomean_ms"],
                                   orc["p99_geomean_ms"]),
        }
    if {"round_robin", "scored"} <= set(strategies):
        summary["scored_worse"] = [
            {"scenario": s, **worse}
            for s in scenarios for worse in _worse(per_scenario[s])]
        summary["scored_worse_objective"] = [
            {"scenario": s, **worse} for s in scenarios
            for worse in _worse_objective(by_cell.get((s, "round_robin"), []),
                                          by_cell.get((s, "scored"), []))]
    return summary


def _worse_objective(rr: list[dict[str, Any]], sc: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Whether scored is worse on the tuner's objective (error rate + 0.5 x p99 /
    round_robin's p99), comparing runs with the same request ids pairwise."""
    rr_by, sc_by = {r["repeat"]: r for r in rr}, {r["repeat"]: r for r in sc}
    diffs = []
    for repeat in sorted(set(rr_by) & set(sc_by)):
        base, cand = rr_by[repeat], sc_by[repeat]
        diffs.append(cand["error_rate"] - base["error_rate"]
                     + 0.5 * (cand["p99_ms"] - base["p99_ms"]) / max(base["p99_ms"], 1e-9))
    if not diffs:
        return []
    mean = statistics.fmean(diffs)
    noise = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    if mean > 0 and mean > 2 * noise:
        return [{"metric": "objective", "difference": mean, "noise": noise}]
    return []


def _cell_stats(cell: list[dict[str, Any]]) -> dict[str, float]:
    rates = [r["error_rate"] for r in cell]
    p99s = [r["p99_ms"] for r in cell]
    return {
        "runs": len(cell),
        "errors": statistics.fmean(r["errors"] for r in cell),
        "error_rate": statistics.fmean(rates),
        "error_rate_sd": statistics.stdev(rates) if len(cell) > 1 else math.nan,
        "p99_ms": statistics.fmean(p99s),
        "p99_sd": statistics.stdev(p99s) if len(cell) > 1 else math.nan,
        "blocks": statistics.fmean(r["blocks"] for r in cell),
    }


def _worse(stats: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Metrics on which scored is worse than round_robin by more than twice the
    noise of the difference (repeats' standard deviations)."""
    rr, sc = stats.get("round_robin"), stats.get("scored")
    if not rr or not sc:
        return []
    found = []
    for metric, sd in (("error_rate", "error_rate_sd"), ("p99_ms", "p99_sd")):
        diff = sc[metric] - rr[metric]
        noise = math.sqrt((rr[sd] ** 2) / rr["runs"] + (sc[sd] ** 2) / sc["runs"])
        if math.isnan(noise):
            noise = 0.0
        if diff > 2 * noise and diff > 0:
            found.append({"metric": metric, "round_robin": rr[metric], "scored": sc[metric],
                          "difference": diff, "noise": noise})
    return found


def _closed(baseline: float, candidate: float, best: float) -> float | None:
    """Share of the gap between baseline and best that candidate closes."""
    if baseline == best:
        return None
    return (baseline - candidate) / (baseline - best)


def _geomean(values: Iterable[float]) -> float:
    values = [max(v, 1e-9) for v in values]
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else math.nan


def _by_cell(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The rows of each (scenario, strategy): a cell's repeats."""
    by_cell: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        by_cell.setdefault((row["scenario"], row["strategy"]), []).append(row)
    return by_cell


def _cells_in_order(rows: Iterable[dict[str, Any]]
                    ) -> list[tuple[tuple[str, str], list[dict[str, Any]]]]:
    """Each cell and its rows, in the tables' order: by scenario, then strategy."""
    return sorted(_by_cell(rows).items(), key=lambda k: (_scenario_order(k[0][0]), k[0][1]))


def _scenario_order(name: str) -> tuple[int, int, str]:
    """Seeded scenarios by instance count, then seed; named ones (issue 15's) after,
    by name."""
    if not name.startswith("seed"):
        return 1_000_000, 0, name
    seed, instances = name.removeprefix("seed").split("-n")
    return int(instances), int(seed), ""


# --- outputs --------------------------------------------------------------------

def write_outputs(rows: list[dict[str, Any]], summary: dict[str, Any], out: Path) -> None:
    fields = ["scenario", "strategy", "seed", "instances", "repeat", "id_offset", "requests",
              "errors", "error_rate", "p50_ms", "p90_ms", "p99_ms", "max_ms", "blocks",
              "panic_picks", "over_cap_picks", "retries", "virtual_s"]
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=_nan_to_none))
    draw_chart(summary, out / "chart.png")


def _nan_to_none(value: Any) -> Any:
    return None


def draw_chart(summary: dict[str, Any], path: Path) -> None:
    """Error rate and p99 per scenario: strategies side by side, the oracle as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = summary["per_scenario"]
    scenarios = list(per)
    bars = [s for s in ("round_robin", "scored") if any(s in per[x] for x in scenarios)]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, len(scenarios) * 0.7), 8), sharex=True)
    width = 0.8 / max(1, len(bars))
    xs = range(len(scenarios))
    for ax, metric, label in ((axes[0], "error_rate", "error rate"),
                              (axes[1], "p99_ms", "p99 latency (ms)")):
        for i, strategy in enumerate(bars):
            values = [per[s].get(strategy, {}).get(metric, math.nan) for s in scenarios]
            ax.bar([x + (i - (len(bars) - 1) / 2) * width for x in xs], values, width,
                   label=strategy)
        if any("oracle" in per[s] for s in scenarios):
            ax.plot(list(xs), [per[s].get("oracle", {}).get(metric, math.nan)
                               for s in scenarios], "k.-", label="oracle")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    axes[1].set_xticks(list(xs))
    axes[1].set_xticklabels(scenarios, rotation=45, ha="right")
    fig.suptitle("round_robin vs scored per scenario (oracle: the yardstick)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    per = summary["per_scenario"]
    strategies = [s for s in ("round_robin", "fastest", "scored", "oracle")
                  if any(s in per[x] for x in per)]
    head = f"{'scenario':<12}" + "".join(f"{s + ' err':>18}{s + ' p99':>18}" for s in strategies)
    lines = [head, "-" * len(head)]
    for scenario, stats in per.items():
        line = f"{scenario:<12}"
        for s in strategies:
            cell = stats.get(s)
            line += (f"{cell['error_rate']:>18.3f}{cell['p99_ms']:>16.0f}ms" if cell
                     else f"{'-':>18}{'-':>18}")
        lines.append(line)
    lines.append("")
    for strategy, total in summary["totals"].items():
        lines.append(f"{strategy:<12} errors {total['errors']:>9.0f}   "
                     f"p99 geomean {total['p99_geomean_ms']:>7.0f} ms")
    if "gap_closed" in summary:
        closed = summary["gap_closed"]
        lines.append(f"scored closes {_pct(closed['errors'])} of the round_robin-to-oracle gap "
                     f"in errors and {_pct(closed['p99_geomean'])} in p99 geomean (target 60 %)")
    if "scored_worse" in summary:
        worse = summary["scored_worse"]
        if worse:
            lines.append("scored is worse than round_robin beyond noise, metric by metric, on:")
            lines += [f"  {w['scenario']} {w['metric']}: {w['scored']:.3f} vs "
                      f"{w['round_robin']:.3f} (noise {w['noise']:.3f})" for w in worse]
        else:
            lines.append("scored is worse than round_robin beyond noise on no scenario "
                         "and no metric")
        worse = summary["scored_worse_objective"]
        lines.append("on the objective (error rate + 0.5 x p99 / round_robin's p99), scored is "
                     + ("worse beyond noise on: " + ", ".join(w["scenario"] for w in worse)
                        if worse else "worse beyond noise on no scenario"))
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def format_p95_shares(rows: list[dict[str, Any]]) -> str:
    """Per scenario and strategy: error rate and p95, the whole run's and from
    WARMUP_S on (means over repeats), each backend's share of the successes and
    its share of the attempts from WARMUP_S on (over all repeats), which is what
    `bench mixed` judges live."""
    warm = f">{WARMUP_S:g}s"
    lines = [f"{'scenario':<14}{'strategy':<13}{'err':>7}{'p95':>10}{'p95' + warm:>10}  "
             f"shares of the successes | of the attempts from {WARMUP_S:g} s on"]
    for (scenario, strategy), cell in _cells_in_order(rows):
        p95 = statistics.fmean(r.get("p95_ms", math.nan) for r in cell)
        p95_warm = _mean_or_nan(r.get("p95_after_warmup_ms") for r in cell)
        lines.append(f"{scenario:<14}{strategy:<13}"
                     f"{statistics.fmean(r['error_rate'] for r in cell):>7.3f}{p95:>8.1f}ms"
                     f"{p95_warm:>8.1f}ms  {_shares(cell, 'shares', '.1%')} | "
                     f"{_shares(cell, 'attempts_after_warmup', '.2%')}")
    return "\n".join(lines)


def _mean_or_nan(values: Iterable[float | None]) -> float:
    """The mean of the values measured (None: not measured, such as a live row's)."""
    measured = [v for v in values if v is not None]
    return statistics.fmean(measured) if measured else math.nan


def _shares(cell: list[dict[str, Any]], key: str, spec: str) -> str:
    """Each backend's share of the counts under `key`, summed over the cell's rows."""
    backends = cell[0].get(key) or {}
    counts = [sum(r.get(key, {}).get(b, 0) for r in cell) for b in backends]
    total = sum(counts)
    return " ".join(format(c / total, spec) for c in counts) if total else "-"


# --- convergence: the first backend's share, window by window ---------------------

@dataclass(frozen=True)
class Convergence:
    """A share's course over a run's windows: its mean, lowest and highest, the mean
    absolute change between consecutive windows, the last third's mean, and whether
    that third stays within SETTLED_BAND of its mean (None: too few windows to say)."""

    mean: float
    low: float
    high: float
    step: float
    tail_mean: float
    settled: bool | None


def convergence(series: Sequence[float], band: float = SETTLED_BAND) -> Convergence | None:
    """The course of a share given per window (None: no window)."""
    if not series:
        return None
    tail = series[len(series) - math.ceil(len(series) / 3):]
    tail_mean = statistics.fmean(tail)
    steps = [abs(b - a) for a, b in zip(series, series[1:])]
    return Convergence(
        mean=statistics.fmean(series), low=min(series), high=max(series),
        step=statistics.fmean(steps) if steps else 0.0, tail_mean=tail_mean,
        # One window is trivially within any band: judge two or more.
        settled=all(abs(x - tail_mean) <= band for x in tail) if len(tail) > 1 else None)


def first_share_per_window(row: dict[str, Any]) -> list[float]:
    """The first backend's share of each window's attempts (each named pool lists
    its fastest first), over the windows that end by the paced load's end: the
    ones after it hold only the stragglers of a run that fell behind, which the
    live benchmark, bounded by its duration, does not send."""
    shares = []
    for k, counts in enumerate(row.get("attempt_windows") or []):
        if WARMUP_S + (k + 1) * WINDOW_S > row.get("load_s", 0.0) + 1e-9:
            break
        if sum(counts):
            shares.append(counts[0] / sum(counts))
    return shares


def format_convergence(rows: list[dict[str, Any]]) -> str:
    """Per scenario and strategy, the first backend's share per window: each
    repeat's `convergence`, combined (the mean of the means, the lowest, the
    highest, the mean change, the last third's mean, how many repeats settled).
    Empty when no row has windows (live rows)."""
    cells = []
    for key, cell in _cells_in_order(rows):
        courses = [c for c in map(convergence, map(first_share_per_window, cell))
                   if c is not None]
        if courses:
            cells.append((key, courses))
    if not cells:
        return ""
    lines = [f"the first backend's share of the attempts per {WINDOW_S:g} s from "
             f"{WARMUP_S:g} s on; settled: the last third within "
             f"±{SETTLED_BAND * 100:g} points of its mean",
             f"{'scenario':<14}{'strategy':<13}{'mean':>7}{'min':>7}{'max':>7}"
             f"{'change':>8}{'last third':>12}  settled"]
    for (scenario, strategy), courses in cells:
        judged = [c.settled for c in courses if c.settled is not None]
        lines.append(
            f"{scenario:<14}{strategy:<13}"
            f"{statistics.fmean(c.mean for c in courses):>7.1%}"
            f"{min(c.low for c in courses):>7.1%}{max(c.high for c in courses):>7.1%}"
            f"{statistics.fmean(c.step for c in courses) * 100:>5.1f}pts"
            f"{statistics.fmean(c.tail_mean for c in courses):>12.1%}  "
            + (f"{sum(judged)}/{len(judged)}" if judged else "-"))
    return "\n".join(lines)
