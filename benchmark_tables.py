"""benchmark.py's results as text: the eager figures, then the graphed and compiled ones beside
them (what `python benchmark.py` prints)."""
from __future__ import annotations

from figures import mib, pct
from models import model_name

# A 100-epoch run of the paper (45,000 images at batch 50): what one-off costs are weighed against.
PAPER_RUN_STEPS = 100 * (45_000 // 50)


def table(r: dict) -> str:
    """Everything measured: the eager figures, then the graphed and compiled ones."""
    return "\n".join(filter(None, [eager_table(r), other_tables(r)]))


def eager_table(r: dict) -> str:
    arch = model_name(r["model"], r["depth"], r["growth_rate"], r["bottleneck"])
    lines = [
        f"{arch}, batch {r['batch_size']}, {r['steps']} steps, {r['how_scale']} "
        f"{'scaled' if r['scale_lr'] else 'unscaled'} t_0={r['t_0']:g}, {r['device']}"
        f"{' (' + r['device_name'] + ')' if r['device_name'] else ''}, amp {r['amp']}"
        f"{', channels-last' if r['channels_last'] else ''}, torch {r['torch']}",
        f"  baseline runs   {', '.join(f'{t:.3f}' for t in r['baseline_runs_s'])} s"
        f"   median {r['baseline_s']:.3f} s  ({r['baseline_images_per_s']:.0f} img/s)",
        f"  FreezeOut runs  {', '.join(f'{t:.3f}' for t in r['freezeout_runs_s'])} s"
        f"   median {r['freezeout_s']:.3f} s  ({r['freezeout_images_per_s']:.0f} img/s)",
        f"  speedup: measured {pct(r['measured_speedup'])} | paper estimate {pct(r['estimated_speedup'])}"
        f" | FLOPs {pct(r['flop_speedup'])} | ideal (step time per freeze level) {pct(r['ideal_speedup'])}",
        f"  saved activations, last quarter: baseline {mib(r['saved_bytes_baseline'])}, "
        f"FreezeOut {mib(r['saved_bytes_freezeout'])}",
        f"  CUDA max allocated, last quarter: baseline {mib(r['peak_mem_baseline'])}, "
        f"FreezeOut {mib(r['peak_mem_freezeout'])}",
        f"  FreezeOut bookkeeping: {100 * r['overhead_frac']:.3f}% of the step time",
    ]
    return "\n".join(lines)


def other_tables(r: dict) -> str:
    """The graphed and compiled figures, beside the eager ones (empty where none were measured)."""
    return "\n".join(filter(None, [step_table(r, "graphed"), step_table(r, "compiled")]))


STEP_TITLES = {"graphed": ("CUDA graphs", "one per freeze level; capture time", "captures"),
               "compiled": ("torch.compile", "one compile per freeze level; compile time", "compiles")}


def step_table(r: dict, kind: str) -> str:
    """The figures of the graphed or the compiled step (empty when not measured)."""
    g, lines = r.get(kind), []
    title, what, events = STEP_TITLES[kind]
    if kind == "compiled" and g is not None and g.get("compile_graphed"):
        title, what, events = ("torch.compile in CUDA graphs", "a compile and a capture per freeze level; "
                               "their time", "compiles and captures")
    if f"{kind}_error" in r:
        lines.append(f"  {title}: failed: {r[f'{kind}_error']}")
    if g is not None:
        lines += [
            f"  {title} ({what} excluded from the runs, given below):",
            f"    baseline runs   {', '.join(f'{t:.3f}' for t in g['baseline_runs_s'])} s"
            f"   median {g['baseline_s']:.3f} s  ({g['baseline_images_per_s']:.0f} img/s, "
            f"{g['baseline_images_per_s'] / r['baseline_images_per_s']:.2f}x eager)",
            f"    FreezeOut runs  {', '.join(f'{t:.3f}' for t in g['freezeout_runs_s'])} s"
            f"   median {g['freezeout_s']:.3f} s  ({g['freezeout_images_per_s']:.0f} img/s, "
            f"{g['freezeout_images_per_s'] / r['freezeout_images_per_s']:.2f}x eager)",
            f"    speedup: measured {pct(g['measured_speedup'])} | projected to a {PAPER_RUN_STEPS:,}-step run "
            f"{pct(g['projected_speedup'])} | FLOPs {pct(r['flop_speedup'])}"
            f" | ideal ({kind} step time per freeze level) {pct(g['ideal_speedup'])}",
            f"    steps per run: baseline {step_counts(g['step_kinds']['baseline'])}; "
            f"FreezeOut {step_counts(g['step_kinds']['freezeout'])}",
            f"    {g['captures']} {events}, {1000 * g['capture_s_per_capture']:.1f} ms each; the warm-up runs' "
            f"{g['warmup_captures']} (the process's first): {g['warmup_capture_s']:.2f} s in all; "
            f"{100 * g['paper_run_capture_share']:.3f}% of a 100-epoch paper run's training time",
        ]
        if g["peak_mem_baseline"] is not None:
            lines.append(f"    CUDA max allocated, last quarter: baseline {mib(g['peak_mem_baseline'])}, "
                         f"FreezeOut {mib(g['peak_mem_freezeout'])}; max reserved (the graphs' pools "
                         f"included): baseline {mib(g['reserved_baseline'])}, FreezeOut {mib(g['reserved_freezeout'])}")
    return "\n".join(lines)


def step_counts(kinds: dict) -> str:
    """"1 eager, 39 graphed, ...": the steps of a run by the kind that ran."""
    return ", ".join(f"{n} {kind}" for kind, n in kinds.items())


# Repeats of one run whose slowest takes this much longer than the fastest: the machine's speed
# varied while it was measured (other work, a shared host, a throttled CPU).
SPREAD = 1.25
# A load average above the cores by more than this: other work was running beside the benchmark.
BUSY_MARGIN = 0.5


def unreliable(r: dict) -> str | None:
    """Why the measured speedup is not to be trusted, in one line (None when nothing says so):
    the repeats of a run spread too far, or the host was busy."""
    said = []
    for side in ("baseline", "freezeout"):
        runs = r[f"{side}_runs_s"]
        if len(runs) > 1 and max(runs) > SPREAD * min(runs):
            said.append(f"the {side} runs spread {max(runs) / min(runs):.2f}x ({min(runs):.3g} to {max(runs):.3g} s)")
    load, cores = r.get("host_load"), r.get("cpu_count")
    if load is not None and cores and load > cores + BUSY_MARGIN:
        said.append(f"the host's load average reached {load:.1f} on {cores} cores")
    if not said:
        return None
    return (f"{' and '.join(said)}: the machine's speed varied while it was measured (other work beside it?), so "
            "the measured speedup is not reliable; measure again on a quiet machine")
