"""Compare train.py runs from their metrics.jsonl: training images/s over the epochs each run
finished (captures included), its captures and their time, its losses, where a finished run's
time went (the summary's time split: its steady-state step rate, the rate of the kind of step
that ran most, and its end-to-end images/s), and each run against the first. A run that did not
finish all its epochs is marked, and its speed is over the epochs it did finish.

    python tools/train_speed.py runs/graphs-off runs/graphs-on
    python tools/train_speed.py runs/graphs-off runs/graphs-on --max-loss-diff 0.05
    python tools/train_speed.py runs/paper --benchmark bench.jsonl

With --max-loss-diff the exit status says whether every run finished and its epochs' training
losses agree with the first run's within that relative difference (1 otherwise). With
--benchmark (what `benchmark.py --json` printed, one JSON object a line) each finished run's
steady-state step rate is set beside benchmark.py's figure for the same settings: its FreezeOut
rate for a run with the same t_0, its baseline rate for a run with t_0 = 1, of the same kind of
step (eager, or graphed beside the warm-up).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metrics_logger import read_records  # noqa: E402
from timing import STEP_KINDS, describe_split  # noqa: E402

PAPER_STEPS = 100 * (45_000 // 50)  # the paper's run: 100 epochs of 45,000 images in batches of 50
# The settings a benchmark.py result must share with a run to be its figure.
SAME = ("model", "depth", "growth_rate", "batch_size", "how_scale", "scale_lr", "channels_last")


def speed(run_dir: Path) -> dict:
    """A run's training images/s (images over training time, the epochs it finished), its
    captures, its epochs' losses, whether it finished, and from its summary's time split
    (None before it finished) its steady-state and end-to-end images/s."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{run_dir} holds no metrics.jsonl: not a train.py run directory")
    config = read_records(metrics, "config")[0]
    epochs = read_records(metrics, "epoch")
    if not epochs:
        raise ValueError(f"{run_dir} has no epoch record: the run finished no epoch")
    summaries = read_records(metrics, "summary")
    seconds = sum(e["train_time_s"] for e in epochs)
    images = len(epochs) * config["steps_per_epoch"] * config["batch_size"]
    row = {"run": run_dir.name, "config": config, "training_step": config.get("training_step", "eager"),
           "epochs_done": len(epochs), "epochs": config["epochs"], "finished": bool(summaries),
           "images_per_s": images / seconds, "train_time_s": seconds,
           "captures": sum(e.get("captures", 0) for e in epochs),
           "capture_time_s": sum(e.get("capture_time_s", 0.0) for e in epochs),
           "train_loss": [e.get("train_loss") for e in epochs], "split": None}
    split = summaries[-1].get("time_split") if summaries else None
    if split is not None:
        steps, parts, batch = split["steps"], split["parts"], config["batch_size"]
        kind = max(STEP_KINDS, key=lambda k: steps.get(k, 0))
        trained = sum(steps.values())
        row.update(split=split, steady_kind=kind,
                   steady_images_per_s=steps[kind] * batch / parts[kind] if parts[kind] > 0 else 0.0,
                   end_to_end_images_per_s=trained * batch / split["wall_s"])
    return row


def loss_difference(run: dict, reference: dict) -> float:
    """The largest relative difference between two runs' training losses, epoch by epoch
    (over the epochs both finished)."""
    pairs = [(a, b) for a, b in zip(run["train_loss"], reference["train_loss"], strict=False)
             if a is not None and b is not None]  # a record rebuilt from a checkpoint has no loss
    return max((abs(a - b) / abs(b) for a, b in pairs), default=0.0)


def line(r: dict, first: dict) -> str:
    done = "" if r["finished"] else f" [UNFINISHED: {r['epochs_done']} of {r['epochs']} epochs]"
    return (f"{r['run']}: {r['training_step']} step, {r['epochs_done']} epoch{'s' * (r['epochs_done'] != 1)}, "
            f"{r['images_per_s']:.0f} "
            f"training images/s ({r['train_time_s']:.1f} s), {r['captures']} capture{'s' * (r['captures'] != 1)} in "
            f"{r['capture_time_s']:.2f} s, {r['images_per_s'] / first['images_per_s']:.2f}x {first['run']}, "
            f"losses {', '.join('n/a' if x is None else f'{x:.4f}' for x in r['train_loss'])} "
            f"(largest difference from {first['run']}: {100 * loss_difference(r, first):.2f}%){done}")


def split_line(r: dict) -> str:
    return (f"  {describe_split(r['split'])}; {r['steady_kind']} steps at {r['steady_images_per_s']:.0f} "
            f"images/s, {r['end_to_end_images_per_s']:.0f} images/s end to end; the paper's {PAPER_STEPS:,} "
            f"steps at this run's pace: {predicted_s(r) / 60:.1f} min")


def predicted_s(r: dict, steps: int = PAPER_STEPS) -> float:
    """A run of `steps` steps of these settings, from this one's time split: its start-up once,
    and the rest of its time (training, evaluation, checkpoints) per step it trained."""
    split = r["split"]
    startup = split["parts"]["startup"]
    return startup + (split["wall_s"] - startup) * steps / sum(split["steps"].values())


def read_benchmarks(path: Path) -> list[dict]:
    results = []
    for text in path.read_text(encoding="utf-8").splitlines():
        if text.strip().startswith("{"):
            results.append(json.loads(text))
    if not results:
        raise ValueError(f"{path} holds no benchmark.py --json result")
    return results


def benchmark_rate(r: dict, results: list[dict]) -> tuple[float, dict] | None:
    """benchmark.py's steady-state images/s for a run's settings and kind of step, and the
    result it comes from; None where no result matches."""
    config, kind = r["config"], r["steady_kind"]
    role = "baseline" if config["t_0"] >= 1 else "freezeout"
    for result in results:
        if any(result.get(k) != config.get(k) for k in SAME) or result.get("amp") != config.get("amp_effective"):
            continue
        if role == "freezeout" and result["t_0"] != config["t_0"]:
            continue
        figures = result if kind == "eager" else result.get(kind)
        if figures:
            return figures["steady_images_per_s"][role], result
    return None


def benchmark_line(r: dict, results: list[dict]) -> str:
    found = benchmark_rate(r, results)
    if found is None:
        return (f"  benchmark.py: no result for this run's settings ({r['steady_kind']} step, "
                f"t_0 {r['config']['t_0']:g})")
    rate, result = found
    return (f"  against benchmark.py ({result['steps']} steps, {result['device']}): its {r['steady_kind']} steps "
            f"at {rate:.0f} images/s; this run's {r['steady_images_per_s'] / rate:.2f}x, end to end "
            f"{r['end_to_end_images_per_s'] / rate:.2f}x")


def build_parser() -> argparse.ArgumentParser:
    summary, block, rest = __doc__.split("\n\n", 2)
    epilog = "examples:\n" + "\n".join(line[2:] for line in block.splitlines()) + "\n\n" + rest
    parser = argparse.ArgumentParser(prog="train_speed.py", description=summary, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="train.py run directories")
    parser.add_argument("--max-loss-diff", type=float, default=None,
                        help="exit 1 unless every run finished and its losses agree with the first "
                             "run's within this relative difference (default: no check)")
    parser.add_argument("--benchmark", type=Path, default=None, metavar="FILE",
                        help="benchmark.py --json results to compare each run's step rate with "
                             "(default: none)")
    return parser


def main(argv=None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rows = [speed(d) for d in args.runs]
        benchmarks = read_benchmarks(args.benchmark) if args.benchmark is not None else None
    except (ValueError, OSError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    for r in rows:
        print(line(r, rows[0]))
        if r["split"] is not None:
            print(split_line(r))
            if benchmarks is not None:
                r["benchmark_images_per_s"] = (benchmark_rate(r, benchmarks) or (None,))[0]
                print(benchmark_line(r, benchmarks))
    if len({r["epochs_done"] for r in rows}) > 1:
        print("note: the runs finished different numbers of epochs; each speed is over its own epochs")
    if args.max_loss_diff is not None:
        bad = [r["run"] for r in rows if not r["finished"] or loss_difference(r, rows[0]) > args.max_loss_diff]
        if bad:
            print(f"FAILED: {', '.join(bad)} unfinished, or losses more than {100 * args.max_loss_diff:g}% "
                  f"from {rows[0]['run']}'s")
            raise SystemExit(1)
        print(f"OK: every run finished, losses within {100 * args.max_loss_diff:g}% of {rows[0]['run']}'s")
    return rows


if __name__ == "__main__":
    main()
