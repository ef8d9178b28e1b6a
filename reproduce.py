"""Reproduce the paper's FreezeOut results: run the grid, then write its table and figures.

    python reproduce.py --preset quick --out /tmp/rep     # synthetic data, small DenseNet-BC:
                                                          # under 15 minutes on 2 CPU cores
    python reproduce.py --preset paper --out rep-paper    # the paper's Figure 3: DenseNet-BC
                                                          # k=12 L=76, CIFAR-10, 100 epochs (GPU)

The grid is the baseline (t_0 = 1) plus {linear, cubic} x {scaled, unscaled} x t_0 values (or
target speedups) x seeds, each run by train.py's `main` in its own directory under OUT/runs:
a finished run is skipped, an interrupted one resumed, so the command can be stopped and run
again. Then OUT gets `results.md` and `results.csv` (per strategy and t_0: the paper's and the
FLOP estimates, the measured wall-clock speedup against the baseline, final validation and test
error, mean +/- std over seeds, and the change against the baseline; the host's load, flagged
where it exceeded the cores; and in results.md the runs still missing) and three figures:
`lr_schedules.png` (the paper's Figure 1), `error_vs_speedup.png` (Figure 3's design curve) and
`error_vs_time.png` (Figure 4).
"""
from __future__ import annotations

import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from cli import (
    EXIT_FAILED,
    EXIT_USAGE,
    ArgumentParser,
    check_positive,
    check_seed,
    check_t_0,
    examples,
    flag_spellings,
    is_stop_status,
    run_as_script,
    stop_status,
)
from config import (
    NAMES,
    Config,
    add_settings,
    changed,
    check_which_dataset,
    differences,
    flag,
    from_requests,
    ignored_flags_note,
    record,
    resolve,
    to_argv,
)
from data_sets import DATASETS
from engine import resolve_device
from figures import STRATEGIES, plot_error_vs_speedup, plot_error_vs_time, plot_lr_schedules
from launch import (
    GridRun,
    GridStopped,
    Outcome,
    busy,
    finished_elsewhere,
    format_duration,
    import_submitit,
    outcome_line,
    run_one,
    run_processes,
    run_state,
    run_submitit,
    slots,
    start_argv,
    threads_per_run,
)
from messages import plural
from metrics_logger import WriteError
from models import DEFAULTS, MODELS, applies, build_model, check_depth, model_name, resolve_size
from results import missing_runs, setting_line, summarize, write_csv, write_markdown
from rundir import RunBusy, saved_config

PRESETS = {
    # The paper's Figure 3 (DenseNet-BC k=12 L=76 on CIFAR-10, 100 epochs): 37 runs of about
    # an hour each on one modern GPU.
    "paper": dict(model="densenet", depth=76, growth_rate=12, dataset="cifar10", which_dataset=None,
                  epochs=100, batch_size=50, subset=None,
                  t0s=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], seeds=[0]),
    # Small enough for 2 CPU cores in minutes; the synthetic set is not CIFAR.
    "quick": dict(model="densenet", depth=22, growth_rate=12, dataset="synthetic", which_dataset=10,
                  epochs=5, batch_size=64, subset=2048, t0s=[0.3, 0.5, 0.8], seeds=[0]),
}


@dataclass
class Job:
    """One run of the grid; strategy None is the baseline."""
    strategy: Optional[str]
    setting: Optional[float]  # t_0, or the target speedup when target is True
    seed: int
    target: bool = False
    cfg: Optional[Config] = None  # the run's train.py settings, as asked for

    @property
    def argv(self) -> list[str]:
        """train.py's flags for the run."""
        return to_argv(self.cfg)

    @property
    def name(self) -> str:
        if self.strategy is None:
            return f"baseline_s{self.seed}"
        key = "ts" if self.target else "t0"
        return f"{self.strategy}_{key}-{self.setting:g}_s{self.seed}"

    def grid_run(self, out: Path) -> GridRun:
        return GridRun(self.name, self.label, tuple(self.argv), out / "runs" / self.name)

    @property
    def label(self) -> str:
        if self.strategy is None:
            return f"baseline, seed {self.seed}"
        what = "target speedup" if self.target else "t_0"
        return f"{self.strategy} {what} {self.setting:g}, seed {self.seed}"


# ---------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------
def make_grid(settings: dict, out: Path) -> list[Job]:
    """The grid's runs, each with the settings train.py runs it by."""
    # The grid's choices of train.py's settings (those its flags share with train.py); the
    # others at their defaults.
    common = {**{name: settings[name] for name in NAMES if name in settings}, "out_dir": str(out / "runs")}
    common["depth"], common["growth_rate"] = resolve_size(settings["model"], settings["depth"],
                                                          settings["growth_rate"])
    targets = settings["targets"]
    jobs = []
    for seed in settings["seeds"]:
        jobs.append(Job(None, 1.0, seed))
        for strategy in settings["strategies"]:
            for value in (targets or settings["t0s"]):
                jobs.append(Job(strategy, value, seed, target=bool(targets)))
    for job in jobs:
        how, scaled = STRATEGIES[job.strategy] if job.strategy else ("cubic", True)
        fo = {"target_speedup": job.setting} if job.target else {"t_0": job.setting}
        job.cfg = from_requests({**common, "seed": job.seed, "how_scale": how, "scale_lr": scaled, **fo,
                                 "name": job.name})
    return jobs


def wanted_config(job: Job) -> dict:
    """The settings' half of the config record train.py would give the job's run: what a run
    found in its directory must agree with."""
    return record(resolve(job.cfg, set(changed(job.cfg))), job.argv)


def mismatched_runs(jobs: list[Job], out: Path) -> list[tuple[Job, list[str]]]:
    """(job, the settings its directory's run differs on) for every run of another setup found
    where the grid would reuse it (an earlier grid with other epochs, data, ... in the same --out)."""
    found = []
    for job in jobs:
        saved = saved_config(out / "runs" / job.name)
        different = [] if saved is None else differences(saved, wanted_config(job))
        if different:
            found.append((job, different))
    return found


def move_aside(run_dir: Path) -> Path:
    """Rename a run directory out of the grid's way: NAME.mismatched-1, -2, ..."""
    n = 1
    while run_dir.with_name(f"{run_dir.name}.mismatched-{n}").exists():
        n += 1
    aside = run_dir.with_name(f"{run_dir.name}.mismatched-{n}")
    run_dir.rename(aside)
    return aside


def run_grid(jobs: list[Job], out: Path, launch: dict) -> list[Outcome]:
    """Run what is not finished as `launch` says (see `launch_settings`): one run after another
    in this process, N at once as processes, or as submitit jobs. Returns the runs' outcomes;
    raises GridStopped on a stop signal."""
    todo = [job.grid_run(out) for job in jobs if run_state(out / "runs" / job.name) != "finished"]
    print(f"{plural(len(jobs), 'run')} in the grid, {len(jobs) - len(todo)} already finished", flush=True)
    if not todo:
        return []
    if launch["launcher"] in ("slurm", "submitit-local"):
        cluster = "slurm" if launch["launcher"] == "slurm" else "local"
        return run_submitit(todo, cluster, out / "logs" / "submitit", launch["submitit"], launch["threads"])
    if len(launch["places"]) > 1:
        return run_processes(todo, launch["places"], launch["threads"], out / "logs")
    return run_in_this_process(todo, launch["threads"])


def run_in_this_process(todo: list[GridRun], threads: int | None) -> list[Outcome]:
    """One run after another, each train.py's output on the console, with a progress line and
    an ETA. A run that fails (its error printed by train.py) is reported and the others go on;
    a stop signal ends the grid (train.py's SystemExit with 128 + the signal)."""
    if threads is not None:
        torch.set_num_threads(threads)
    outcomes = []
    for i, run in enumerate(todo, 1):
        start = time.perf_counter()
        try:
            argv = start_argv(run)
            ended = finished_elsewhere(run) if argv is None else None
        except RunBusy as e:  # another process owns its directory: left alone
            argv, ended = None, busy(run, e)
        if ended is not None:
            outcomes.append(ended)
            print(f"[{i}/{len(todo)}] {outcome_line(ended)}", flush=True)
            continue
        print(f"[{i}/{len(todo)}] {run.label}: {'resuming' if '--resume' in argv else 'starting'}", flush=True)
        try:
            run_one(argv)
        except SystemExit as e:
            if is_stop_status(e.code):
                raise
            try:  # taken by another process between the look and the start: busy, not failed
                start_argv(run)
            except RunBusy as owned:
                outcomes.append(busy(run, owned))
            else:
                outcomes.append(Outcome(run, "failed", time.perf_counter() - start,
                                        f"train.py exited {e.code}; its error is above"))
            print(f"[{i}/{len(todo)}] {outcome_line(outcomes[-1])}", flush=True)
            continue
        outcomes.append(Outcome(run, "finished", time.perf_counter() - start))
        left = statistics.mean(o.seconds for o in outcomes if o.state == "finished") * (len(todo) - i)
        print(f"[{i}/{len(todo)}] {run.label}: done in {outcomes[-1].seconds:.0f} s; "
              f"about {format_duration(left)} left", flush=True)
    return outcomes


def preset_default(key: str, more: str = "") -> str:
    """What a preset-overriding flag means when it is not given, for its help."""
    def show(value):
        return "all" if value is None else " ".join(map(str, value)) if isinstance(value, list) else str(value)
    values = ", ".join(f"{name} {show(preset[key])}" for name, preset in PRESETS.items())
    return f"(default: the preset's: {values}{more})"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=examples(__doc__), flag_of=flag)

    def add(*names, **kwargs):
        p.add_argument(*flag_spellings(*names), **kwargs)

    add("--preset", choices=list(PRESETS), default="quick", help="the grid's settings")
    add("--out", default="reproduction", help="where the runs, the table and the figures go")
    add("--model", choices=MODELS, default=None, help="the model " + preset_default("model"))
    add("-L", "--depth", type=int, default=None,
        help="the depth " + preset_default("depth", "; with --model, that model's default"))
    add("-k", "--growth-rate", type=int, default=None,
        help="DenseNet growth rate or WRN widening factor; unused by vgg "
             + preset_default("growth_rate", "; with --model, that model's default"))
    add("--dataset", choices=DATASETS, default=None, help="the data set " + preset_default("dataset"))
    add("--which_dataset", type=int, choices=[10, 100], default=None,
        help="classes of the synthetic set (default: the preset's: quick 10; else 100)")
    add("--epochs", type=int, default=None, help="training epochs " + preset_default("epochs"))
    add("--batch_size", type=int, default=None, help="batch size " + preset_default("batch_size"))
    add("--subset", type=int, default=None,
        help="cap every split at its first N images " + preset_default("subset"))
    add("--t0s", type=float, nargs="+", default=None, help="t_0 values of the grid " + preset_default("t0s"))
    add("--target-speedups", type=float, nargs="+", default=None,
        help="instead of t_0 values: target speedups, each strategy's t_0 solved from its estimate "
             "(default: none, use the t_0 values)")
    add("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES),
        help="strategies of the grid (default: all four)")
    add("--seeds", type=int, nargs="+", default=None, help="seeds " + preset_default("seeds"))
    add_settings(p, ("device", "amp", "cuda_graphs", "data_root"), groups=False,
                 device={"help": "device of every run"}, amp={"help": "mixed precision of every run"},
                 cuda_graphs={"help": "every run's training step: one CUDA graph per freeze level (on), eager "
                                      "(off), or on wherever supported (auto)"})
    add("--rerun-mismatched", action="store_true", default=False,
        help="runs in --out made with other settings (epochs, data, ...) are moved aside "
             "(NAME.mismatched-N) and run again (default: refuse them, naming each setting)")
    add("--report-only", action="store_true", default=False,
        help="write the table and figures from the runs already there, run nothing "
             "(default: run what is missing first)")

    where = p.add_argument_group("where the runs go")
    where.add_argument(*flag_spellings("--launcher"), choices=LAUNCHERS, default="local",
                       help="local: on this machine, --jobs at once; slurm: one Slurm job per run, through "
                            "submitit (pip install submitit); submitit-local: the slurm path run on this "
                            "machine by submitit's local executor, to try it")
    where.add_argument(*flag_spellings("--jobs"), type=int, default=None,
                       help="runs at once on this machine, each its own process with its output in "
                            "OUT/logs (default: 1, in this process; with --gpus, the GPUs times --runs-per-gpu)")
    where.add_argument(*flag_spellings("--gpus"), default=None,
                       help="comma-separated GPUs to spread the runs over, such as 0,1,2,3: each run sees "
                            "one, through CUDA_VISIBLE_DEVICES (default: none; --jobs runs share --device)")
    where.add_argument(*flag_spellings("--runs-per-gpu"), type=int, default=1,
                       help="runs sharing each GPU of --gpus at once: a small model at batch 50 leaves a "
                            "large GPU mostly idle")
    where.add_argument(*flag_spellings("--threads-per-run"), type=int, default=None,
                       help="CPU threads of each run (default: this machine's cores shared out between the "
                            "runs at once; torch's own choice with --jobs 1)")
    slurm = p.add_argument_group("Slurm (--launcher slurm)")
    slurm.add_argument(*flag_spellings("--slurm-partition"), default=None,
                       help="partition of the jobs (default: the cluster's default)")
    slurm.add_argument(*flag_spellings("--slurm-time"), type=int, default=180,
                       help="time limit of each job, in minutes; a run cut off by it is requeued and "
                            "resumes from its last checkpoint")
    slurm.add_argument(*flag_spellings("--slurm-gpus"), type=int, default=1, help="GPUs of each job")
    slurm.add_argument(*flag_spellings("--slurm-cpus"), type=int, default=8, help="CPU cores of each job")
    slurm.add_argument(*flag_spellings("--slurm-max-requeues"), type=int, default=3,
                       help="how often a job cut off by its time limit is requeued (a preempted job "
                            "always is)")
    return p


LAUNCHERS = ("local", "slurm", "submitit-local")


def launch_settings(args, settings: dict) -> dict:
    """How the grid's runs are launched: the launcher, the places of the runs at once (their
    environments), CPU threads per run, submitit's parameters. ValueError naming the flag for
    a combination that cannot work."""
    check_positive({"--jobs": args.jobs, "--runs-per-gpu": args.runs_per_gpu,
                    "--threads-per-run": args.threads_per_run, "--slurm-time": args.slurm_time,
                    "--slurm-cpus": args.slurm_cpus})
    if args.slurm_gpus < 0 or args.slurm_max_requeues < 0:
        raise ValueError("--slurm-gpus and --slurm-max-requeues must be >= 0")
    gpus = None
    if args.gpus is not None:
        gpus = [g.strip() for g in args.gpus.split(",")]
        if not all(gpus) or len(set(gpus)) != len(gpus):
            raise ValueError(f"--gpus must list distinct GPUs separated by commas, such as 0,1, got {args.gpus!r}")
        if settings["device"] not in ("auto", "cuda"):
            raise ValueError(f"--gpus places runs on CUDA GPUs; it cannot go with --device {settings['device']}")
        if args.jobs is not None and args.jobs != len(gpus) * args.runs_per_gpu:
            raise ValueError(f"--jobs {args.jobs} contradicts --gpus {args.gpus} with --runs-per-gpu "
                             f"{args.runs_per_gpu} ({len(gpus) * args.runs_per_gpu} runs at once); give one of them")
    elif args.runs_per_gpu != 1:
        raise ValueError("--runs-per-gpu needs --gpus (the GPUs to share out)")
    if args.launcher != "local" and (args.jobs is not None or gpus):
        raise ValueError(f"--launcher {args.launcher} places every run as a job of its own: --jobs and --gpus "
                         f"are for --launcher local")
    if args.launcher != "local":
        import_submitit()  # before anything is written
    places = slots(args.jobs or 1, gpus, args.runs_per_gpu)
    if args.launcher != "local":
        threads = args.threads_per_run or args.slurm_cpus
    elif len(places) == 1:
        threads = args.threads_per_run
    else:
        threads = threads_per_run(len(places), args.threads_per_run)
    options = {"timeout_min": args.slurm_time, "gpus_per_node": args.slurm_gpus, "cpus_per_task": args.slurm_cpus,
               "max_requeues": args.slurm_max_requeues}
    if args.slurm_partition is not None:
        options["slurm_partition"] = args.slurm_partition
    return {"launcher": args.launcher, "places": places, "threads": threads, "submitit": options}


def resolve_settings(args) -> dict:
    settings = dict(PRESETS[args.preset])
    for key in ("model", "depth", "growth_rate", "dataset", "which_dataset", "epochs", "batch_size",
                "subset", "t0s", "seeds"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.model is not None:  # the preset's sizes belong to its model
        depth, width = DEFAULTS[args.model]
        settings["depth"] = depth if args.depth is None else args.depth
        settings["growth_rate"] = width if args.growth_rate is None else args.growth_rate
    settings.update(strategies=args.strategies, targets=args.target_speedups, device=args.device,
                    amp=args.amp, data_root=args.data_root, preset=args.preset, cuda_graphs=args.cuda_graphs)
    return settings


def check(args, settings: dict, parser) -> None:
    if args.t0s is not None and args.target_speedups is not None:
        parser.error("give --t0s or --target-speedups, not both")
    try:
        for t in settings["t0s"]:
            check_t_0("--t0s: every t_0", t)
        for s in settings["targets"] or []:
            if not 0 < s < 1:
                raise ValueError(f"--target-speedups: every target must be in (0, 1), got {s}")
        check_positive({**{f"--{key}": settings[key] for key in ("epochs", "batch_size", "subset")},
                        "-k/--growth-rate": settings["growth_rate"] if applies("growth_rate", settings["model"])
                        else None})
        check_depth(settings["model"], settings["depth"])
        for seed in settings["seeds"]:
            check_seed("--seeds: every seed", seed)
        check_which_dataset(settings["dataset"], settings["which_dataset"])
        resolve_device(settings["device"])
    except ValueError as e:
        parser.error(str(e))
    if args.growth_rate is not None:
        note = ignored_flags_note(settings["model"], {"growth_rate": args.growth_rate})
        if note:
            parser.say(note, error=False)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is not a directory")


def report(jobs: list[Job], settings: dict, out: Path) -> list[dict]:
    rows = summarize(jobs, out)
    missing = missing_runs(jobs, out, settings["epochs"])
    write_csv(rows, out / "results.csv")
    write_markdown(rows, settings, out / "results.md", missing)
    if missing:
        started = sum(state != "not started" for _, state in missing)
        print(f"{len(jobs) - len(missing)} of {plural(len(jobs), 'run')} finished; the table leaves out "
              f"{len(missing) - started} not started and {started} interrupted (listed in "
              f"{out / 'results.md'})")
    model = build_model(settings["model"], settings["depth"], settings["growth_rate"], num_classes=10)
    middle = sorted(settings["t0s"])[len(settings["t0s"]) // 2]
    plot_lr_schedules(len(model.freeze_units()), middle, out / "lr_schedules.png",
                      model=model_name(settings["model"], settings["depth"], settings["growth_rate"]))
    about = setting_line(settings)
    plot_error_vs_speedup(rows, out / "error_vs_speedup.png", about=about)
    plot_error_vs_time(rows, out / "error_vs_time.png", about=about)
    return rows


def main(argv=None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = resolve_settings(args)
    check(args, settings, parser)
    try:
        launch = launch_settings(args, settings)
    except ValueError as e:
        parser.error(str(e))
    out = Path(args.out)
    if args.report_only and not any((out / "runs").glob("*/metrics.jsonl")):
        parser.error(f"--report-only: {out} holds no runs (nothing under {out / 'runs'}); run the grid first")
    out.mkdir(parents=True, exist_ok=True)
    jobs = make_grid(settings, out)
    mismatched = mismatched_runs(jobs, out)
    if mismatched and (args.report_only or not args.rerun_mismatched):
        for job, differences in mismatched:
            for difference in differences:
                print(f"{parser.prog}: error: {out / 'runs' / job.name} was run with {difference}", file=sys.stderr)
        what = "" if args.report_only else "run them again with --rerun-mismatched (the old runs are moved aside), or "
        print(f"{parser.prog}: error: {len(mismatched)} run(s) in {out} were made with other settings than this "
              f"grid's: {what}give another --out", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    for job, _ in mismatched:
        print(f"{out / 'runs' / job.name} was run with other settings: moved to {move_aside(out / 'runs' / job.name)}")
    unfinished = []
    if not args.report_only:
        try:
            # A run left busy that another process has finished since is finished.
            unfinished = [o for o in run_grid(jobs, out, launch) if o.state != "finished"
                          and run_state(o.run.run_dir) != "finished"]
        except (SystemExit, KeyboardInterrupt, GridStopped) as e:  # Ctrl-C or SIGTERM, inside a run or between
            code = stop_code(e)
            if code is None:
                raise
            going_on = " (the Slurm jobs go on)" if args.launcher == "slurm" else ""
            print(f"{parser.prog}: stopped{going_on}; run the same command again to continue where it stopped "
                  "(finished runs are kept, interrupted ones resume)", file=sys.stderr)
            raise SystemExit(code) from None
    try:
        rows = report(jobs, settings, out)
    except WriteError as e:  # a full disk: the runs are kept, the report is made again from them
        print(f"{parser.prog}: error: {e}; once that is fixed, run the same command again with --report-only",
              file=sys.stderr)
        raise SystemExit(EXIT_FAILED) from None
    print(f"wrote {out / 'results.md'}, {out / 'results.csv'} and 3 figures in {out}")
    if unfinished:
        for outcome in unfinished:
            parser.say(outcome_line(outcome))
        owned = sum(o.state == "busy" for o in unfinished)
        if owned:
            parser.say(f"{owned} run(s) are running in another process (busy, above); the table leaves them out: "
                       "run the same command again once it has ended")
        if owned < len(unfinished):
            parser.say(f"{len(unfinished) - owned} run(s) did not finish (above); the table leaves them out. Fix "
                       "the cause and run the same command again: it runs only what is missing")
        raise SystemExit(EXIT_FAILED)
    return rows


def stop_code(error: BaseException) -> int | None:
    """The exit status for a grid ended by a stop signal (128 + the signal), else None."""
    if isinstance(error, GridStopped):
        return stop_status(error.signum)
    if isinstance(error, KeyboardInterrupt):
        return stop_status(signal.SIGINT)
    if is_stop_status(error.code):
        return error.code
    return None


if __name__ == "__main__":
    run_as_script(main)
