"""Compare train.py runs from their metrics.jsonl: training images/s over the epochs each run
finished (captures included), its captures and their time, its losses, and each run against
the first. A run that did not finish all its epochs is marked, and its speed is over the epochs
it did finish.

    python tools/train_speed.py runs/graphs-off runs/graphs-on
    python tools/train_speed.py runs/graphs-off runs/graphs-on --max-loss-diff 0.05

With --max-loss-diff the exit status says whether every run finished and its epochs' training
losses agree with the first run's within that relative difference (1 otherwise).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metrics_logger import read_records  # noqa: E402


def speed(run_dir: Path) -> dict:
    """A run's training images/s (images over training time, the epochs it finished), its
    captures, its epochs' losses, and whether it finished."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{run_dir} holds no metrics.jsonl: not a train.py run directory")
    config = read_records(metrics, "config")[0]
    epochs = read_records(metrics, "epoch")
    if not epochs:
        raise ValueError(f"{run_dir} has no epoch record: the run finished no epoch")
    seconds = sum(e["train_time_s"] for e in epochs)
    images = len(epochs) * config["steps_per_epoch"] * config["batch_size"]
    return {"run": run_dir.name, "training_step": config.get("training_step", "eager"),
            "epochs_done": len(epochs), "epochs": config["epochs"],
            "finished": bool(read_records(metrics, "summary")),
            "images_per_s": images / seconds, "train_time_s": seconds,
            "captures": sum(e.get("captures", 0) for e in epochs),
            "capture_time_s": sum(e.get("capture_time_s", 0.0) for e in epochs),
            "train_loss": [e["train_loss"] for e in epochs]}


def loss_difference(run: dict, reference: dict) -> float:
    """The largest relative difference between two runs' training losses, epoch by epoch
    (over the epochs both finished)."""
    pairs = list(zip(run["train_loss"], reference["train_loss"], strict=False))
    return max(abs(a - b) / abs(b) for a, b in pairs)


def line(r: dict, first: dict) -> str:
    done = "" if r["finished"] else f" [UNFINISHED: {r['epochs_done']} of {r['epochs']} epochs]"
    return (f"{r['run']}: {r['training_step']} step, {r['epochs_done']} epochs, {r['images_per_s']:.0f} "
            f"training images/s ({r['train_time_s']:.1f} s), {r['captures']} captures in "
            f"{r['capture_time_s']:.2f} s, {r['images_per_s'] / first['images_per_s']:.2f}x {first['run']}, "
            f"losses {', '.join(f'{x:.4f}' for x in r['train_loss'])} "
            f"(largest difference from {first['run']}: {100 * loss_difference(r, first):.2f}%){done}")


def build_parser() -> argparse.ArgumentParser:
    summary, block, rest = __doc__.split("\n\n", 2)
    epilog = "examples:\n" + "\n".join(line[2:] for line in block.splitlines()) + "\n\n" + rest
    parser = argparse.ArgumentParser(prog="train_speed.py", description=summary, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="train.py run directories")
    parser.add_argument("--max-loss-diff", type=float, default=None,
                        help="exit 1 unless every run finished and its losses agree with the first "
                             "run's within this relative difference (default: no check)")
    return parser


def main(argv=None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rows = [speed(d) for d in args.runs]
    except (ValueError, OSError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    for r in rows:
        print(line(r, rows[0]))
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
