"""The table of a reproduction grid (reproduce.py): one row per strategy and t_0, seeds pooled,
from the runs' own config and summary records, as results.csv and results.md, with the runs
still missing and the host's load.
"""
from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import Optional

from figures import STRATEGIES, pct
from launch import run_progress
from messages import plural
from metrics_logger import read_records, write_atomically
from models import model_name


def mean_std(values: list) -> tuple[Optional[float], Optional[float]]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(jobs: list, out: Path) -> list[dict]:
    """One row per (strategy, setting), seeds pooled; the baseline first. Runs that have not
    finished are left out."""
    groups: dict = {}
    for job in jobs:
        metrics = out / "runs" / job.name / "metrics.jsonl"
        if not metrics.exists() or not read_records(metrics, "summary"):
            continue
        config = read_records(metrics, "config")[0]
        summary = read_records(metrics, "summary")[-1]
        groups.setdefault((job.strategy, job.setting, job.target), []).append((config, summary, job))
    base = [(c, s) for c, s, _ in groups.get((None, 1.0, False), [])]
    base_time = statistics.mean(s["train_time_s"] for _, s in base) if base else None
    base_val, _ = mean_std([s["val_err"] for _, s in base])
    base_test, _ = mean_std([s["test_err"] for _, s in base])
    rows = []
    names = list(STRATEGIES)
    order = sorted(groups, key=lambda k: (k[0] is not None, names.index(k[0]) if k[0] else 0, k[1]))
    for strategy, setting, target in order:
        runs = [(c, s) for c, s, _ in groups[(strategy, setting, target)]]
        configs, summaries = [c for c, _ in runs], [s for _, s in runs]
        jobs_run = [job for _, _, job in groups[(strategy, setting, target)]]
        time_s = statistics.mean(s["train_time_s"] for s in summaries)
        val, val_std = mean_std([s["val_err"] for s in summaries])
        test, test_std = mean_std([s["test_err"] for s in summaries])
        rows.append({
            "strategy": strategy or "baseline",
            "t_0": statistics.mean(c["t_0"] for c in configs),
            "target_speedup": setting if target else None,
            "seeds": len(runs),
            "paper_speedup": configs[0]["paper_speedup"],
            "flop_speedup": configs[0]["flop_speedup"],
            "measured_speedup": None if base_time is None else 1 - time_s / base_time,
            "train_time_s": time_s,
            "val_err": val, "val_err_std": val_std,
            "test_err": test, "test_err_std": test_std,
            "delta_val_err": None if val is None or base_val is None else val - base_val,
            "delta_test_err": None if test is None or base_test is None else test - base_test,
            "run_dirs": [str(out / "runs" / job.name) for job in jobs_run],
            "device": configs[0].get("device"), **host_load(runs),
        })
    return rows


def missing_runs(jobs: list, out: Path, epochs: int) -> list[tuple]:
    """(job, its state in words) for every run of the grid that has not finished."""
    states = [(job, run_progress(out / "runs" / job.name, epochs)) for job in jobs]
    return [(job, state) for job, state in states if state != "finished"]


# A run keeps every core busy itself (the quick preset on 2 idle cores: load 2.0 to 2.1), so the
# host is busy only where the load exceeds the cores by more than this: other work was running.
BUSY_MARGIN = 0.5


def host_load(runs: list[tuple[dict, dict]]) -> dict:
    """The highest load average seen at any run's start or end, and whether it exceeded the
    host's cores by more than BUSY_MARGIN: then the runs competed with other work for the CPU
    and their times are not comparable."""
    loads = [x for c, s in runs for x in (c.get("load_start"), s.get("load_end")) if x is not None]
    cores = [c["cpu_count"] for c, _ in runs if c.get("cpu_count")]
    load = max(loads) if loads else None
    busy = load is not None and bool(cores) and load > min(cores) + BUSY_MARGIN
    return {"host_load": load, "busy_host": busy}


COLUMNS = ["strategy", "t_0", "target_speedup", "seeds", "paper_speedup", "flop_speedup",
           "measured_speedup", "train_time_s", "val_err", "val_err_std", "test_err", "test_err_std",
           "delta_val_err", "delta_test_err", "host_load", "busy_host"]


def write_csv(rows: list[dict], path: Path) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    data = text.getvalue().encode("utf-8")
    write_atomically(path, lambda f: f.write(data))


# Points between a measured speedup and its FLOP estimate beyond which the table marks it.
FAR = 10.0


def far_from_estimate(row: dict) -> bool:
    measured, flop = row.get("measured_speedup"), row.get("flop_speedup")
    return row["strategy"] != "baseline" and measured is not None and flop is not None \
        and abs(measured - flop) * 100 > FAR


def paper_setting(settings: dict) -> bool:
    """Whether the grid runs the paper's Figure 3 setting: CIFAR, every image, 100 epochs."""
    return settings["dataset"] in ("cifar10", "cifar100") and not settings["subset"] and settings["epochs"] >= 100


def setting_line(settings: dict) -> str:
    """The grid's model, data and length in words, for the table and the figures' titles."""
    arch = model_name(settings["model"], settings["depth"], settings["growth_rate"])
    data = settings["dataset"] + (f" (first {settings['subset']:,} images of each split)" if settings["subset"] else "")
    seeds = settings["seeds"]
    return (f"{arch} on {data}, {plural(settings['epochs'], 'epoch')}, batch {settings['batch_size']}, "
            f"{plural(len(seeds), 'seed')} ({', '.join(map(str, seeds))})")


def caveats(settings: dict, rows: list[dict]) -> list[str]:
    """What the table cannot say, from the grid's own settings and rows."""
    said = []
    if settings["dataset"] == "synthetic":
        said.append("The synthetic set is not CIFAR: these errors say nothing of the paper's accuracy claims; the grid "
                    "shows the machinery, the schedules and the timing end to end.")
    if settings["epochs"] < 100:
        said.append(f"{plural(settings['epochs'], 'epoch')} against the paper's 100: in so short a run every unit "
                    "that stops early costs more error than in a full one.")
    if settings["subset"]:
        said.append(f"Only the first {settings['subset']:,} images of each split.")
    if len(settings["seeds"]) == 1:
        said.append("One seed: no spread to show; differences of a few points, in error or in speedup, are within "
                    "what one run to the next gives.")
    return said


def write_markdown(rows: list[dict], settings: dict, path: Path, missing: list = ()) -> None:
    """The table, then what it leaves out: `missing` lists (job, state) of unfinished runs."""
    def err(row, key):
        # One seed has no spread to show: say so rather than print a std of 0.
        mean, std = row[key], row[key + "_std"]
        return "n/a" if mean is None else f"{mean:.2f} (n = 1)" if row["seeds"] == 1 else f"{mean:.2f} ± {std:.2f}"

    def delta(x):
        return "n/a" if x is None else f"{x:+.2f}"

    lines = [
        "# FreezeOut: the paper's grid" if paper_setting(settings) else
        "# FreezeOut: a small grid, not the paper's setting", "",
        f"{setting_line(settings)}, device "
        f"{rows[0]['device'] if rows and rows[0].get('device') else settings['device']}.", "",
        *[f"- {caveat}" for caveat in caveats(settings, rows)], "",
        "Speedups are fractions of the baseline's training time (evaluation excluded); errors in %, "
        "mean ± std over seeds" + ("; (n = 1): a single seed, so no std" if any(r["seeds"] == 1 for r in rows)
                                     else "") + "; Δ against the baseline.", "",
        "| strategy | t_0 | paper est. | FLOP est. | measured | train time (s) | val err | Δ val | test err | Δ test "
        "| host load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t0 = f"{r['t_0']:.3g}" + (f" (target {r['target_speedup']:g})" if r["target_speedup"] is not None else "")
        lines.append(
            f"| {r['strategy']} | {t0} | {pct(r['paper_speedup'])} | {pct(r['flop_speedup'])} | "
            f"{pct(r['measured_speedup'])}{' †' if far_from_estimate(r) else ''} | {r['train_time_s']:.1f} | "
            f"{err(r, 'val_err')} | "
            f"{delta(r['delta_val_err'])} | {err(r, 'test_err')} | {delta(r['delta_test_err'])} | "
            f"{'n/a' if r.get('host_load') is None else format(r['host_load'], '.1f')}"
            f"{' ⚠ busy host' if r.get('busy_host') else ''} |")
    if any(far_from_estimate(r) for r in rows):
        lines += ["", f"† measured more than {FAR:g} points away from the FLOP estimate, either way: a short run timed "
                      "once on a shared or busy host varies that much, and a FLOP count leaves out element-wise work "
                      "(batch norm, activations, concatenations), which frozen units skip as well. Speedups worth "
                      "quoting come from benchmark.py's alternating pairs."]
    if any(r.get("busy_host") for r in rows):
        lines += ["", "⚠ busy host: the host's load average (the highest at the runs' starts and ends) "
                      f"exceeded its number of cores by more than {BUSY_MARGIN}, so other work shared "
                      "the CPU with those runs: their times, and the speedups measured from them, "
                      "are not reliable."]
    if missing:
        lines += ["", "## Missing", "", f"{len(missing)} run(s) of the grid have not finished and are not in "
                  "the table:", ""]
        lines += [f"- {job.label} (`runs/{job.name}`): {state}" for job, state in missing]
    lines += ["", "Figures: `lr_schedules.png`, `error_vs_speedup.png`, `error_vs_time.png`.", ""]
    data = "\n".join(lines).encode("utf-8")
    write_atomically(path, lambda f: f.write(data))


