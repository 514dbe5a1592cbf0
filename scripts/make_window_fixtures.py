#!/usr/bin/env python3
"""Reference for `lowrank eval` on lines longer than the model's context: transformers'
sliding-window perplexity ("Perplexity of fixed-length models" in the transformers docs),
independent of make_fixtures.py, whose output it only reads (fixtures/models/llama-tied,
fixtures/data/{train,eval}.jsonl).

Usage: python3 scripts/make_window_fixtures.py   (offline, deterministic; same pinned
versions as make_fixtures.py: torch 2.15.0, transformers 5.24.0).

What it writes:
  fixtures/data/long.jsonl      two {"text"} lines: one far longer than llama-tied's 256
                                positions (every train/eval sentence, repeated), one short.
  fixtures/reference/windows.json
                                for each stride: loss / perplexity / tokens over both lines,
                                the long line's token count and the window (256).

The windows, as the transformers guide computes them: for begin = 0, stride, 2·stride, ...
the window is ids[begin : begin + window]; the tokens it scores are those after the previous
window's end (labels of the others set to -100), so every token after the first is scored
once, with at least window − stride tokens before it in its window; the last window ends at
the end of the line. The summed NLL of a window is outputs.loss times its number of scored
labels (counted exactly after the shift, where the guide's text approximates). A line no
longer than the window is one window, as lm_eval_common.corpus_loss scores it.
"""

import json
import math
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TQDM_DISABLE"] = "1"

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
os.chdir(REPO)
FIX = Path("fixtures")
MODEL = FIX / "models" / "llama-tied"

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


def read_texts(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


@torch.no_grad()
def windowed_nll(model, ids, window, stride):
    """Summed NLL and scored-token count of one line, the transformers guide's loop."""
    input_all = torch.tensor([ids], dtype=torch.long)
    seq_len = input_all.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + window, seq_len)
        trg_len = end - prev_end
        input_ids = input_all[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        loss = model(input_ids=input_ids, labels=target_ids).loss
        scored = int((target_ids[:, 1:] != -100).sum())
        nll_sum += loss.double().item() * scored
        n_tokens += scored
        prev_end = end
        if end == seq_len:
            break
    return nll_sum, n_tokens


def main():
    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    model.eval()
    window = model.config.max_position_embeddings
    sentences = read_texts(FIX / "data" / "train.jsonl") + read_texts(FIX / "data" / "eval.jsonl")
    long_text = " ".join(sentences * 12)
    lines = [long_text, sentences[0]]
    long_ids = tok(long_text)["input_ids"]
    assert len(long_ids) > 2 * window, len(long_ids)
    with open(FIX / "data" / "long.jsonl", "w", encoding="utf-8") as f:
        for text in lines:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    out = {"model": "llama-tied", "window": window, "long_line_tokens": len(long_ids)}
    for stride in (window - 1, 100):
        total, count = 0.0, 0
        for text in lines:
            nll, n = windowed_nll(model, tok(text)["input_ids"], window, stride)
            total += nll
            count += n
        loss = total / count
        out[f"stride_{stride}"] = {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
    path = FIX / "reference" / "windows.json"
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
