#!/usr/bin/env python3
"""Speed and memory benchmark: lowrank against PyTorch + PEFT + transformers, measured in one
run on this machine, printed as ratios. A benchmark, not a test: nothing here is asserted.

    cargo build --release && python3 scripts/bench.py [--steps 3] [--warmup 2] [--decode-tokens 32]

It builds a SmolLM-135M-shaped Llama with random weights (vocab 49152, hidden 576, 30 layers,
9 heads / 3 KV heads, intermediate 1536, tied embeddings; f32, not committed) and a word-level
tokenizer over that vocabulary in a temporary folder, then measures, each in its own process
so that peak RSS is that measurement's alone:

- LoRA training step (r=16, α=32, all-linear, batch 4 × 256 tokens, AdamW): seconds/step, peak RSS
- DoRA training step, full fine-tuning step (same batch)
- LoRA step with gradient checkpointing per layer (lowrank `--grad-checkpoint`, transformers
  `gradient_checkpointing_enable()`): seconds/step, peak RSS
- lowrank's LoRA step with `--compute-dtype bf16` (ratio against PEFT's f32 LoRA step), and its
  per-step losses against lowrank's f32 run on the same batches
- decoding tokens/s at batch 1: base, unmerged LoRA, merged LoRA; prefill tokens/s (256 tokens);
  lowrank's base and unmerged LoRA again with `--bf16-weights` (ratio against transformers' f32)
- the memory-bandwidth bound of decoding: bytes of weights read per token (every linear weight
  and the LM head, f32) ÷ this machine's read bandwidth (torch summing a 1 GiB tensor, all
  cores, best of 5), and each decode rate as a share of that bound. Decoding runs in rounds
  (--decode-rounds, default 3): the bandwidth is read just before every decode run, since on a
  shared host it moves by tens of percent within a minute; figures are medians over rounds.
  Unmerged against merged (and base) decoding is also timed in lockstep in one process, token
  by token (`cargo bench -p lowrank-models --bench decode_pair`), whose per-step ratios that
  noise does not swamp (it also reads the bandwidth between steps, its own way, and reports
  each mode's share of that bound); DoRA's training step against LoRA's likewise, step by step
  (`cargo bench -p lowrank-train --bench train_pair`).

PyTorch runs with torch's default threads (all cores), lowrank with its defaults.
Needs: torch, transformers, peft (see scripts/make_fixtures.py for versions).
"""

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, INTER = 49152, 576, 30, 9, 3, 1536
BATCH, SEQ = 4, 256


def build_model(dirname):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=True,
        max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2,
    )
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(dirname)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(dirname)


def texts(n, words=SEQ - 1, seed=0):
    import random
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(words)) for _ in range(n)]


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_bandwidth_gb_s():
    """Bytes per second a multithreaded reduction streams from memory (best of 5)."""
    import torch
    x = torch.ones(1 << 28, dtype=torch.float32)  # 1 GiB
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def weight_bytes_per_token():
    """f32 bytes a batch-1 decoding step reads: every decoder linear weight and the LM head."""
    head_dim = HIDDEN // HEADS
    attn = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_HEADS * head_dim
    mlp = 3 * HIDDEN * INTER
    return 4 * (LAYERS * (attn + mlp) + VOCAB * HIDDEN)


def torch_train(model_dir, method, steps, warmup):
    """Runs in a child process: seconds per step (median after the warm-up steps) and peak RSS."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if method == "lora-ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if method != "full":
        config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, use_dora=method == "dora")
        model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    batch = tok(texts(BATCH), return_tensors="pt")
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        out = model(**batch, labels=batch["input_ids"])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times[warmup:]), "peak_rss_mb": peak_rss_mb()}


def torch_decode(model_dir, mode, tokens):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if mode != "base":
        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
        if mode == "merged":
            model = model.merge_and_unload()
    prompt = tok(texts(1, words=SEQ - 1, seed=1), return_tensors="pt")
    with torch.no_grad():
        start = time.perf_counter()
        model(**prompt)
        prefill = time.perf_counter() - start
        short = tok(texts(1, words=7, seed=2), return_tensors="pt")
        start = time.perf_counter()
        model.generate(**short, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        first = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(**short, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        total = time.perf_counter() - start
    return {"decode_tok_s": (tokens - 1) / (total - first), "prefill_tok_s": SEQ / prefill}


def run_child(fn, *args):
    """Runs fn(*args) in a fresh Python process and returns its JSON result."""
    code = f"import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import bench; print(json.dumps(bench.{fn}(*{args!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def lowrank_train(binary, model_dir, data, method, steps, warmup, work):
    out = os.path.join(work, f"train-{method}")
    checkpointed, bf16 = method == "lora-ckpt", method == "lora-bf16"
    method = "lora" if checkpointed or bf16 else method
    cmd = [binary, "train", "--model", model_dir, "--data", data, "--out", out, "--method", method,
           "--rank", "16", "--alpha", "32", "--targets", "all-linear", "--batch-size", str(BATCH),
           "--max-len", str(SEQ), "--max-steps", str(warmup + steps), "--optimizer", "adamw", "--lr", "1e-4",
           "--no-shuffle", "--quiet"] + (["--grad-checkpoint"] if checkpointed else [])
    cmd += ["--compute-dtype", "bf16"] if bf16 else []
    subprocess.run(cmd, check=True, capture_output=True)
    log = [json.loads(l) for l in open(os.path.join(out, "training_log.jsonl")) if '"step"' in l and '"loss"' in l]
    step_s = statistics.median(BATCH * SEQ / row["tokens_per_s"] for row in log[warmup:])
    return {"step_s": step_s, "peak_rss_mb": max(row["peak_rss_mb"] for row in log), "losses": [row["loss"] for row in log]}


def lowrank_decode(binary, model_dir, adapter, merge, tokens, bf16=False):
    def gen(prompt, n):
        cmd = [binary, "generate", "--model", model_dir, "--prompt", prompt, "--max-tokens", str(n), "--ignore-eos"]
        cmd += ["--bf16-weights"] if bf16 else []
        if adapter:
            cmd += ["--adapter", adapter] + (["--merge"] if merge else [])
        err = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
        m = re.search(r"prefill: (\d+) tokens in ([\d.]+) s .*decode: \d+ tokens at ([\d.]+) tokens/s", err)
        return int(m.group(1)) / float(m.group(2)), float(m.group(3))

    prefill, _ = gen(texts(1, words=SEQ - 1, seed=1)[0], 1)
    _, decode = gen(texts(1, words=7, seed=2)[0], tokens)
    return {"decode_tok_s": decode, "prefill_tok_s": prefill}


def make_adapter(model_dir, path):
    """A PEFT adapter with non-zero B so the unmerged path does real work."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)).save_pretrained(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed steps first, on both sides (the first steps of either pay for allocation)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--paired-tokens", type=int, default=256,
                    help="tokens of the in-process unmerged/merged/base lockstep comparison")
    ap.add_argument("--paired-rounds", type=int, default=8,
                    help="rounds (one DoRA and one LoRA step each) of the in-process lockstep comparison")
    ap.add_argument("--decode-rounds", type=int, default=3,
                    help="rounds of decoding measurements (medians reported; bandwidth read before each run)")
    ap.add_argument("--lowrank", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "lowrank"))
    ap.add_argument("--skip-torch", action="store_true", help="measure lowrank only")
    ap.add_argument("--skip-train", action="store_true", help="decoding only")
    ap.add_argument("--skip-decode", action="store_true", help="training only")
    ap.add_argument("--methods", default="lora,dora,full,lora-ckpt,lora-bf16",
                    help="training measurements, comma-separated (lora-bf16 is lowrank's --compute-dtype bf16, against PEFT's f32 LoRA)")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="lowrank-bench-")
    model_dir, adapter = os.path.join(work, "model"), os.path.join(work, "adapter")
    data = os.path.join(work, "train.jsonl")
    print(f"building the SmolLM-135M-shaped model in {work} ...", file=sys.stderr)
    build_model(model_dir)
    make_adapter(model_dir, adapter)
    with open(data, "w") as f:
        for t in texts(BATCH * (args.warmup + args.steps), seed=3):
            f.write(json.dumps({"text": t}) + "\n")

    rows, ours_of = [], {}
    theirs_of = {}
    for method in [] if args.skip_train else args.methods.split(","):
        print(f"training step: {method} ...", file=sys.stderr)
        ours = lowrank_train(args.lowrank, model_dir, data, method, args.steps, args.warmup, work)
        # PEFT has no bf16-compute counterpart on CPU worth timing: lora-bf16 is held against
        # its f32 LoRA step, the bar.
        torch_method = "lora" if method == "lora-bf16" else method
        if not args.skip_torch and torch_method not in theirs_of:
            theirs_of[torch_method] = run_child("torch_train", model_dir, torch_method, args.steps, args.warmup)
        theirs = theirs_of.get(torch_method)
        ours_of[method] = ours
        rows.append((f"{method} step (s)", ours["step_s"], theirs and theirs["step_s"], "lower"))
        rows.append((f"{method} peak RSS (MB)", ours["peak_rss_mb"], theirs and theirs["peak_rss_mb"], "lower"))
    # Decoding is bound by memory bandwidth, which on a shared host moves by tens of percent
    # from one minute to the next (44 to 81 GB/s seen within a minute). So decoding is measured
    # in rounds: lowrank's runs of every mode back to back (each after a bandwidth reading), so
    # that unmerged and merged see nearly the same memory, then transformers' runs; every
    # figure and ratio is the median over rounds of that round's values.
    decode_modes = [("base", False, False), ("unmerged", False, False), ("merged", True, False),
                    ("base bf16", False, True), ("unmerged bf16", False, True)]
    samples = {name: [] for name, _, _ in decode_modes}
    for round_ in range(0 if args.skip_decode else args.decode_rounds):
        for name, merge, bf16 in decode_modes:
            print(f"decoding, round {round_ + 1}/{args.decode_rounds}: lowrank {name} ...", file=sys.stderr)
            mode = name.split()[0]
            bandwidth = run_child("read_bandwidth_gb_s")
            ours = lowrank_decode(args.lowrank, model_dir, adapter if mode != "base" else None, merge, args.decode_tokens, bf16=bf16)
            samples[name].append({"ours": ours, "theirs": None, "bandwidth": bandwidth})
        # bf16 rows are held against transformers' f32 decoding (its bf16 CPU path computes in
        # bf16, not comparable), taken from the same rounds' f32 base runs.
        for name, _, bf16 in [] if args.skip_torch else decode_modes:
            if not bf16:
                print(f"decoding, round {round_ + 1}/{args.decode_rounds}: transformers {name} ...", file=sys.stderr)
                samples[name][-1]["theirs"] = run_child("torch_decode", model_dir, name, args.decode_tokens)
    median = statistics.median
    for name, _, bf16 in [] if args.skip_decode else decode_modes:
        runs = samples[name]
        ours_of[name] = {"decode_tok_s": median(r["ours"]["decode_tok_s"] for r in runs)}
        theirs_runs = samples["base"] if bf16 else runs
        theirs = None if args.skip_torch else median(r["theirs"]["decode_tok_s"] for r in theirs_runs)
        rows.append((f"decode {name} (tok/s)", ours_of[name]["decode_tok_s"], theirs, "higher"))
        if name == "base":
            theirs = None if args.skip_torch else median(r["theirs"]["prefill_tok_s"] for r in runs)
            rows.append(("prefill 256 (tok/s)", median(r["ours"]["prefill_tok_s"] for r in runs), theirs, "higher"))

    print(f"\n{'measure':<26} {'lowrank':>10} {'torch+peft':>11} {'ratio':>7}  (ratio = lowrank / torch)")
    for name, ours, theirs, better in rows:
        ratio = f"{ours / theirs:7.2f}" if theirs else "      -"
        theirs_s = f"{theirs:11.2f}" if theirs else "          -"
        print(f"{name:<26} {ours:10.2f} {theirs_s} {ratio}  ({better} is better)")

    print(f"\nlowrank alone:")
    if "dora" in ours_of and "lora" in ours_of:
        print(f"  DoRA / LoRA step: {ours_of['dora']['step_s'] / ours_of['lora']['step_s']:.2f} (separate runs)")
        # Separate runs minutes apart see different machines' worth of noise (1.01 and 1.26 in
        # two runs of the same code); train_pair alternates the two methods' steps in one process.
        print("training DoRA and LoRA in lockstep (cargo bench --bench train_pair) ...", file=sys.stderr)
        paired = subprocess.run(
            ["cargo", "bench", "-q", "-p", "lowrank-train", "--bench", "train_pair", "--", model_dir,
             str(args.paired_rounds)],
            cwd=os.path.join(os.path.dirname(__file__), ".."), capture_output=True, text=True)
        lines = [l for l in paired.stdout.splitlines() if "per-round ratios" in l]
        if paired.returncode == 0 and lines:
            print(f"  in lockstep, one process: {lines[0].strip()}")
        else:
            print(f"  train_pair failed ({paired.returncode}): {paired.stderr.strip()[-300:]}")
    if "lora-ckpt" in ours_of and "lora" in ours_of:
        print(f"  checkpointed / plain LoRA: step {ours_of['lora-ckpt']['step_s'] / ours_of['lora']['step_s']:.2f}, "
              f"peak RSS {ours_of['lora-ckpt']['peak_rss_mb'] / ours_of['lora']['peak_rss_mb']:.2f}")
    if "lora-bf16" in ours_of and "lora" in ours_of:
        f32, bf16 = ours_of["lora"], ours_of["lora-bf16"]
        worst = max(abs(a - b) / a for a, b in zip(f32["losses"], bf16["losses"]))
        print(f"  bf16 / f32 compute LoRA: step {bf16['step_s'] / f32['step_s']:.2f}, peak RSS {bf16['peak_rss_mb'] / f32['peak_rss_mb']:.2f}; "
              f"losses f32 {[round(x, 5) for x in f32['losses']]} bf16 {[round(x, 5) for x in bf16['losses']]} (worst relative difference {worst:.2e})")
    if args.skip_decode:
        return
    # Separate runs cannot resolve a 5% difference under that noise; decode_pair decodes
    # unmerged, merged and base in lockstep in one process and compares each step's times.
    print("decoding in lockstep (cargo bench --bench decode_pair) ...", file=sys.stderr)
    paired = subprocess.run(
        ["cargo", "bench", "-q", "-p", "lowrank-models", "--bench", "decode_pair", "--", model_dir, adapter,
         str(args.paired_tokens)],
        cwd=os.path.join(os.path.dirname(__file__), ".."), capture_output=True, text=True)
    paired_lines = [l for l in paired.stdout.splitlines()
                    if "per-step ratios" in l or "read bandwidth" in l or "of the bound" in l]
    per_token = weight_bytes_per_token()
    rounds = len(samples["base"])
    per_round = [samples["merged"][i]["ours"]["decode_tok_s"] / samples["unmerged"][i]["ours"]["decode_tok_s"] for i in range(rounds)]
    print(f"  unmerged / merged decode time per token: {median(per_round):.3f} (rounds: {', '.join(f'{x:.3f}' for x in per_round)})")
    if paired.returncode == 0 and paired_lines:
        print(f"  in lockstep, one process: {paired_lines[0].strip()}")
        for line in paired_lines[1:]:
            print(f"    {line.strip()}")
    else:
        print(f"  decode_pair failed ({paired.returncode}): {paired.stderr.strip()[-300:]}")
    bandwidths = [r["bandwidth"] for runs in samples.values() for r in runs]
    print(f"  read bandwidth {min(bandwidths):.1f} to {max(bandwidths):.1f} GB/s (median {median(bandwidths):.1f}) over {len(bandwidths)} readings; "
          f"weights read per token {per_token / 1e6:.1f} MB (f32), half that over bf16 weights")
    for name, _, bf16 in decode_modes:
        bytes_per_token = per_token / 2 if bf16 else per_token
        shares = [r["ours"]["decode_tok_s"] * bytes_per_token / (r["bandwidth"] * 1e9) for r in samples[name]]
        bound = median(r["bandwidth"] * 1e9 / bytes_per_token for r in samples[name])
        print(f"  decode {name}: {ours_of[name]['decode_tok_s']:.1f} tok/s; bound {bound:.1f} tok/s; share of the bound read just before it "
              f"{100 * median(shares):.0f}% (rounds: {', '.join(f'{100 * x:.0f}%' for x in shares)})")


if __name__ == "__main__":
    main()
