#!/usr/bin/env python3
"""Load a base model (f32) + a PEFT LoRA adapter and print the corpus loss.

Used by humans to check that adapters written by lowrank load in PEFT:

    python3 scripts/verify_with_peft.py --model fixtures/models/llama-tied \
        --adapter fixtures/adapters/llama-tied__lora-qv --data fixtures/data/eval.jsonl

Prints {"loss": ..., "perplexity": ..., "tokens": ...} computed exactly like
fixtures/reference/*.json (see lm_eval_common.py). Optional --max-len N
truncates every sequence to its first N tokens. Works offline.
"""

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lm_eval_common import corpus_loss, read_jsonl_texts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="base model directory (transformers format)")
    ap.add_argument("--adapter", required=True, help="PEFT adapter directory")
    ap.add_argument("--data", required=True, help="JSONL file with a 'text' field per line")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    ap.add_argument("--max-len", type=int, default=None)
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    # dtype=float32 upcasts bf16/f16 checkpoints so the reference is computed in f32
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, args.adapter)
    model.eval()
    print(json.dumps(corpus_loss(model, tok, read_jsonl_texts(args.data), args.max_len)))


if __name__ == "__main__":
    main()
