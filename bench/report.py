"""Rates, % of roofline and ratios; the terminal table, the JSON and the Markdown summary."""
from __future__ import annotations

import json
import os

from bench.providers import is_fastattn

RATE_UNITS = {"byte": ("GB/s", 1e9), "flop": ("GFLOP/s", 1e9), "image": ("images/s", 1.0)}
GPU_RATE_UNITS = dict(RATE_UNITS, flop=("TFLOP/s", 1e12))
ROOFLINE_SCALE = 1e9  # the measured rooflines are in GB/s and GFLOP/s
FAMILY_TITLES = {"cbam": "CBAM", "attention": "Spatial attention", "models": "Models"}


def roofline_value(roofline: dict, key: str | None) -> float | None:
    """'copy' -> copy GB/s; 'matmul/<dtype>' -> GFLOP/s of that dtype; None where not measured."""
    if key is None:
        return None
    if key == "copy":
        return roofline["copy"]["gbs"]
    entry = roofline["matmul"].get(key.split("/", 1)[1])
    return entry["gflops"] if entry else None


def peak_tflops(roofline: dict, rec: dict) -> float | None:
    """The device's dense peak for an attention case's dtype (bench.roofline.DENSE_PEAK_TFLOPS), else None."""
    peak = roofline.get("peak")
    if not peak or rec["work"]["unit"] != "flop":
        return None
    return peak["tflops"].get(rec["dtype"])


def ok(res: dict) -> bool:
    return res.get("status") == "ok" and res.get("median_ms") is not None


def column_ms(res: dict, column: str) -> float | None:
    """A provider's median under one allocator column, None where that column did not run or failed."""
    entry = (res.get("allocators") or {}).get(column)
    return entry["median_ms"] if entry and entry.get("status") == "ok" else None


def allocator_columns(recs: list[dict]) -> list[str]:
    """The allocator columns that ran in any of `recs`, in the order of bench.allocator_columns.COLUMNS."""
    from bench.allocator_columns import COLUMNS
    seen = {c for r in recs for res in r["results"].values() for c in (res.get("allocators") or {})}
    return [c for c in COLUMNS if c in seen] + sorted(seen - set(COLUMNS))


def _column_ratios(rec: dict, name: str) -> dict:
    """fastattn provider `name` against the fastest other provider within each allocator column:
    {column: {"best_other", "vs_best_other"}}."""
    out = {}
    for column in allocator_columns([rec]):
        mine = column_ms(rec["results"][name], column)
        others = {n: column_ms(res, column) for n, res in rec["results"].items() if not is_fastattn(n)}
        others = {n: t for n, t in others.items() if t is not None}
        if mine and others:
            best = min(others, key=others.get)
            out[column] = {"best_other": best, "vs_best_other": others[best] / mine}
    return out


def annotate(result: dict) -> None:
    """Add rate, % of roofline and the ratios to every case of `result`, in place.

    speedup of fastattn provider f over provider p = median time of p / median time of f (> 1: f is faster).
    On a GPU, attention rates are in TFLOP/s, with pct_peak: % of the device's dense peak for the dtype.
    """
    gpu = (result.get("environment") or {}).get("device_type") == "cuda"
    for rec in result["cases"]:
        unit, scale = (GPU_RATE_UNITS if gpu else RATE_UNITS)[rec["work"]["unit"]]
        roof = roofline_value(result["roofline"], rec["work"]["roofline"])
        peak = peak_tflops(result["roofline"], rec)
        rec["rate_unit"] = unit
        rec["roofline_value"] = roof
        if peak is not None:
            rec["peak_tflops"] = peak
        for res in rec["results"].values():
            if ok(res):
                per_s = rec["work"]["amount"] / (res["median_ms"] / 1e3)
                res["rate"] = per_s / scale
                res["pct_roofline"] = None if roof is None else 100.0 * per_s / (roof * ROOFLINE_SCALE)
                if peak is not None:
                    res["pct_peak"] = 100.0 * per_s / (peak * 1e12)
        timed = {name: res["median_ms"] for name, res in rec["results"].items() if ok(res)}
        others = {name: t for name, t in timed.items() if not is_fastattn(name)}
        best = min(others, key=others.get) if others else None
        rec["best_other"] = best
        rec["ratios"] = {}
        peaks = {name: res["peak_mem_mib"] for name, res in rec["results"].items()
                 if ok(res) and res.get("peak_mem_mib")}
        rss = {name: res["peak_rss_mib"] for name, res in rec["results"].items()
               if ok(res) and res.get("peak_rss_mib")}
        for name, t in timed.items():
            if is_fastattn(name):
                rec["ratios"][name] = {"vs": {p: tp / t for p, tp in timed.items() if p != name},
                                       "best_other": best,
                                       "vs_best_other": others[best] / t if best else None}
                by_column = _column_ratios(rec, name)
                if by_column:
                    rec["ratios"][name]["by_allocator"] = by_column
                if name in peaks:  # other's peak / fastattn's peak: > 1 means fastattn takes less memory
                    rec["ratios"][name]["peak_mem_vs"] = {p: m / peaks[name] for p, m in peaks.items() if p != name}
                if name in rss:  # the same for the resident-set readings
                    rec["ratios"][name]["peak_rss_vs"] = {p: m / rss[name] for p, m in rss.items() if p != name}


# ---------------------------------------------------------------------------
# Terminal table
# ---------------------------------------------------------------------------
def _num(value: float | None, empty: str = "-") -> str:
    """Three significant figures without exponents for the usual ranges: 1234, 123, 12.3, 1.23, 0.0123."""
    if value is None:
        return empty
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.{2 if abs(value) < 10 else 1}f}"
    return f"{value:.3g}"


def _memory(res: dict, key: str) -> str:
    """A peak-memory cell: the MiB, "failed" when the reading failed, "-" when none was taken."""
    return "failed" if f"{key}_error" in res else _num(res.get(f"{key}_mib"))


def _has_rss(recs: list[dict]) -> bool:
    return any("peak_rss_mib" in res or "peak_rss_error" in res for r in recs for res in r["results"].values())


def _case_name(rec: dict) -> str:
    if (rec.get("params") or {}).get("autocast"):  # x in that dtype, float32 parameters, under autocast
        return f"{rec['label']} autocast {rec['dtype']}"
    return rec["label"] + ("" if rec["dtype"] == "float32" else f" {rec['dtype']}")


def _render(rows: list[list[str]], right: set[int]) -> list[str]:
    """Aligned columns. A row shorter than the header ends in free text (a failure) that sets no width."""
    widths = [max(len(r[i]) for r in rows if i < len(r) - (len(r) < len(rows[0]))) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c if len(r) < len(widths) and i == len(r) - 1 else
                 c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)]
        lines.append("  ".join(cells).rstrip())
    return lines


def _column_cell(res: dict, column: str) -> str:
    """An allocator column's median, "failed" when it failed, "-" where it did not run."""
    entry = (res.get("allocators") or {}).get(column)
    return "-" if entry is None else "failed" if entry.get("status") != "ok" else _num(entry["median_ms"])


def _failure_text(res: dict, width: int = 110) -> str:
    text = f"FAILED at {res.get('stage', '?')}: {res.get('error', '')}".replace("\n", " ")
    return text if len(text) <= width else text[:width - 3] + "..."


def _busy_warning(env: dict) -> list[str]:
    """A line when other work shared the machine: timings then say more about the load than the kernels."""
    loads = [x[0] for x in (env.get("load_average_start"), env.get("load_average_end")) if x]
    cores = env.get("cpu_count") or 1
    if not loads or max(loads) <= 0.75 * cores + 0.5:
        return []
    return [f"WARNING: the machine was busy (load average up to {max(loads):.1f} on {cores} cores): "
            f"timings include waiting for other processes and are not reliable"]


def _memory_line(memory: dict | None) -> list[str]:
    """What the peak MiB and RSS MiB columns are, when the run took them."""
    if not memory:
        return []
    rss = memory.get("rss")
    heap = ", ".join(f"{k}={v}" for k, v in rss["malloc_env"].items()) if rss else ""
    return ["peak MiB: tensor memory of one fwd+bwd/train call over what it held before"
            + (f"; RSS MiB: resident set of that call, in a process per provider ({heap}), for "
               f"{rss['cases']}" if rss else "")]


def _allocator_lines(result: dict) -> list[str]:
    """What each allocator column is; the headline first."""
    columns = result.get("allocators")
    env = result["environment"]
    if not columns:
        return [f"allocator: {env['allocator']['mode']} ({env['allocator']['detail']})"]
    lines = [f"allocators (CPU): median ms = {columns['headline']} allocator; jemalloc and tcmalloc columns on "
             f"{columns['preloaded_cases']}"]
    for name, entry in columns["columns"].items():
        lines.append(f"  {name}: " + (entry["detail"] if entry["status"] == "measured" else
                                      f"not measured: {entry['reason']}"))
    return lines


def header(result: dict) -> list[str]:
    env, roof = result["environment"], result["roofline"]
    mm = ", ".join(f"{d} {_num(m['gflops'])}" for d, m in roof["matmul"].items())
    load, load_end = env.get("load_average_start"), env.get("load_average_end")
    return [f"fastattn bench: {result['device']} ({result['mode']} run, {env['date']})",
            f"torch {env['torch']}, triton {env['triton']}, timm {env['timm']}, {env['threads']} threads; "
            f"fastattn compiled library: {'yes' if env['fastattn']['compiled_library'] else 'no'}",
            *(_allocator_lines(result)),
            f"roofline: copy {_num(roof['copy']['gbs'])} GB/s; matmul GFLOP/s: {mm}"
            + (f"; dense peak of the {roof['peak']['device']} (TFLOP/s): "
               + ", ".join(f"{d} {_num(t)}" for d, t in roof["peak"]["tflops"].items()) if roof.get("peak") else "")
            + (f"; load average (1 min) at start {load[0]:.1f}" if load else "")
            + (f", at end {load_end[0]:.1f}" if load_end else ""),
            *([result["dtype_note"]] if result.get("dtype_note") else []),
            *(_busy_warning(env)),
            *(_memory_line(result.get("memory"))),
            f"times: median of {result['timing']['repeats'][0]}-{result['timing']['repeats'][1]} interleaved runs "
            f"after warm-up (ms); speedup = other's time / fastattn's time"]


def table(result: dict) -> str:
    lines = header(result)
    for family in result["families"]:
        recs = [r for r in result["cases"] if r["family"] == family]
        if not recs:
            continue
        cold = any("cold_median_ms" in res for r in recs for res in r["results"].values())
        rss = _has_rss(recs)
        peak = any("peak_tflops" in r for r in recs)
        unit = recs[0]["rate_unit"]
        headline = (result.get("allocators") or {}).get("headline")
        extra = [c for c in allocator_columns(recs) if c != headline]
        cols = ["case", "pass", "provider", "median ms"] + [f"{c} ms" for c in extra] + \
            (["cold ms"] if cold else []) + \
            [unit, "% roof"] + (["% peak"] if peak else []) + ["peak MiB"] + (["RSS MiB"] if rss else []) + \
            ["fastattn vs best other"]
        rows = [cols]
        for rec in recs:
            first = True
            for name in rec["providers"]:
                res = rec["results"][name]
                lead = [_case_name(rec) if first else "", rec["pass"] if first else "", name]
                first = False
                if not ok(res):
                    rows.append(lead + [_failure_text(res)])
                    continue
                ratio = rec["ratios"].get(name)
                vs = "" if not ratio or ratio["vs_best_other"] is None else \
                    f"{ratio['vs_best_other']:.2f}x vs {ratio['best_other']}"
                rows.append(lead + [_num(res["median_ms"])] + [_column_cell(res, c) for c in extra] +
                            ([_num(res.get("cold_median_ms"))] if cold else []) +
                            [_num(res.get("rate")), _num(res.get("pct_roofline"))] +
                            ([_num(res.get("pct_peak"))] if peak else []) + [_memory(res, "peak_mem")] +
                            ([_memory(res, "peak_rss")] if rss else []) + [vs])
        right = set(range(3, len(cols) - 1))
        lines += ["", f"== {FAMILY_TITLES[family]} =="] + _render(rows, right)
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Markdown summary
# ---------------------------------------------------------------------------
def _md_table(rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows[1:]]


def _allocator_table(recs: list[dict], names: list[str], fa: list[str]) -> list[str]:
    """Median ms under each allocator column (CPU), and fastattn vs the best other within each column."""
    columns = allocator_columns(recs)
    if len(columns) < 2:
        return []
    rows = [["case", "pass", "provider"] + columns]
    for rec in recs:
        for n in names:
            res = rec["results"].get(n)
            if res is not None and res.get("allocators"):
                rows.append([_case_name(rec), rec["pass"], n] + [_column_cell(res, c) for c in columns])
        for n in fa:
            by = (rec["ratios"].get(n) or {}).get("by_allocator") or {}
            rows.append([_case_name(rec), rec["pass"], f"{n} vs best other"] + [
                f"{by[c]['vs_best_other']:.2f}x ({by[c]['best_other']})" if c in by else "-" for c in columns])
    faults = [["case", "pass", "provider"] + columns]
    for rec in recs:
        for n in names:
            entries = ((rec["results"].get(n) or {}).get("allocators") or {})
            if any("minor_faults_per_call" in e for e in entries.values()):
                faults.append([_case_name(rec), rec["pass"], n] + [
                    _num((entries.get(c) or {}).get("minor_faults_per_call")) for c in columns])
    return ["Median ms under each allocator (each column's own processes; - where a column did not run):", ""] + \
        _md_table(rows) + [""] + (
            ["Page faults per call (minor faults, median; the pages a call touched afresh, whatever the load):", ""]
            + _md_table(faults) + [""] if len(faults) > 1 else [])


def markdown(result: dict, plots: list[str]) -> str:
    lines = [f"# fastattn benchmark: {result['device']}", ""]
    lines += [f"  - {line.strip()}" if line.startswith("  ") else f"- {line}" for line in header(result)[1:]]
    lines += [f"- wall time of the run: {result['timing']['wall_s']:.0f} s; commit {result['environment']['git_commit']}",
              "", "Full data: the JSON next to this file; method: [bench/README.md](../README.md).", ""]
    for family in result["families"]:
        recs = [r for r in result["cases"] if r["family"] == family]
        if not recs:
            continue
        names = list(dict.fromkeys(n for r in recs for n in r["providers"]))
        fa = [n for n in names if is_fastattn(n)]
        unit = recs[0]["rate_unit"]
        roofed = recs[0]["work"]["roofline"] is not None
        lines += [f"## {FAMILY_TITLES[family]}", "", f"Median time in ms; {unit}"
                  + (" and % of roofline" if roofed else "") + " for fastattn providers.", ""]
        head = ["case", "pass"] + names + [f"{n}: vs best other" for n in fa] + \
            [f"{n}: {unit}" + (" (% roof)" if roofed else "") for n in fa]
        rows = [head]
        for rec in recs:
            row = [_case_name(rec), rec["pass"]]
            for n in names:
                res = rec["results"].get(n)
                row.append("" if res is None else _num(res["median_ms"]) if ok(res) else "failed")
            for n in fa:
                r = rec["ratios"].get(n)
                row.append(f"{r['vs_best_other']:.2f}x ({r['best_other']})" if r and r["vs_best_other"] else "-")
            for n in fa:
                res = rec["results"].get(n, {})
                pct = res.get("pct_roofline")
                row.append("-" if not ok(res) else _num(res["rate"]) + (f" ({_num(pct)}%)" if pct is not None else ""))
            rows.append(row)
        lines += _md_table(rows) + [""]
        peaked = [r for r in recs if "peak_tflops" in r]
        if peaked:
            lines += [f"{unit} and % of the device's dense peak for the dtype, every provider:", ""]
            rows = [["case", "pass"] + names]
            for rec in peaked:
                rows.append([_case_name(rec), rec["pass"]] + [
                    ("" if res is None else f"{_num(res['rate'])} ({_num(res['pct_peak'])}%)" if ok(res) else "failed")
                    for res in (rec["results"].get(n) for n in names)])
            lines += _md_table(rows) + [""]
        lines += _allocator_table(recs, names, fa)
        mem = [r for r in recs if any(ok(x) and x.get("peak_mem_mib") is not None for x in r["results"].values())]
        if mem:
            rss = _has_rss(mem)
            lines += ["Peak memory of one call over what is held before it (MiB): tensor memory from the allocation "
                      "trace" + (" / resident set, in a process per provider (- where not measured)" if rss else "")
                      + ":", ""]
            rows = [["case", "pass"] + names]
            for rec in mem:
                rows.append([_case_name(rec), rec["pass"]] + [
                    (_memory(res, "peak_mem") + (" / " + _memory(res, "peak_rss") if rss else "")) if ok(res)
                    else "failed" for res in (rec["results"].get(n, {}) for n in names)])
            lines += _md_table(rows) + [""]
    failures = [(r, n, res) for r in result["cases"] for n, res in r["results"].items() if not ok(res)]
    if failures:
        lines += ["## Failed providers", ""]
        seen = set()
        for rec, name, res in failures:
            key = (name, res.get("error"))
            if key in seen:
                continue
            seen.add(key)
            count = sum(1 for r, n, x in failures if (n, x.get("error")) == key)
            error = (res.get("error") or "").splitlines()[0] if res.get("error") else ""
            error = error if len(error) <= 240 else error[:237] + "..."
            lines.append(f"- `{name}` ({count} case(s), first {rec['id']}, at {res.get('stage')}): {error}")
        lines.append("")
    for path in plots:
        name = os.path.basename(path)
        lines += [f"![{name}]({name})", ""]
    return "\n".join(lines)


def write(result: dict, out_dir: str, stem: str, plots: bool = True) -> list[str]:
    """Writes <stem>.json, the PNG plots and <stem>.md into out_dir; returns their paths."""
    written = []
    if plots:
        from bench import plots as plots_mod
        written += plots_mod.write_all(result, out_dir, stem)
    json_path = os.path.join(out_dir, stem + ".json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    md_path = os.path.join(out_dir, stem + ".md")
    with open(md_path, "w") as f:
        f.write(markdown(result, written))
    return [json_path, md_path] + written


def main(argv: list[str] | None = None) -> int:
    """python -m bench.report RESULT.json: rewrite the summary and the plots of a run from its JSON."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    parser.add_argument("json", help="a bench/results/<stem>.json")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        result = json.load(f)
    annotate(result)
    out_dir, name = os.path.split(os.path.abspath(args.json))
    paths = write(result, out_dir, name[:-len(".json")] if name.endswith(".json") else name)
    print(table(result))
    print("\nwrote " + ", ".join(os.path.relpath(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
