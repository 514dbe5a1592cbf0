"""Shared helpers for the fixture generator and the verify_* scripts.

The loss definition here is the one the Rust side must reproduce:
for every sequence, token t (t >= 1) is predicted from positions < t; the
reported loss is the total NLL summed over all sequences divided by the total
number of predicted tokens ("tokens"), and perplexity = exp(loss).
Sequences are encoded one at a time with `tokenizer(text)["input_ids"]`
(special tokens included, no padding, no truncation unless `max_len` is given,
in which case only the first `max_len` tokens are kept).
"""

import json
import math

import torch
import torch.nn.functional as F


def read_jsonl_texts(path):
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                texts.append(json.loads(line)["text"])
    return texts


def encode(tokenizer, text, max_len=None):
    ids = tokenizer(text)["input_ids"]
    if max_len is not None:
        ids = ids[:max_len]
    return ids


@torch.no_grad()
def sequence_logprobs(model, ids):
    """log_softmax of the logits at every position, f32, shape [T, V]."""
    input_ids = torch.tensor([ids], dtype=torch.long)
    logits = model(input_ids=input_ids).logits[0].float()
    return F.log_softmax(logits, dim=-1)


@torch.no_grad()
def corpus_loss(model, tokenizer, texts, max_len=None):
    total_nll = 0.0
    total_tokens = 0
    for text in texts:
        ids = encode(tokenizer, text, max_len)
        if len(ids) < 2:
            continue
        lp = sequence_logprobs(model, ids)
        targets = torch.tensor(ids[1:], dtype=torch.long)
        nll = -lp[:-1].gather(1, targets[:, None]).squeeze(1)
        # accumulate in f64 so the summation order does not matter much
        total_nll += nll.double().sum().item()
        total_tokens += len(ids) - 1
    loss = total_nll / total_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": total_tokens}
