"""Plot handoff latency by lock from ``run.py --out`` results (needs matplotlib).

    python benchmarks/run.py --out results.json
    python benchmarks/plot.py results.json docs/handoff.png

One horizontal bar per lock and process count (p50), with a whisker to p90, on a log
scale: the peers that poll sit three orders of magnitude to the right of the kernel's
``flock``, and a linear axis would flatten everything else into one pixel.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt
from matplotlib.patches import Patch

OURS, PEER = "#1f77b4", "#b0b0b0"
FAMILY_ORDER = ["memory", "file", "sqlite", "redis", "postgres", "deepkit"]


def load(path: str) -> Dict[str, Any]:
    with open(path) as f:
        data: Dict[str, Any] = json.load(f)
    return data


def plot(results: Dict[str, Any], out: str) -> None:
    kinds: List[Dict[str, Any]] = [k for k in results["kinds"] if k.get("handoff")]
    # Grouped by back end, each group's peers first and brokerlock last, so every
    # brokerlock bar sits right under the locks it competes with.
    kinds.sort(key=lambda k: (FAMILY_ORDER.index(k["family"]), k["ours"]))
    counts = sorted({int(n) for k in kinds for n in k["handoff"]})
    height = 0.8 / max(1, len(counts))
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(kinds) + 1.6))
    labels = []
    for row, kind in enumerate(kinds):
        labels.append(kind["name"] + (" (threads)" if kind["mode"] == "thread" else ""))
        for j, n in enumerate(counts):
            d = kind["handoff"].get(str(n))
            if not d:
                continue
            y = row + (j - (len(counts) - 1) / 2) * height
            p50, p90 = d["p50_ns"] / 1e3, d["p90_ns"] / 1e3
            color = OURS if kind["ours"] else PEER
            ax.barh(
                y,
                p50,
                height=height * 0.9,
                color=color,
                alpha=1.0 if j == 0 else 0.6,
                edgecolor="black",
                linewidth=0.4,
            )
            ax.plot([p50, p90], [y, y], color="black", linewidth=0.8)
            ax.plot([p90], [y], marker="|", color="black", markersize=5)
            ax.text(p90 * 1.15, y, f"{n}p {_fmt(p50)}", va="center", fontsize=7)
    ax.set_yticks(range(len(kinds)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(left=5, right=max(50_000.0, _max_p90(kinds) * 8))
    ax.set_xlabel("release -> parked waiter has the lock (µs, log scale); bar = p50, whisker = p90")
    for ms, text in ((1e2, "100 µs"), (1e3, "1 ms"), (1e5, "100 ms")):
        ax.axvline(ms, color="#dddddd", linewidth=0.8, zorder=0)
        ax.text(ms, -0.9, text, fontsize=7, color="#888888", ha="center")
    # Separate the back ends' groups.
    for row in range(1, len(kinds)):
        if kinds[row]["family"] != kinds[row - 1]["family"]:
            ax.axhline(row - 0.5, color="#999999", linewidth=0.6, linestyle="--")
    meta = results.get("meta", {})
    run = "--quick run" if meta.get("mode") == "quick" else "full run"
    ax.set_title(
        f"Handoff latency, {' and '.join(str(n) for n in counts)} processes "
        f"({run}, {meta.get('cpus', '?')} CPUs, {meta.get('date', '')})",
        fontsize=10,
    )
    shades = [Patch(facecolor=OURS, label="brokerlock"), Patch(facecolor=PEER, label="peers")]
    ax.legend(handles=shades, loc="lower right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def _max_p90(kinds: List[Dict[str, Any]]) -> float:
    return max((d["p90_ns"] / 1e3 for k in kinds for d in k["handoff"].values()), default=1.0)


def _fmt(us: float) -> str:
    if us < 1000:
        return f"{us:.0f} µs"
    if us < 1e6:
        return f"{us / 1e3:.1f} ms"
    return f"{us / 1e6:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", help="JSON written by run.py --out")
    parser.add_argument("out", nargs="?", default="docs/handoff.png", help="PNG to write")
    args = parser.parse_args()
    plot(load(args.results), args.out)


if __name__ == "__main__":
    main()
