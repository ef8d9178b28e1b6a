"""train.py's step rate against benchmark.py's, measured side by side: for each repeat,
benchmark.py (baseline and FreezeOut) and two train.py runs with the same settings on synthetic
data (FreezeOut, and the baseline t_0 = 1), one after the other, alternating their order; each
run's steady-state step rate (its time split: the rate of the kind of step that ran most) over
benchmark.py's for the same settings, then the median over the repeats.

    python tools/train_vs_benchmark.py --device cpu -L 40 -k 12 --batch-size 32 --steps 40 --repeats 3
    python tools/train_vs_benchmark.py --device cuda -L 76 -k 12 --batch-size 50 --steps 160 \\
        --train-steps 2700 --repeats 1 --cuda-graphs on

The train.py runs train --train-steps steps (one epoch of that many batches; default --steps):
the schedule is the same fraction of the run whatever its length, so the mean step is too, and
a longer run makes the start-up a smaller share of the end-to-end rate. benchmark.py's warm-up
runs are not counted by it; train.py's start-up is (end to end).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tools.train_speed import benchmark_rate, read_benchmarks, speed  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    summary, block, rest = __doc__.split("\n\n", 2)
    epilog = "examples:\n" + "\n".join(line[2:] for line in block.splitlines()) + "\n\n" + rest
    p = argparse.ArgumentParser(prog="train_vs_benchmark.py", description=summary, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="device of every run (default: cpu)")
    p.add_argument("-L", "--depth", type=int, default=40, help="DenseNet-BC depth (default: 40)")
    p.add_argument("-k", "--growth-rate", type=int, default=12, help="growth rate (default: 12)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    p.add_argument("--steps", type=int, default=40, help="benchmark.py's steps per run (default: 40)")
    p.add_argument("--train-steps", type=int, default=None, help="train.py's steps (default: --steps)")
    p.add_argument("--t_0", type=float, default=0.8, help="FreezeOut's t_0 (default: 0.8)")
    p.add_argument("--how_scale", default="cubic", help="strategy (default: cubic)")
    p.add_argument("--amp", default="off", help="mixed precision (default: off)")
    p.add_argument("--cuda-graphs", default="off", help="train.py's and benchmark.py's --cuda-graphs (default: off)")
    p.add_argument("--repeats", type=int, default=3, help="benchmark + train.py rounds (default: 3)")
    p.add_argument("--python", default=sys.executable, help="the interpreter (default: this one)")
    return p


def run(command: list[str], log: Path) -> None:
    with open(log, "a", encoding="utf-8") as out:
        done = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"train_vs_benchmark.py: error: {' '.join(command)} failed (exit {done.returncode}); "
                         f"see {log}")


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    train_steps = args.train_steps or args.steps
    shared = ["--depth", str(args.depth), "--growth-rate", str(args.growth_rate), "--how_scale", args.how_scale,
              "--amp", args.amp, "--cuda-graphs", args.cuda_graphs, "--device", args.device]
    work = Path(tempfile.mkdtemp(prefix="train-vs-benchmark-"))
    log = work / "log.txt"
    ratios = {"freezeout": [], "baseline": [], "end_to_end": []}
    print(f"train_vs_benchmark: runs and their output in {work}", flush=True)
    for i in range(args.repeats):
        bench_file = work / f"bench-{i}.json"
        bench = [args.python, "benchmark.py", *shared, "--batch-size", str(args.batch_size), "--steps",
                 str(args.steps), "--t_0", str(args.t_0), "--repeats", "1", "--level-steps", "0", "--json"]
        trains = {role: [args.python, "train.py", *shared, "--dataset", "synthetic", "--subset",
                         str(train_steps * args.batch_size), "--epochs", "1", "--no-validate", "--batch_size",
                         str(args.batch_size), "--t_0", str(t_0), "--out-dir", str(work), "--name", f"{role}-{i}"]
                  for role, t_0 in (("freezeout", args.t_0), ("baseline", 1.0))}
        order = ["bench", "freezeout", "baseline"] if i % 2 == 0 else ["baseline", "freezeout", "bench"]
        for what in order:
            if what == "bench":
                run(bench, log)
                text = [t for t in log.read_text().splitlines() if t.startswith("{")][-1]
                bench_file.write_text(text + "\n")
            else:
                run(trains[what], log)
        results = read_benchmarks(bench_file)
        for role in ("freezeout", "baseline"):
            r = speed(work / f"{role}-{i}")
            rate = benchmark_rate(r, results)[0]
            ratios[role].append(r["steady_images_per_s"] / rate)
            if role == "freezeout":
                ratios["end_to_end"].append(r["end_to_end_images_per_s"] / rate)
            whole = r["end_to_end_images_per_s"]
            print(f"round {i + 1}: train.py {role} {r['steady_kind']} steps {r['steady_images_per_s']:.1f} "
                  f"images/s, benchmark.py {rate:.1f}: {r['steady_images_per_s'] / rate:.3f}x"
                  + (f"; end to end {whole:.1f} images/s ({whole / rate:.3f}x, start-up "
                     f"{r['split']['parts']['startup']:.1f} s of {r['split']['wall_s']:.1f} s)"
                     if role == "freezeout" else ""), flush=True)
    medians = {k: statistics.median(v) for k, v in ratios.items()}
    print(f"median over {args.repeats} rounds: train.py / benchmark.py step rate, FreezeOut "
          f"{medians['freezeout']:.3f}x, baseline {medians['baseline']:.3f}x; FreezeOut end to end "
          f"{medians['end_to_end']:.3f}x")
    return medians


if __name__ == "__main__":
    main()
