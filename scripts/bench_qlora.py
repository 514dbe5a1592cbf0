#!/usr/bin/env python3
"""QLoRA benchmark: a 4-bit (NF4) base against the f32 base, lowrank only, measured in one run
on this machine and printed as ratios. A benchmark, not a test: nothing here is asserted.

    cargo build --release && python3 scripts/bench_qlora.py [--steps 2] [--batch 2] [--seq 256]

It builds the SmolLM-135M-shaped Llama of scripts/bench.py (random weights, f32, tied
embeddings; vocab 49152, hidden 576, 30 layers, 9/3 heads, intermediate 1536) in a temporary
folder, writes its NF4 and NF4 + double-quant checkpoints with `lowrank quantize`, then measures,
each in its own process:

- resident memory of the base's linear weights (and of the whole base) at f32, bf16, NF4 and
  NF4 + double quantization — the bytes lowrank holds (`lowrank quantize` reports them);
- a LoRA training step (r=16, α=32, all-linear, AdamW) over the f32 base and over the NF4 + DQ
  base (pre-quantized checkpoint, and quantized at load with --quantize): seconds/step (median
  after one warm-up step) and peak RSS;
- greedy decoding tokens/s at batch 1 over the f32 and the NF4 + DQ base.

Needs: torch, transformers, tokenizers (to build the model; see scripts/make_fixtures.py).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (build_model, texts, shapes)


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr}")
    return p


def quantize(binary, model_dir, out, double_quant):
    cmd = [binary, "quantize", "--model", model_dir, "--out", out, "--quant", "nf4"]
    if double_quant:
        cmd.append("--double-quant")
    return json.loads(run(cmd).stdout.strip().splitlines()[-1])


def train(binary, model_dir, data, steps, batch, seq, work, tag, extra=()):
    out = os.path.join(work, f"train-{tag}")
    cmd = [binary, "train", "--model", model_dir, "--data", data, "--out", out, "--method", "lora",
           "--rank", "16", "--alpha", "32", "--targets", "all-linear", "--batch-size", str(batch),
           "--max-len", str(seq), "--max-steps", str(steps + 1), "--optimizer", "adamw", "--lr", "1e-4",
           "--no-shuffle", "--quiet", *extra]
    run(cmd)
    log = [json.loads(line) for line in open(os.path.join(out, "training_log.jsonl"))
           if '"step"' in line and '"loss"' in line]
    tokens = batch * seq
    step_s = statistics.median(tokens / row["tokens_per_s"] for row in log[1:])
    return {"step_s": step_s, "peak_rss_mb": max(row["peak_rss_mb"] for row in log), "loss": log[-1]["loss"]}


def decode(binary, model_dir, tokens, extra=()):
    cmd = [binary, "generate", "--model", model_dir, "--prompt", bench.texts(1, words=7, seed=2)[0],
           "--max-tokens", str(tokens), "--ignore-eos", *extra]
    err = run(cmd).stderr
    m = re.search(r"decode: \d+ tokens at ([\d.]+) tokens/s", err)
    return float(m.group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2, help="timed training steps (after one warm-up)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--lowrank", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "lowrank"))
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="lowrank-bench-qlora-")
    model_dir = os.path.join(work, "model")
    data = os.path.join(work, "train.jsonl")
    print(f"building the SmolLM-135M-shaped model in {work} ...", file=sys.stderr)
    bench.build_model(model_dir)
    with open(data, "w") as f:
        for t in bench.texts(args.batch * (args.steps + 1), words=args.seq - 1, seed=3):
            f.write(json.dumps({"text": t}) + "\n")

    print("quantizing ...", file=sys.stderr)
    nf4_dir, dq_dir = os.path.join(work, "nf4"), os.path.join(work, "nf4-dq")
    nf4 = quantize(args.lowrank, model_dir, nf4_dir, False)
    dq = quantize(args.lowrank, model_dir, dq_dir, True)
    params = nf4["linear_parameters"]
    # Everything else (embedding, norms) stays f32 in every variant.
    h, v, layers = bench.HIDDEN, bench.VOCAB, bench.LAYERS
    rest = (v * h + (2 * layers + 1) * h) * 4
    memory = [("f32", params * 4), ("bf16", params * 2), ("nf4", nf4["linear_bytes"]), ("nf4+dq", dq["linear_bytes"])]

    print("training: f32 base ...", file=sys.stderr)
    t_f32 = train(args.lowrank, model_dir, data, args.steps, args.batch, args.seq, work, "f32")
    print("training: nf4+dq base (pre-quantized) ...", file=sys.stderr)
    t_dq = train(args.lowrank, dq_dir, data, args.steps, args.batch, args.seq, work, "nf4dq")
    print("training: nf4+dq base (--quantize at load) ...", file=sys.stderr)
    t_fly = train(args.lowrank, model_dir, data, args.steps, args.batch, args.seq, work, "nf4dq-fly",
                  ["--quantize", "nf4", "--double-quant"])
    print("decoding ...", file=sys.stderr)
    d_f32 = decode(args.lowrank, model_dir, args.decode_tokens)
    d_dq = decode(args.lowrank, dq_dir, args.decode_tokens)

    print(f"\nSmolLM-135M-shaped base: {params / 1e6:.1f}M linear parameters in the decoder layers, "
          f"{rest / 1e6:.1f} MB of f32 embedding + norms in every variant")
    print(f"{'base':<8} {'linear weights (MB)':>20} {'bits/param':>11} {'whole base (MB)':>16} {'vs f32':>7}")
    for name, b in memory:
        print(f"{name:<8} {b / 1e6:20.2f} {b * 8 / params:11.3f} {(b + rest) / 1e6:16.2f} {b / memory[0][1]:7.3f}")
    print(f"\nLoRA step (r=16, all-linear, AdamW, batch {args.batch} x {args.seq} tokens; median of {args.steps} after a warm-up)")
    print(f"{'base':<26} {'s/step':>8} {'vs f32':>7} {'peak RSS (MB)':>14} {'vs f32':>7}")
    for name, t in [("f32", t_f32), ("nf4+dq (pre-quantized)", t_dq), ("nf4+dq (--quantize)", t_fly)]:
        print(f"{name:<26} {t['step_s']:8.2f} {t['step_s'] / t_f32['step_s']:7.2f} {t['peak_rss_mb']:14.0f} "
              f"{t['peak_rss_mb'] / t_f32['peak_rss_mb']:7.2f}")
    print(f"\ndecode, batch 1, greedy, {args.decode_tokens} tokens")
    print(f"{'f32':<26} {d_f32:8.1f} tok/s")
    print(f"{'nf4+dq':<26} {d_dq:8.1f} tok/s  ({d_dq / d_f32:.2f}x of f32)")


if __name__ == "__main__":
    main()
