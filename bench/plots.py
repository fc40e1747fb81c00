"""PNG plots of a run: time per provider per case, % of roofline, and the sweeps."""
from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from bench.report import FAMILY_TITLES, ok  # noqa: E402


def _panels(result: dict, sweeps: bool) -> dict:
    """(family, group, pass, dtype) -> records, in run order."""
    panels: dict = {}
    for rec in result["cases"]:
        if (rec["sweep"] is not None) == sweeps:
            panels.setdefault((rec["family"], rec["group"], rec["pass"], rec["dtype"]), []).append(rec)
    return panels


_ORDER = ("fastattn-cpu", "fastattn-cuda", "fastattn-triton", "fastattn-reference", "timm", "eager", "sdpa",
          "compile", "injected-failure")


def _colors(result: dict) -> dict:
    """One colour per provider name, the same in every plot and every run."""
    names = list(dict.fromkeys(list(_ORDER) + [n for r in result["cases"] for n in r["providers"]]))
    cmap = plt.get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def _legend(fig, result: dict, colors: dict) -> None:
    """One legend for the figure, above the panels, so that no bar hides under it."""
    names = list(dict.fromkeys(n for r in result["cases"] for n in r["providers"]))
    fig.legend(handles=[Patch(color=colors[n], label=n) for n in names], loc="upper center",
               ncol=min(len(names), 6), fontsize=8, bbox_to_anchor=(0.5, 0.975), frameon=False)


def _title(key) -> str:
    family, group, pass_, dtype = key
    return f"{FAMILY_TITLES[family]} {group}: {pass_}, {dtype}"


def _grid(count: int):
    cols = 1 if count == 1 else 2
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def bars(result: dict, path: str, metric: str) -> str | None:
    """Grouped bars: one panel per (family, group, pass, dtype), one bar per provider.

    metric "time": median ms (log scale); "roofline": % of the machine's roofline.
    A provider that failed is marked with an x on the axis.
    """
    panels = {k: v for k, v in _panels(result, sweeps=False).items()
              if metric == "time" or v[0]["roofline_value"] is not None}
    if not panels:
        return None
    colors = _colors(result)
    fig, axes = _grid(len(panels))
    for ax, (key, recs) in zip(axes, panels.items()):
        names = list(dict.fromkeys(n for r in recs for n in r["providers"]))
        width = 0.8 / len(names)
        lowest = []
        for j, name in enumerate(names):
            xs, ys, failed = [], [], []
            for i, rec in enumerate(recs):
                res = rec["results"].get(name)
                if res is None:
                    continue
                x = i - 0.4 + width * (j + 0.5)
                value = res.get("median_ms") if metric == "time" else res.get("pct_roofline")
                if ok(res) and value is not None:
                    xs.append(x)
                    ys.append(value)
                elif not ok(res):
                    failed.append(x)
            ax.bar(xs, ys, width, color=colors[name])
            lowest += ys
            if failed:
                ax.plot(failed, [0] * len(failed), "x", color=colors[name], markersize=7,
                        transform=ax.get_xaxis_transform(), clip_on=False)
        ax.set_xticks(range(len(recs)))
        ax.set_xticklabels([r["label"] for r in recs], rotation=20, ha="right", fontsize=8)
        if metric == "time":
            ax.set_yscale("log")
            if lowest:  # bars on a log axis start at its bottom: put it well below the shortest
                ax.set_ylim(bottom=min(lowest) / 4)
            ax.set_ylabel("median time (ms), log scale")
        else:
            ax.set_ylabel(f"% of {'copy bandwidth' if recs[0]['work']['roofline'] == 'copy' else 'matmul throughput'}")
        ax.set_title(_title(key), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    what = "median time per call" if metric == "time" else "% of the measured roofline"
    fig.suptitle(f"{result['device']}: {what} (x on the axis: provider failed)", fontsize=11)
    _legend(fig, result, colors)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def sweeps(result: dict, path: str) -> str | None:
    """Lines against the swept axis: time (top row) and % of roofline (bottom row) per sweep."""
    panels = _panels(result, sweeps=True)
    if not panels:
        return None
    colors = _colors(result)
    fig, axes = plt.subplots(2, len(panels), figsize=(5.5 * len(panels), 8), squeeze=False)
    for col, (key, recs) in enumerate(panels.items()):
        names = list(dict.fromkeys(n for r in recs for n in r["providers"]))
        axis = recs[0]["sweep"][0]
        for name in names:
            pts = [(r["sweep"][1], r["results"][name]) for r in recs if ok(r["results"].get(name, {}))]
            if not pts:
                continue
            xs = [x for x, _ in pts]
            axes[0][col].plot(xs, [res["median_ms"] for _, res in pts], "o-", label=name, color=colors[name])
            pct = [(x, res["pct_roofline"]) for x, res in pts if res.get("pct_roofline") is not None]
            if pct:
                axes[1][col].plot(*zip(*pct), "o-", label=name, color=colors[name])
        axes[0][col].set(xscale="log", yscale="log", ylabel="median time (ms)", title=_title(key))
        axes[1][col].set(xscale="log", xlabel=axis, ylabel="% of matmul throughput")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"{result['device']}: sweeps (failed points omitted)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_all(result: dict, out_dir: str, stem: str) -> list[str]:
    paths = [bars(result, os.path.join(out_dir, f"{stem}-time.png"), "time"),
             bars(result, os.path.join(out_dir, f"{stem}-roofline.png"), "roofline"),
             sweeps(result, os.path.join(out_dir, f"{stem}-sweeps.png"))]
    return [p for p in paths if p]
