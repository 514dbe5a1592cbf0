#!/usr/bin/env python3
"""Data-parallel training benchmark: seconds per LoRA step of one process against N ranks under
mpirun, each with the same number of threads, and the all-reduce's share of a step. A
benchmark, not a test: nothing here is asserted.

    cargo build --release --workspace --features lowrank-cli/mpi
    python3 scripts/bench_mpi.py [--ranks 2] [--threads 1] [--steps 3] [--warmup 1]

The model, tokenizer and data are scripts/bench.py's (SmolLM-135M-shaped, random weights); the
adapter is r16 all-linear (4.9 M parameters: 19.5 MB of f32 gradients per all-reduce), the
global batch 4 × 256 tokens, AdamW. Seconds per step are from rank 0's training_log.jsonl
(the step's input tokens ÷ tokens_per_s), the all-reduce from its `allreduce_s` (which includes
waiting for the slowest rank); medians over the timed steps. On a shared machine the wall
times depend on the other load; the CPU seconds per step and rank do not (much): they are the
CPU time of all ranks over a run of warmup + steps less that of a run of warmup steps, divided
by the steps and the ranks, i.e. the step time each rank would take on a core of its own.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from bench import BATCH, SEQ, build_model, texts  # noqa: E402


def train(launch, binary, model_dir, data, out, steps, threads):
    cmd = launch + [binary, "train", "--model", model_dir, "--data", data, "--out", out,
                    "--rank", "16", "--alpha", "32", "--targets", "all-linear",
                    "--batch-size", str(BATCH), "--max-len", str(SEQ), "--max-steps", str(steps),
                    "--optimizer", "adamw", "--lr", "1e-4", "--no-shuffle", "--quiet"]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    with open(os.path.join(out, "training_log.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line], cpu_s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads of each process")
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    ap.add_argument("--lowrank", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "lowrank"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        model_dir = os.path.join(work, "model")
        build_model(model_dir)
        data = os.path.join(work, "train.jsonl")
        with open(data, "w") as f:
            for t in texts(BATCH * (args.warmup + args.steps)):
                f.write(json.dumps({"text": t}) + "\n")
        total = args.warmup + args.steps
        mpirun = ["mpirun", "-np", str(args.ranks), "--oversubscribe", "--allow-run-as-root",
                  "-x", f"RAYON_NUM_THREADS={args.threads}"]
        runs = {}
        for name, launch, ranks in [("1 process", [], 1), (f"{args.ranks} ranks", mpirun, args.ranks)]:
            def run(steps, tag):
                return train(launch, args.lowrank, model_dir, data, os.path.join(work, f"{ranks}-{tag}"), steps,
                             args.threads)
            _, warmup_cpu_s = run(args.warmup, "warmup")
            log, cpu_s = run(total, "timed")
            runs[name] = (log, (cpu_s - warmup_cpu_s) / args.steps / ranks)
    for name, (log, cpu_per_rank) in runs.items():
        timed = log[args.warmup:]
        step_s = statistics.median(BATCH * SEQ / row["tokens_per_s"] for row in timed)
        line = f"{name}: {step_s:.2f} s/step wall, {cpu_per_rank:.2f} CPU s/step per rank"
        if "allreduce_s" in timed[0]:
            reduce_s = statistics.median(row["allreduce_s"] for row in timed)
            fastest = min(row["allreduce_s"] for row in timed)
            line += (f", all-reduce {reduce_s * 1000:.1f} ms ({100 * reduce_s / step_s:.1f}% of the step;"
                     f" fastest {fastest * 1000:.1f} ms)")
        print(line)
    (one, _), (many, _) = runs.values()
    print("max |loss difference|:", max(abs(a["loss"] - b["loss"]) for a, b in zip(one, many)))


if __name__ == "__main__":
    main()
