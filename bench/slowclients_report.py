"""The slow-clients report: the probe beside each mix against the target, what the
balancer did to the attack's connections, and what its workers held."""
from __future__ import annotations

from typing import Any

TARGET_P99_RATIO = 2.0          # the target, measured here, never asserted in tests


def total(usage: dict[int, dict[str, int]]) -> dict[str, int]:
    """Usage summed over the workers."""
    return {key: sum(u[key] for u in usage.values()) for key in ("rss_kb", "fds", "threads")}


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def report(baseline: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """Print the probe alone, then each mix's probe and what the balancer and workers did."""
    print(f"\nprobe alone: {baseline['ok']}/{baseline['sent']} ok, "
          f"p50 {fmt_ms(baseline['p50_ms'])} ms, p99 {fmt_ms(baseline['p99_ms'])} ms")
    header = (f"{'mix':<16} {'conns':>6} {'probe ok':>9} {'lost':>5} {'p50 ms':>8} "
              f"{'p99 ms':>8} {'p99/alone':>9}  target (lost 0, p99/alone <= "
              f"{TARGET_P99_RATIO:g})")
    print(header)
    print("-" * len(header))
    for r in results:
        p = r["probe"]
        rate = f"{p['success_rate']:.1%}" if p["success_rate"] is not None else "-"
        ratio = "-" if r["p99_ratio"] is None else f"{r['p99_ratio']:.2f}"
        print(f"{r['mix']:<16} {sum(r['counts'].values()):>6} {rate:>9} {p['lost']:>5} "
              f"{fmt_ms(p['p50_ms']):>8} {fmt_ms(p['p99_ms']):>8} {ratio:>9}  "
              f"{'met' if r['met'] else 'NOT met'}")
    print("\nwhat the balancer did to the attack, and what its workers held "
          "(summed over workers: before / during / after)")
    header = (f"{'mix':<16} {'kind':<16} {'opened':>6} {'failed':>6} {'closed':>6} "
              f"{'answers':<22} {'RSS MB':>17} {'fds':>16} {'threads':>12}  settled")
    print(header)
    print("-" * len(header))
    for r in results:
        use = [total(r["workers"][when]) for when in ("before", "during", "after")]
        rss = "/".join(f"{u['rss_kb'] / 1024:.0f}" for u in use)
        fds = "/".join(str(u["fds"]) for u in use)
        threads = "/".join(str(u["threads"]) for u in use)
        settled = "no" if r["settled_s"] is None else f"{r['settled_s']:.1f} s"
        if r["workers_changed"]:
            settled += ", WORKERS RESTARTED"
        for i, (kind, t) in enumerate(r["attack"].items()):
            answers = ", ".join(f"{s}: {n}" for s, n in t["statuses"].items()) or "none"
            tail = f" {rss:>17} {fds:>16} {threads:>12}  {settled}" if i == 0 else ""
            print(f"{r['mix'] if i == 0 else '':<16} {kind:<16} {t['opened']:>6} "
                  f"{t['failed']:>6} {t['closed']:>6} {answers:<22}{tail}")
