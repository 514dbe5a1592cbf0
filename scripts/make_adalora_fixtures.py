#!/usr/bin/env python3
"""Generate the AdaLoRA fixtures under fixtures/adalora/ (independent of
make_fixtures.py, whose output it only reads: fixtures/models/llama-tied,
fixtures/data/{train,eval}.jsonl).

Usage: python3 scripts/make_adalora_fixtures.py   (offline, deterministic;
same pinned versions as make_fixtures.py: torch 2.15.0, transformers 5.24.0,
peft 0.21.2).

What it writes (fixtures/adalora/):
  init/         a PEFT AdaLoRA adapter (init_r 4, target_r 2, all 7 linears of
                both layers of llama-tied) with random non-zero lora_E (N(0,1)) and
                lora_A / lora_B ~ N(0, 0.1) instead of PEFT's E = 0 init, so the
                adapter changes the outputs from the first step on.
  trained/      init/ trained for 9 SGD steps (lr 0.05, batch 1, train.jsonl in
                file order, then its first 3 lines again) with PEFT's loop:
                loss = model(input_ids, labels).loss (includes the orthogonal
                regularizer), backward, optimizer.step(),
                base_model.update_and_allocate(step) with step = 1..9 (the number of
                optimizer steps taken, as transformers' Trainer's global_step),
                zero_grad. Schedule tinit 2, tfinal 3, deltaT 2, total_step 9:
                masks at steps 4 (budget 31 of 56) and 6 (= T - tfinal, final
                budget 28), then the pattern is enforced. save_pretrained writes
                rank_pattern and tensors cut to the kept rank.
  steps.json    per-step loss (with the regularizer), nll, orth_reg, budget and
                the rank pattern after each step.
  reference.safetensors / reference.json
                log-probs of trained/ on eval.jsonl (input_ids.<i>, logprobs.<i>),
                loss / perplexity / tokens as lm_eval_common.corpus_loss, and the
                weights of merge_and_unload() for two modules.
"""

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import AdaLoraConfig, PeftModel, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_eval_common import corpus_loss, encode, read_jsonl_texts, sequence_logprobs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
os.chdir(REPO)
FIX = Path("fixtures")
OUT = FIX / "adalora"

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

BASE = FIX / "models" / "llama-tied"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SCHEDULE = dict(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=9,
                beta1=0.85, beta2=0.85, orth_reg_weight=0.5)
LR = 0.05
STEPS = 9
# A, B ~ N(0, 0.1), E ~ N(0, 1): large enough to move the log-probs, small enough that the run
# is well conditioned (PEFT in f32 and f64 agree to ~1e-6 on every loss and on the pattern;
# with N(0, 0.3) the f32/f64 losses part by 0.5 within 4 steps).
AB_STD = 0.1


def write_json(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    text = re.sub(
        r"\[\s*((?:-?[\d.eE+-]+|true|false)(?:,\s*(?:-?[\d.eE+-]+|true|false))*)\s*\]",
        lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
        text,
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def tidy(out_dir):
    card = Path(out_dir) / "README.md"
    if card.exists():
        card.unlink()
    cfg_path = Path(out_dir) / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    write_json(cfg_path, cfg)


def load_base():
    m = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    m.eval()
    return m


def make_init():
    random.seed(500)
    torch.manual_seed(500)
    cfg = AdaLoraConfig(task_type="CAUSAL_LM", lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                        **SCHEDULE)
    model = get_peft_model(load_base(), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_E" in n:
                p.normal_(0.0, 1.0)
            elif "lora_A" in n or "lora_B" in n:
                p.normal_(0.0, AB_STD)
    model.save_pretrained(OUT / "init")
    tidy(OUT / "init")


def make_train(tok):
    torch.manual_seed(501)
    model = PeftModel.from_pretrained(load_base(), OUT / "init", is_trainable=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR, momentum=0.0, weight_decay=0.0)
    texts = read_jsonl_texts(FIX / "data/train.jsonl")
    order = [texts[i % len(texts)] for i in range(STEPS)]
    steps = []
    for step, text in enumerate(order, start=1):
        ids = torch.tensor([encode(tok, text)], dtype=torch.long)
        out = model(input_ids=ids, labels=ids)
        loss = out.loss
        with torch.no_grad():
            nll = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), ids[0, 1:]).item()
        loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
        budget, _ = model.base_model.rankallocator.budget_schedule(step)
        rp = model.peft_config["default"].rank_pattern
        kept = None
        if rp is not None:
            kept = {k.replace(".default", ""): int(sum(v)) for k, v in rp.items()}
        steps.append({"step": step, "loss": loss.item(), "nll": nll, "orth_reg": (loss.item() - nll) / SCHEDULE["orth_reg_weight"],
                      "budget": budget, "kept": kept})
    model.save_pretrained(OUT / "trained")
    tidy(OUT / "trained")
    final = json.loads((OUT / "trained/adapter_config.json").read_text())["rank_pattern"]
    write_json(OUT / "steps.json", {
        "init_adapter": "fixtures/adalora/init", "base_model": "llama-tied", "optimizer": "sgd", "lr": LR,
        "batch_size": 1, "steps": STEPS, "schedule": SCHEDULE,
        "losses": [s["loss"] for s in steps], "nll": [s["nll"] for s in steps],
        "budgets": [s["budget"] for s in steps],
        "per_step": steps, "final_rank_pattern": final,
    })
    return steps


def make_reference(tok):
    model = PeftModel.from_pretrained(load_base(), OUT / "trained")
    model.eval()
    eval_texts = read_jsonl_texts(FIX / "data/eval.jsonl")
    tensors = {}
    for i, text in enumerate(eval_texts):
        ids = encode(tok, text)
        tensors[f"input_ids.{i}"] = torch.tensor(ids, dtype=torch.int64)
        tensors[f"logprobs.{i}"] = sequence_logprobs(model, ids).contiguous()
    stats = corpus_loss(model, tok, eval_texts)
    merged = model.merge_and_unload()
    for name in ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]:
        tensors[f"merged.{name}.weight"] = merged.get_submodule(name).weight.detach().contiguous()
    save_file(tensors, OUT / "reference.safetensors")
    write_json(OUT / "reference.json", stats)
    base_stats = corpus_loss(load_base(), tok, eval_texts)
    return stats, base_stats


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(BASE)
    make_init()
    steps = make_train(tok)
    for s in steps:
        print(s["step"], s["loss"], s["budget"], None if s["kept"] is None else sum(s["kept"].values()))
    stats, base_stats = make_reference(tok)
    print("eval loss trained adapter", stats, "base", base_stats)


if __name__ == "__main__":
    main()
