"""Compare the training speed of train.py runs from their metrics.jsonl: images/s over the
whole training loop (captures included), captures and their time, and each run against the
first.

    python tools/train_speed.py runs/graphs-off runs/graphs-on
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metrics_logger import read_records  # noqa: E402


def speed(run_dir: Path) -> dict:
    """Training images/s of a run (images over training time, all epochs), its captures."""
    config = read_records(run_dir / "metrics.jsonl", "config")[0]
    epochs = read_records(run_dir / "metrics.jsonl", "epoch")
    if not epochs:
        raise ValueError(f"{run_dir} has no epoch record")
    seconds = sum(e["train_time_s"] for e in epochs)
    images = len(epochs) * config["steps_per_epoch"] * config["batch_size"]
    return {"run": run_dir.name, "training_step": config.get("training_step", "eager"),
            "images_per_s": images / seconds, "train_time_s": seconds,
            "captures": sum(e.get("captures", 0) for e in epochs),
            "capture_time_s": sum(e.get("capture_time_s", 0.0) for e in epochs)}


def main(argv=None) -> list[dict]:
    dirs = [Path(d) for d in (sys.argv[1:] if argv is None else argv)]
    if not dirs:
        raise SystemExit("usage: python tools/train_speed.py RUN_DIR [RUN_DIR ...]")
    rows = [speed(d) for d in dirs]
    for r in rows:
        print(f"{r['run']}: {r['training_step']} step, {r['images_per_s']:.0f} training images/s "
              f"({r['train_time_s']:.1f} s), {r['captures']} captures in {r['capture_time_s']:.2f} s, "
              f"{r['images_per_s'] / rows[0]['images_per_s']:.2f}x {rows[0]['run']}")
    return rows


if __name__ == "__main__":
    main()
