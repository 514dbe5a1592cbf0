#!/usr/bin/env python3
"""Generate the GGUF fixtures under fixtures/gguf/ (run after scripts/make_fixtures.py).

Usage (no network needed once the packages below are installed):

    pip install gguf==0.19.0
    python3 scripts/make_gguf_fixtures.py [--llama-cpp DIR]

Writes:
  * fixtures/gguf/quants.gguf: one tensor per ggml type lowrank reads (2 rows of 256
    values each), named after its type, and fixtures/gguf/quants_reference.safetensors:
    each tensor dequantized by gguf-py (`gguf.quants.dequantize`, the Python port of
    ggml's dequantize_row_*), f32, row-major shape [2, 256].
    F32/F16/BF16/Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 are quantized from random values by gguf-py.
    gguf-py cannot quantize Q4_K/Q5_K/Q6_K (nor Q8_K at all), so their blocks are random
    bytes with finite, moderate f16 (Q8_K: f32) scale fields: dequantization is the spec,
    every bit of the quants is exercised. gguf-py has no Q8_K class; its reference is
    ggml's dequantize_row_q8_K (y = d * q, f32) in numpy below.
  * fixtures/gguf/<model>-<type>.gguf: the fixture models llama-tied and qwen2-tied converted
    by llama.cpp's own convert_hf_to_gguf.py (--outtype f32/f16/bf16/q8_0), and
    fixtures/gguf/reference.json: per file, the eval.jsonl loss and greedy tokens (12 new
    tokens, no stop) of the HF model whose weights are the GGUF's tensors as gguf-py
    dequantizes them (for f32, the HF original itself), computed by transformers in f32.
  * fixtures/gguf/families/<family>-f32|q8_0.gguf: the family fixture models (fixtures/families:
    qwen3, phi3, gemma2, gemma3) converted the same way, with their reference.json entries
    ("families/<family>-<type>.gguf"), and families/<family>-config.json: the config.json of
    the model converted. Where GGUF cannot express a fixture's setting (llama.cpp
    decides it from the architecture), the converted copy is given llama.cpp's value first:
    Gemma's query_pre_attn_scalar = head_dim, Gemma 3 with six layers (one global in six;
    layers 3..5 copy 0..2), Qwen3 without sliding window. The converter's Gemma 2 and Phi-3
    classes read only a SentencePiece tokenizer.model; they are made to write the fixtures'
    byte-level BPE tokenizer.json (its gpt2 path), as Gemma 3's does by itself.
  * fixtures/gguf/lora/<adapter>.gguf: fixture PEFT adapters converted by llama.cpp's
    convert_lora_to_gguf.py (--base the fixture model, default --outtype f32), and
    lora/<family>__all-linear.gguf: each family fixture's all-linear adapter.
  * fixtures/gguf/merged/<adapter>-<type>.gguf: the merged checkpoints of fixtures/merged/
    (PEFT's merge_and_unload) converted by convert_hf_to_gguf.py.
  * fixtures/gguf/spm-vocab.gguf, spm-gemma-vocab.gguf: a SentencePiece tokenizer (BPE pieces
    with byte fallback, <unk> <s> </s>, added <|im_start|> <|im_end|>) trained by sentencepiece
    on the fixture texts, as a Llama tokenizer (space prefix) and a Gemma one (none), converted
    by convert_hf_to_gguf.py --vocab-only (tokenizer.ggml.model = llama) with a llama / gemma2
    config; fixtures/gguf/spm-tokenizer/, spm-gemma-tokenizer/: the HF tokenizers, as
    transformers converts the tokenizer.model (needs `pip install protobuf`).
  * fixtures/gguf/tokenizer_reference.json: a corpus and the ids the HF tokenizers (tokenizer.json through
    transformers) give each text, with and without special tokens ("spm": spm-tokenizer/,
    "spm-gemma": spm-gemma-tokenizer/).

llama.cpp's converter comes with the llama-cpp-python source package (vendor/llama.cpp):
    pip download llama-cpp-python==0.3.36 --no-binary llama-cpp-python --no-deps -d /tmp/lcp
    tar xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp
and --llama-cpp names its vendor/llama.cpp folder. It runs in-process with one patch: it
recognises a BPE pre-tokenizer by the hash of its output on a test string, and the fixture
tokenizers are not among the known ones, so `get_vocab_base_pre` is made to return the
pre-tokenizer they do use (llama-style: ByteLevel with GPT-2's regex = "gpt-2"; qwen-style:
Qwen2's regex = "qwen2"). It also needs `pip install sentencepiece` (imported before it
finds no tokenizer.model).

pinned versions (the fixtures in git were generated with exactly these):
    python 3.11.7, numpy 2.4.6, gguf 0.19.0, torch 2.15.0, transformers 5.24.0,
    llama-cpp-python 0.3.36 (its vendored convert_hf_to_gguf.py), sentencepiece 0.2.3,
    protobuf 7.36.2
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter, quants
from safetensors.numpy import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "fixtures", "gguf")

ROWS, COLS = 2, 256
QK_K = 256


def random_k_blocks(rng, qtype, n_blocks):
    """Random K-quant blocks whose scale fields are finite f16 (Q8_K: f32) of moderate size."""
    block_bytes = {T.Q4_K: 144, T.Q5_K: 176, T.Q6_K: 210, T.Q8_K: 292}[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)

    def f16_bytes(n):
        return (rng.standard_normal(n) * 0.01).astype(np.float16).view(np.uint8).reshape(n, 2)

    if qtype in (T.Q4_K, T.Q5_K):  # d, dmin at bytes 0..4
        blocks[:, 0:2] = f16_bytes(n_blocks)
        blocks[:, 2:4] = f16_bytes(n_blocks)
    elif qtype == T.Q6_K:  # d at the end
        blocks[:, 208:210] = f16_bytes(n_blocks)
    else:  # Q8_K: f32 d first
        d = (rng.standard_normal(n_blocks) * 0.01).astype(np.float32)
        blocks[:, 0:4] = d.view(np.uint8).reshape(n_blocks, 4)
    return blocks


def dequantize_q8_k(blocks):
    """ggml's dequantize_row_q8_K: y[j] = d * qs[j] (block: f32 d, 256 int8, 16 int16 sums)."""
    d = blocks[:, 0:4].copy().view(np.float32)
    qs = blocks[:, 4 : 4 + QK_K].copy().view(np.int8).astype(np.float32)
    return d * qs


def make_quants(rng):
    writer = GGUFWriter(os.path.join(OUT, "quants.gguf"), arch="quants-fixture")
    reference = {}
    values = (rng.standard_normal((ROWS, COLS)) * 0.5).astype(np.float32)
    values[0, :8] = [0.0, -0.0, 1.5, -1.5, 1e-8, 65504.0, -3.0e-5, 7.0]
    for qtype in (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
        data = quants.quantize(values, qtype)
        writer.add_tensor(qtype.name, data, raw_dtype=qtype)
        reference[qtype.name] = quants.dequantize(data, qtype).astype(np.float32).reshape(ROWS, COLS)
    for qtype in (T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_K):
        blocks = random_k_blocks(rng, qtype, ROWS * COLS // QK_K)
        data = blocks.reshape(ROWS, -1)
        writer.add_tensor(qtype.name, data, raw_dtype=qtype)
        if qtype == T.Q8_K:
            deq = dequantize_q8_k(blocks)
        else:
            deq = quants.dequantize(data, qtype)
        reference[qtype.name] = np.ascontiguousarray(deq, dtype=np.float32).reshape(ROWS, COLS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_file(reference, os.path.join(OUT, "quants_reference.safetensors"))


MODELS = {"llama-tied": "gpt-2", "qwen2-tied": "qwen2"}
OUTTYPES = {"llama-tied": ["f32", "f16", "bf16", "q8_0"], "qwen2-tied": ["f32", "q8_0"]}
GEN_PROMPTS = ["The quick cat", "Why does my garden"]
GEN_TOKENS = 12


# Runs in a child process: the converter imports its own gguf-py, not the installed one.
CONVERT = """
import sys
llama_cpp, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [llama_cpp, llama_cpp + "/gguf-py"]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
# Gemma 2 and Phi-3 read only a SentencePiece tokenizer.model; the family fixtures have a
# byte-level BPE tokenizer.json, which the converter's gpt2 path writes.
import conversion.gemma, conversion.phi
conversion.gemma.Gemma2Model.set_vocab = lambda self: (
    self._set_vocab_sentencepiece() if (self.dir_model / "tokenizer.model").is_file()
    else self._set_vocab_gpt2(), self.gguf_writer.add_add_space_prefix(False))
conversion.phi.Phi3MiniModel.set_vocab = conversion.base.TextModel._set_vocab_gpt2
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[3:]
convert_hf_to_gguf.main()
"""


def convert(llama_cpp, model, outtype, out, folder="models", pre=None):
    """Runs llama.cpp's convert_hf_to_gguf.py on fixtures/<folder>/<model> (or the folder `model`)."""
    pre = pre or MODELS[model.split("__")[0]]
    subprocess.run([sys.executable, "-c", CONVERT, llama_cpp, pre,
                    os.path.join(ROOT, "fixtures", folder, model),
                    "--outtype", outtype, "--outfile", out], check=True)


# GGUF tensor stem -> HF module (the converter's mapping, for the tensors these models have).
GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
         "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm",
         "attn_k_norm": "self_attn.k_norm"}
# Gemma 2/3 norm around both blocks; Phi-3 keeps its fused projections.
LAYER_GEMMA = {**LAYER, "post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
LAYER_PHI3 = {**LAYER, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}


def unpermute(w, n_head):
    """Inverse of the converter's LlamaModel.permute (reshape(n_head, 2, d/2, ...).swapaxes(1, 2))."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_state_from_gguf(path, config):
    import torch
    from gguf import GGUFReader

    gemma = config["model_type"].startswith("gemma")
    layer_names = LAYER_GEMMA if gemma else LAYER_PHI3 if config["model_type"] == "phi3" else LAYER
    state = {}
    for t in GGUFReader(path).tensors:
        if t.name.startswith("rope_factors_"):  # Phi-3's LongRoPE factors, config.json's
            continue
        stem, kind = t.name.rsplit(".", 1)
        if stem.startswith("blk."):
            _, layer, stem = stem.split(".", 2)
            name = f"model.layers.{layer}.{layer_names[stem]}.{kind}"
        else:
            name = f"{GLOBAL[stem]}.{kind}"
        w = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if gemma and name.endswith("norm.weight"):  # the converter stores Gemma's 1 + w
            w = w - 1
        if config["model_type"] == "llama" and stem in ("attn_q", "attn_k"):
            heads = config["num_attention_heads"] if stem == "attn_q" else config["num_key_value_heads"]
            w = unpermute(w, heads)
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
    return state


def eval_texts():
    with open(os.path.join(ROOT, "fixtures", "data", "eval.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def model_reference(model, tok):
    """Mean NLL over eval.jsonl (tokens t >= 1 of each line) and greedy continuations."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for text in eval_texts():
            ids = torch.tensor([tok(text)["input_ids"]])
            logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            nll -= logprobs[:-1].gather(1, ids[0, 1:, None]).sum().item()
            count += ids.shape[1] - 1
        greedy = []
        for prompt in GEN_PROMPTS:
            ids = tok(prompt)["input_ids"]
            new = []
            for _ in range(GEN_TOKENS):
                logits = model(torch.tensor([ids + new])).logits[0, -1]
                new.append(int(logits.argmax()))
            greedy.append({"prompt": prompt, "prompt_ids": ids, "token_ids": new})
    return {"loss": nll / count, "tokens": count, "greedy": greedy}


def gguf_reference(model_dir, path):
    """model_reference of the HF model of model_dir with the weights of GGUF file `path`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = hf_state_from_gguf(path, config)
    if config.get("tie_word_embeddings"):
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    model.eval()
    return model_reference(model, tok)


# What GGUF cannot say about a family fixture model (llama.cpp's loader decides it from the
# architecture), set in the copy that is converted, so the GGUF is that model:
#  * Gemma 2/3: the attention scale is 1/sqrt(head_dim) (query_pre_attn_scalar = head_dim);
#  * Gemma 3: one global layer in six (no sliding_window_pattern key): six layers, layers
#    i >= 3 copying layer i - 3's weights;
#  * Qwen3: no sliding window (llama.cpp's qwen3 has none).
# Phi-3 is converted as it is: its sliding_window key holds config.json's.
def gemma_variant(config):
    config["query_pre_attn_scalar"] = config["head_dim"]


def gemma3_variant(config):
    gemma_variant(config)
    config.update(num_hidden_layers=6, sliding_window_pattern=6, _sliding_window_pattern=6,
                  layer_types=["sliding_attention"] * 5 + ["full_attention"])


def qwen3_variant(config):
    config.update(use_sliding_window=False, layer_types=["full_attention"] * config["num_hidden_layers"])


FAMILIES = {"qwen3": ("qwen2", qwen3_variant), "phi3": ("qwen2", None),
            "gemma2": ("gpt-2", gemma_variant), "gemma3": ("gpt-2", gemma3_variant)}
FAMILY_OUTTYPES = ["f32", "q8_0"]


def family_model_dir(family, variant, tmp):
    """fixtures/families/<family>/model, or a copy with `variant` applied to its config.json."""
    import shutil

    from safetensors.torch import load_file
    from safetensors.torch import save_file as save_torch

    src = os.path.join(ROOT, "fixtures", "families", family, "model")
    if variant is None:
        return src
    dst = os.path.join(tmp, family)
    shutil.copytree(src, dst)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    layers = config["num_hidden_layers"]
    variant(config)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if config["num_hidden_layers"] != layers:
        state = load_file(os.path.join(src, "model.safetensors"))
        for i in range(layers, config["num_hidden_layers"]):
            prefix = f"model.layers.{i - layers}."
            for name in [n for n in state if n.startswith(prefix)]:
                state[f"model.layers.{i}." + name[len(prefix):]] = state[name].clone()
        save_torch(state, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def make_models(llama_cpp):
    import shutil
    import tempfile

    reference = {}
    for model_name, outtypes in OUTTYPES.items():
        model_dir = os.path.join(ROOT, "fixtures", "models", model_name)
        for outtype in outtypes:
            file = f"{model_name}-{outtype}.gguf"
            path = os.path.join(OUT, file)
            convert(llama_cpp, model_name, outtype, path)
            reference[file] = {"model": model_name, "outtype": outtype, **gguf_reference(model_dir, path)}
    os.makedirs(os.path.join(OUT, "families"), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="make-gguf-fixtures-") as tmp:
        for family, (pre, variant) in FAMILIES.items():
            model_dir = family_model_dir(family, variant, tmp)
            shutil.copy(os.path.join(model_dir, "config.json"),
                        os.path.join(OUT, "families", f"{family}-config.json"))
            for outtype in FAMILY_OUTTYPES:
                file = f"families/{family}-{outtype}.gguf"
                path = os.path.join(OUT, file)
                convert(llama_cpp, model_dir, outtype, path, pre=pre)
                reference[file] = {"model": f"families/{family}", "outtype": outtype,
                                   **gguf_reference(model_dir, path)}
    with open(os.path.join(OUT, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(reference, f, indent=1, ensure_ascii=False)
        f.write("\n")


TOKENIZER_CORPUS = [
    "The quick cat sees the river.",
    "  leading spaces, trailing spaces   ",
    "Café déjà vu, naïve façade — “quotes” and ‘apostrophes’.",
    "Decomposed: Cafe\u0301 and A\u030a (NFC composes them).",
    "日本語のテキスト、中文文本，한국어 텍스트.",
    "Emoji: 🤔🦙🚀 and ZWJ 👩‍💻, flags 🇫🇷.",
    "Numbers 1234567890 3.14159 1,000,000 and 2001-09-11.",
    "Tabs\tand\nnewlines\r\n\n\nmany   spaces",
    "I've been told he's there, 'RE you sure? We'Ve a'lL",
    "<s>special</s> tokens <unk> inline",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>after the end",
    "",
]


LORA_ADAPTERS = {"llama-tied__lora-qv": "llama-tied", "llama-untied__all-linear": "llama-untied",
                 "qwen2-tied__regex": "qwen2-tied", "mistral__layers": "mistral"}


def make_lora(llama_cpp):
    os.makedirs(os.path.join(OUT, "lora"), exist_ok=True)
    jobs = [(os.path.join("adapters", adapter), os.path.join("models", base), adapter)
            for adapter, base in LORA_ADAPTERS.items()]
    # Each family's all-linear adapter (Phi-3's on its fused qkv_proj / gate_up_proj).
    jobs += [(os.path.join("families", f, "adapters", "all-linear"), os.path.join("families", f, "model"),
              f"{f}__all-linear") for f in FAMILIES]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([llama_cpp, os.path.join(llama_cpp, "gguf-py")]))
    for adapter, base, out in jobs:
        subprocess.run([sys.executable, os.path.join(llama_cpp, "convert_lora_to_gguf.py"),
                        os.path.join(ROOT, "fixtures", adapter),
                        "--base", os.path.join(ROOT, "fixtures", base),
                        "--outfile", os.path.join(OUT, "lora", f"{out}.gguf")], check=True, env=env)


MERGED = {"llama-tied__lora-qv": ["f32", "q8_0"], "qwen2-tied__regex": ["f16"]}


def make_merged(llama_cpp):
    os.makedirs(os.path.join(OUT, "merged"), exist_ok=True)
    for merged, outtypes in MERGED.items():
        for outtype in outtypes:
            convert(llama_cpp, merged, outtype, os.path.join(OUT, "merged", f"{merged}-{outtype}.gguf"),
                    folder="merged")


# SentencePiece tokenizer fixtures: name -> (tokenizer class, config of the converted model).
SPM_STYLES = {"spm": ("LlamaTokenizer", "models/llama-tied"),
              "spm-gemma": ("GemmaTokenizer", "families/gemma2/model")}
SPM_SPECIAL = ["<|im_start|>", "<|im_end|>"]


def spm_dir(name):
    return os.path.join(OUT, f"{name}-tokenizer")


def make_spm(llama_cpp):
    """A SentencePiece tokenizer (BPE, byte fallback) trained on the fixture texts; per style
    (Llama: a space prefix; Gemma: none) its HF tokenizer as transformers converts
    tokenizer.model, and the converter's GGUF of it (--vocab-only)."""
    import io
    import shutil
    import tempfile

    import sentencepiece as spm
    from transformers import AutoTokenizer

    texts = []
    for name in ("train", "eval", "long"):
        with open(os.path.join(ROOT, "fixtures", "data", f"{name}.jsonl"), encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f if line.strip()]
    texts += TOKENIZER_CORPUS
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=600,
        byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2,
        num_threads=1)
    for name, (tokenizer_class, config_from) in SPM_STYLES.items():
        with tempfile.TemporaryDirectory(prefix="make-gguf-spm-") as parent:
            tmp = os.path.join(parent, name)  # the converter names the model after its folder
            os.makedirs(tmp)
            with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
                f.write(model.getvalue())
            with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
                json.dump({"tokenizer_class": tokenizer_class, "bos_token": "<s>", "eos_token": "</s>",
                           "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
                           "legacy": False, "additional_special_tokens": SPM_SPECIAL}, f)
            tok = AutoTokenizer.from_pretrained(tmp)
            tok.save_pretrained(tmp)
            with open(os.path.join(ROOT, "fixtures", config_from, "config.json")) as f:
                config = json.load(f)
            config["vocab_size"] = len(tok)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config, f)
            # The converter's SentencePiece path finds added tokens in added_tokens.json or
            # tokenizer_config.json's added_tokens_decoder, which transformers 5 no longer writes.
            with open(os.path.join(tmp, "added_tokens.json"), "w") as f:
                pieces = spm.SentencePieceProcessor(model_proto=model.getvalue()).vocab_size()
                json.dump({t: i for t, i in tok.get_added_vocab().items() if i >= pieces}, f)
            subprocess.run([sys.executable, "-c", CONVERT, llama_cpp, "default", tmp, "--vocab-only",
                            "--outfile", os.path.join(OUT, f"{name}-vocab.gguf")], check=True)
            shutil.rmtree(spm_dir(name), ignore_errors=True)
            os.makedirs(spm_dir(name))
            for file in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(os.path.join(tmp, file), spm_dir(name))


def make_tokenizer_reference():
    from transformers import AutoTokenizer

    out = {"corpus": TOKENIZER_CORPUS}
    for model_name in [*MODELS, *SPM_STYLES]:
        folder = spm_dir(model_name) if model_name in SPM_STYLES else os.path.join(ROOT, "fixtures", "models", model_name)
        tok = AutoTokenizer.from_pretrained(folder)
        out[model_name] = {
            "with_special": [tok(t)["input_ids"] for t in TOKENIZER_CORPUS],
            "without_special": [tok(t, add_special_tokens=False)["input_ids"] for t in TOKENIZER_CORPUS],
        }
    with open(os.path.join(OUT, "tokenizer_reference.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False)
        f.write("\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-cpp", default="/tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp",
                        help="llama.cpp source folder holding convert_hf_to_gguf.py and gguf-py")
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    make_quants(np.random.default_rng(27))
    make_models(args.llama_cpp)
    make_lora(args.llama_cpp)
    make_merged(args.llama_cpp)
    make_spm(args.llama_cpp)
    make_tokenizer_reference()
    with open(os.path.join(OUT, "README.md"), "w", encoding="utf-8") as f:
        f.write("# GGUF fixtures\n\nGenerated by `python3 scripts/make_gguf_fixtures.py`; do not edit by hand.\n\n```\n")
        f.write(__doc__.strip() + "\n```\n")


if __name__ == "__main__":
    main()
