#!/usr/bin/env python3
"""lowrank against llama.cpp on the same model, measured in one run: a benchmark, not a test.

    cargo build --release
    python3 scripts/bench_llamacpp.py --llama-cpp PATH/TO/llama.cpp [--clients 1,8,32]

PATH/TO/llama.cpp is a llama.cpp source tree with `build/bin/llama-server`, `llama-bench` and
`llama-quantize` built (the tree vendored in the `llama-cpp-python` source package builds with
`cmake -B build -DLLAMA_CURL=OFF && cmake --build build --target llama-server llama-bench
llama-quantize`); its `convert_hf_to_gguf.py` and `convert_lora_to_gguf.py` make the GGUF files.
Nothing of llama.cpp is committed here.

The model is `scripts/bench.py`'s SmolLM-135M-shaped Llama (random weights, a word-level
vocabulary `w3 … w49151`). llama.cpp needs a vocabulary of its own kinds, so the GGUF gets a
SentencePiece one whose pieces are `▁w3 …`, and llama-server gets the prompts as the token ids
lowrank's tokenizer gives for the same text.

It prints, per weight format (f32; bf16; bf16-act, lowrank's bf16 with each linear's input rounded to bf16
as llama.cpp's bf16 matmul rounds it; lowrank NF4+DQ, with an f32 or a bf16 head, beside llama.cpp Q4_0
and Q4_1):
- single-stream decode (tg64) and prefill of a 256-token prompt (pp256): lowrank `generate`
  against `llama-bench`, and the prefill warm as llama-bench runs it (a warm-up, then the mean
  of its repeats in one process: `cargo bench --bench prefill`);
- closed-loop serving at each client count, base and over N adapters (each request one
  adapter, in turn): aggregate tokens/s and p50/p99 latency of `lowrank serve --max-batch C`
  against `llama-server -np C`, same prompts (16 words), greedy, 64 tokens, EOS ignored;
- the bound of decoding: a step of C rows takes at least the weight bytes it reads ÷ the read
  bandwidth and C × its FLOPs per row ÷ the f32 GEMM rate (bf16-act: the bf16 GEMM rate), both measured here with torch; the
  tighter of the two gives C tokens per step, and each figure's share of it.
The load average is printed with each figure: on a shared host, compare ratios, not absolutes.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
import bench  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


def load():
    return os.getloadavg()[0]


def convert_model(llama_dir, model_dir, out, outtype):
    """convert_hf_to_gguf.py with the word vocabulary written as SentencePiece pieces."""
    code = f"""
import sys
sys.path.insert(0, {llama_dir!r}); sys.path.insert(0, {os.path.join(llama_dir, 'gguf-py')!r})
import gguf, convert_hf_to_gguf as c
from conversion.llama import LlamaModel
def set_vocab(self):
    n = self.hparams["vocab_size"]
    tokens = ["<unk>", "<s>", "</s>"] + ["\\u2581w%d" % i for i in range(3, n)]
    kinds = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (n - 3)
    self.gguf_writer.add_tokenizer_model("llama")
    self.gguf_writer.add_tokenizer_pre("default")
    self.gguf_writer.add_token_list(tokens)
    self.gguf_writer.add_token_scores([0.0] * n)
    self.gguf_writer.add_token_types(kinds)
    self.gguf_writer.add_bos_token_id(1); self.gguf_writer.add_eos_token_id(2); self.gguf_writer.add_unk_token_id(0)
    self.gguf_writer.add_add_bos_token(True); self.gguf_writer.add_add_eos_token(False)
LlamaModel.set_vocab = set_vocab
sys.argv = ["convert_hf_to_gguf.py", {model_dir!r}, "--outfile", {out!r}, "--outtype", {outtype!r}]
c.main()
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed: {run.stderr[-3000:]}")


def make_adapters(model_dir, root, count):
    """`count` PEFT LoRA adapters (r 8, all-linear, non-zero B) and their llama.cpp GGUF-LoRA files."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    names = []
    os.makedirs(os.path.join(root, "adapters"), exist_ok=True)
    for i in range(count):
        path = os.path.join(root, "adapters", f"tenant-{i:02}")
        torch.manual_seed(100 + i)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                         init_lora_weights=False)).save_pretrained(path)
        names.append(path)
    return names


def convert_adapter(llama_dir, model_dir, adapter, out):
    subprocess.run([sys.executable, os.path.join(llama_dir, "convert_lora_to_gguf.py"), adapter,
                    "--base", model_dir, "--outfile", out, "--outtype", "f32"],
                   check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=os.path.join(llama_dir, "gguf-py")))


def wait_ready(url, proc, seconds=600):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become ready")


def prompt_ids(i):
    """Sixteen words of the word-level vocabulary after <s>: their token ids."""
    return [1] + [3 + (i * 16 + j) % 4000 for j in range(16)]


def prompt(i):
    return " ".join(f"w{t}" for t in prompt_ids(i)[1:])


def closed_loop(url, clients, requests, max_tokens, body_for):
    """`clients` threads send `requests` completions in all; tokens/s and latency percentiles."""
    lock, nxt, toks, lat = threading.Lock(), [0], [0], []

    def client():
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= requests:
                return
            body = json.dumps(body_for(i, prompt(i), max_tokens)).encode()
            t = time.time()
            req = urllib.request.Request(url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=1200) as r:
                out = json.loads(r.read())
            with lock:
                toks[0] += out["usage"]["completion_tokens"]
                lat.append(time.time() - t)

    start = time.time()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - start
    lat.sort()
    return {"tokens_per_s": toks[0] / wall, "p50_s": lat[len(lat) // 2],
            "p99_s": lat[min(len(lat) - 1, int(len(lat) * 0.99))]}


# lowrank's flags per --weights name; nf4-dq+bf16 keeps the tied embedding/head in bf16 over the 4-bit layers;
# bf16-act also rounds each linear's input to bf16, as llama.cpp's bf16 matmul does.
WEIGHT_FLAGS = {"f32": [], "bf16": ["--bf16-weights"], "bf16-act": ["--bf16-weights", "--bf16-activations"],
                "nf4-dq": ["--quantize", "nf4", "--double-quant"],
                "nf4-dq+bf16": ["--quantize", "nf4", "--double-quant", "--bf16-weights"]}


def step_bytes(weights):
    """Weight bytes a batch-1 lowrank decoding step reads, per --weights name."""
    head = bench.VOCAB * bench.HIDDEN
    linear = bench.weight_bytes_per_token() / 4 - head
    # NF4+DQ: 4 bits a value, an 8-bit absmax per 64 values and an f32 per 256 of those.
    per_linear = {"f32": 4, "bf16": 2, "bf16-act": 2}.get(weights, (4 + 8 / 64 + 32 / (64 * 256)) / 8)
    per_head = 2 if weights in ("bf16", "bf16-act", "nf4-dq+bf16") else 4
    return linear * per_linear + head * per_head


def gemm_flop_s(dtype="float32"):
    """FLOP per second of a large torch matmul on all cores (best of 3), f32 or bf16 operands."""
    import torch
    a = torch.randn(2048, 2048).to(getattr(torch, dtype))
    b = torch.randn(2048, 2048).to(getattr(torch, dtype))
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best


def decode_bound(bytes_per_step, flop_per_row, rows, bandwidth, gemm):
    """Tokens/s a step of `rows` rows cannot beat, and which resource bounds it."""
    memory_s, compute_s = bytes_per_step / bandwidth, rows * flop_per_row / gemm
    return rows / max(memory_s, compute_s), "memory" if memory_s >= compute_s else "compute"


def serve_lowrank(args, model_dir, adapter_root, weights, clients, adapters):
    cmd = [args.lowrank, "serve", "--model", model_dir, "--adapters", adapter_root, "--port", str(args.port),
           "--max-batch", str(clients), "--served-model-name", "base", "--kv-cache-mb", "4096"]
    cmd += WEIGHT_FLAGS[weights]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_ready(url, proc)
        names = [os.path.basename(a) for a in adapters]

        def body(i, text, m):
            b = {"prompt": text, "max_tokens": m, "temperature": 0}
            b["model"] = names[i % len(names)] if names else "base"
            return b

        closed_loop(url, clients, clients, 4, body)  # warm: adapters loaded, pages touched
        return closed_loop(url, clients, clients * args.requests_per_client, args.max_tokens, body)
    finally:
        proc.terminate()
        proc.wait()


def serve_llamacpp(args, gguf, lora_files, clients):
    cmd = [os.path.join(args.llama_cpp, "build", "bin", "llama-server"), "-m", gguf, "--port", str(args.port),
           "-np", str(clients), "-c", str(clients * 256), "-t", str(os.cpu_count()), "--no-webui"]
    for f in lora_files:
        cmd += ["--lora", f]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_ready(url, proc)
        n = len(lora_files)

        def body(i, text, m):
            # Token ids: llama.cpp's SentencePiece tokenizer cannot build `▁w123` from its characters.
            b = {"prompt": prompt_ids(i), "max_tokens": m, "temperature": 0, "ignore_eos": True,
                 "cache_prompt": False}
            if n:
                b["lora"] = [{"id": j, "scale": 1.0 if j == i % n else 0.0} for j in range(n)]
            return b

        closed_loop(url, clients, clients, 4, body)
        return closed_loop(url, clients, clients * args.requests_per_client, args.max_tokens, body)
    finally:
        proc.terminate()
        proc.wait()


# Single-stream figures on both sides: llama-bench's average of this many runs, lowrank's median.
REPEATS = 3


def llama_bench(args, gguf):
    out = subprocess.run([os.path.join(args.llama_cpp, "build", "bin", "llama-bench"), "-m", gguf, "-p", "256",
                          "-n", "64", "-t", str(os.cpu_count()), "-r", str(REPEATS), "-o", "json"],
                         check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)
    pick = lambda key: next(r["avg_ts"] for r in rows if r[key] > 0)  # noqa: E731
    return {"prefill_tok_s": pick("n_prompt"), "decode_tok_s": pick("n_gen")}


def lowrank_single(args, model_dir, weights):
    def gen(text, n):
        cmd = [args.lowrank, "generate", "--model", model_dir, "--prompt", text, "--max-tokens", str(n), "--ignore-eos"]
        cmd += WEIGHT_FLAGS[weights]
        err = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
        m = re.search(r"prefill: (\d+) tokens in ([\d.]+) s .*decode: \d+ tokens at ([\d.]+) tokens/s", err)
        return int(m.group(1)) / float(m.group(2)), float(m.group(3))

    # The median of REPEATS processes, as llama-bench averages REPEATS runs.
    prefill = statistics.median(gen(" ".join(f"w{3 + j}" for j in range(255)), 1)[0] for _ in range(REPEATS))
    decode = statistics.median(gen(prompt(0), 64)[1] for _ in range(REPEATS))
    return {"prefill_tok_s": prefill, "warm_prefill_tok_s": warm_prefill(model_dir, weights),
            "decode_tok_s": decode}


# The `prefill` bench's argument for each weight format (None: it has no such format).
PREFILL_BENCH_WEIGHTS = {"f32": [], "bf16": ["bf16"], "bf16-act": ["bf16-act"], "nf4-dq": None,
                         "nf4-dq+bf16": ["nf4"]}


def warm_prefill(model_dir, weights):
    """pp256 as llama-bench measures it: in one process, a warm-up prefill, then the mean of
    REPEATS (`cargo bench --bench prefill`). `generate`'s figure above is a fresh process's first
    prefill, which also pays for first-touch pages and the thread pool's start."""
    extra = PREFILL_BENCH_WEIGHTS[weights]
    if extra is None:
        return None
    out = subprocess.run(["cargo", "bench", "-q", "-p", "lowrank-models", "--bench", "prefill", "--", model_dir,
                          str(REPEATS + 1), "256"] + extra, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    rates = [float(m.group(1)) for m in re.finditer(r"([\d.]+) tokens/s", out)]
    return statistics.mean(rates[1:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", required=True, help="llama.cpp source tree with build/bin built")
    ap.add_argument("--model", help="bench.py's model folder (built if absent)")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--adapters", type=int, default=8, help="adapters of the adapter scenarios (0: base only)")
    ap.add_argument("--weights", default="f32,bf16,nf4-dq,nf4-dq+bf16")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=18431)
    ap.add_argument("--lowrank", default=os.path.join(ROOT, "target", "release", "lowrank"))
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-llamacpp-")
    model_dir = args.model or os.path.join(work, "model")
    if not args.model:
        bench.build_model(model_dir)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; work folder {work}", flush=True)

    ggufs = {"f32": ("f32", os.path.join(work, "f32.gguf")), "bf16": ("bf16", os.path.join(work, "bf16.gguf"))}
    for kind, (outtype, path) in ggufs.items():
        convert_model(args.llama_cpp, model_dir, path, outtype)
    quantize = os.path.join(args.llama_cpp, "build", "bin", "llama-quantize")
    for q in ["q4_0", "q4_1"]:
        path = os.path.join(work, f"{q}.gguf")
        subprocess.run([quantize, ggufs["f32"][1], path, q.upper()], check=True, capture_output=True)
        ggufs[q] = (q, path)
    adapters = make_adapters(model_dir, work, args.adapters)
    lora_files = []
    for a in adapters:
        out = a + ".gguf"
        convert_adapter(args.llama_cpp, model_dir, a, out)
        lora_files.append(out)

    bandwidth = bench.read_bandwidth_gb_s() * 1e9
    gemm = gemm_flop_s()
    # bf16-act multiplies bf16 operands: its compute bound is a bf16 GEMM's rate.
    gemm_bf16 = gemm_flop_s("bfloat16")
    # Two FLOPs per weight of the linears and the head, per row (attention is small here).
    flop_per_row = 2 * bench.weight_bytes_per_token() / 4
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, f32 GEMM {gemm / 1e9:.0f} GFLOP/s, bf16 GEMM "
          f"{gemm_bf16 / 1e9:.0f} GFLOP/s (torch, all cores)", flush=True)
    pairs = {"f32": ["f32"], "bf16": ["bf16"], "bf16-act": ["bf16"], "nf4-dq": ["q4_0", "q4_1"],
             "nf4-dq+bf16": ["q4_0", "q4_1"]}
    results = []
    for weights in args.weights.split(","):
        ours = lowrank_single(args, model_dir, weights)
        ours_bytes = step_bytes(weights)
        rate = gemm_bf16 if weights == "bf16-act" else gemm
        for peer in pairs[weights]:
            theirs = llama_bench(args, ggufs[peer][1])
            line = (f"[{weights} vs {peer}] single stream: decode {ours['decode_tok_s']:.1f} vs {theirs['decode_tok_s']:.1f} tok/s "
                    f"(x{ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}), pp256 {ours['prefill_tok_s']:.0f} vs "
                    f"{theirs['prefill_tok_s']:.0f} tok/s (x{ours['prefill_tok_s'] / theirs['prefill_tok_s']:.2f})")
            if ours["warm_prefill_tok_s"]:
                line += (f", warm pp256 {ours['warm_prefill_tok_s']:.0f} tok/s "
                         f"(x{ours['warm_prefill_tok_s'] / theirs['prefill_tok_s']:.2f})")
            bound, by = decode_bound(ours_bytes, flop_per_row, 1, bandwidth, rate)
            line += f"; decode bound {bound:.0f} tok/s ({by}; {ours_bytes / 1e6:.0f} MB/token)"
            print(line + f" (load {load():.1f})", flush=True)
            results.append({"weights": weights, "peer": peer, "single": {"lowrank": ours, "llamacpp": theirs}})
        for clients in [int(c) for c in args.clients.split(",")]:
            for n in sorted({0, args.adapters}):
                ours = serve_lowrank(args, model_dir, os.path.join(work, "adapters"), weights, clients, adapters[:n])
                for peer in pairs[weights]:
                    theirs = serve_llamacpp(args, ggufs[peer][1], lora_files[:n], clients)
                    bound, by = decode_bound(ours_bytes, flop_per_row, clients, bandwidth, rate)
                    print(f"[{weights} vs {peer}] {clients} clients, {n or 'no'} adapters: "
                          f"{ours['tokens_per_s']:.1f} vs {theirs['tokens_per_s']:.1f} tok/s "
                          f"(x{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}); p50 {ours['p50_s']:.1f} vs "
                          f"{theirs['p50_s']:.1f} s, p99 {ours['p99_s']:.1f} vs {theirs['p99_s']:.1f} s; "
                          f"bound {bound:.0f} tok/s ({by}), lowrank at {100 * ours['tokens_per_s'] / bound:.0f}% "
                          f"(load {load():.1f})", flush=True)
                    results.append({"weights": weights, "peer": peer, "clients": clients, "adapters": n,
                                    "lowrank": ours, "llamacpp": theirs})
    print(json.dumps(results))


def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + (" (AVX-512)" if "avx512f" in open("/proc/cpuinfo").read() else " (AVX2)")
    return "unknown"


if __name__ == "__main__":
    main()
