#!/usr/bin/env python3
"""Speed and memory benchmark: lowrank against PyTorch + PEFT + transformers, measured in one
run on this machine, printed as ratios. A benchmark, not a test: nothing here is asserted.

    cargo build --release && python3 scripts/bench.py [--steps 3] [--decode-tokens 32]

It builds a SmolLM-135M-shaped Llama with random weights (vocab 49152, hidden 576, 30 layers,
9 heads / 3 KV heads, intermediate 1536, tied embeddings; f32, not committed) and a word-level
tokenizer over that vocabulary in a temporary folder, then measures, each in its own process
so that peak RSS is that measurement's alone:

- LoRA training step (r=16, α=32, all-linear, batch 4 × 256 tokens, AdamW): seconds/step, peak RSS
- DoRA training step, full fine-tuning step (same batch)
- decoding tokens/s at batch 1: base, unmerged LoRA, merged LoRA; prefill tokens/s (256 tokens)

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


def torch_train(model_dir, method, steps):
    """Runs in a child process: seconds per step (median after one warm-up) and peak RSS."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if method != "full":
        config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, use_dora=method == "dora")
        model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    batch = tok(texts(BATCH), return_tensors="pt")
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        out = model(**batch, labels=batch["input_ids"])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times[1:]), "peak_rss_mb": peak_rss_mb()}


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


def lowrank_train(binary, model_dir, data, method, steps, work):
    out = os.path.join(work, f"train-{method}")
    cmd = [binary, "train", "--model", model_dir, "--data", data, "--out", out, "--method", method,
           "--rank", "16", "--alpha", "32", "--targets", "all-linear", "--batch-size", str(BATCH),
           "--max-len", str(SEQ), "--max-steps", str(steps + 1), "--optimizer", "adamw", "--lr", "1e-4",
           "--no-shuffle", "--quiet"]
    subprocess.run(cmd, check=True, capture_output=True)
    log = [json.loads(l) for l in open(os.path.join(out, "training_log.jsonl")) if '"step"' in l and '"loss"' in l]
    step_s = statistics.median(BATCH * SEQ / row["tokens_per_s"] for row in log[1:])
    return {"step_s": step_s, "peak_rss_mb": max(row["peak_rss_mb"] for row in log)}


def lowrank_decode(binary, model_dir, adapter, merge, tokens):
    def gen(prompt, n):
        cmd = [binary, "generate", "--model", model_dir, "--prompt", prompt, "--max-tokens", str(n), "--ignore-eos"]
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
    ap.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--lowrank", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "lowrank"))
    ap.add_argument("--skip-torch", action="store_true", help="measure lowrank only")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="lowrank-bench-")
    model_dir, adapter = os.path.join(work, "model"), os.path.join(work, "adapter")
    data = os.path.join(work, "train.jsonl")
    print(f"building the SmolLM-135M-shaped model in {work} ...", file=sys.stderr)
    build_model(model_dir)
    make_adapter(model_dir, adapter)
    with open(data, "w") as f:
        for t in texts(BATCH * (args.steps + 1), seed=3):
            f.write(json.dumps({"text": t}) + "\n")

    rows = []
    for method in ["lora", "dora", "full"]:
        print(f"training step: {method} ...", file=sys.stderr)
        ours = lowrank_train(args.lowrank, model_dir, data, method, args.steps, work)
        theirs = None if args.skip_torch else run_child("torch_train", model_dir, method, args.steps)
        rows.append((f"{method} step (s)", ours["step_s"], theirs and theirs["step_s"], "lower"))
        rows.append((f"{method} peak RSS (MB)", ours["peak_rss_mb"], theirs and theirs["peak_rss_mb"], "lower"))
    for mode in ["base", "unmerged", "merged"]:
        print(f"decoding: {mode} ...", file=sys.stderr)
        ours = lowrank_decode(args.lowrank, model_dir, adapter if mode != "base" else None, mode == "merged", args.decode_tokens)
        theirs = None if args.skip_torch else run_child("torch_decode", model_dir, mode, args.decode_tokens)
        rows.append((f"decode {mode} (tok/s)", ours["decode_tok_s"], theirs and theirs["decode_tok_s"], "higher"))
        if mode == "base":
            rows.append(("prefill 256 (tok/s)", ours["prefill_tok_s"], theirs and theirs["prefill_tok_s"], "higher"))

    print(f"\n{'measure':<26} {'lowrank':>10} {'torch+peft':>11} {'ratio':>7}  (ratio = lowrank / torch)")
    for name, ours, theirs, better in rows:
        ratio = f"{ours / theirs:7.2f}" if theirs else "      -"
        theirs_s = f"{theirs:11.2f}" if theirs else "          -"
        print(f"{name:<26} {ours:10.2f} {theirs_s} {ratio}  ({better} is better)")


if __name__ == "__main__":
    main()
