#!/usr/bin/env python3
"""Generate the small reference fixtures under fixtures/ that lowrank's Rust tests
compare against (tokenizers, tiny random models, PEFT adapters, reference
log-probabilities, merged checkpoints, greedy generations, chat templates and
a short SGD training run).

Usage (from anywhere; needs no network):

    python3 scripts/make_fixtures.py

Everything under fixtures/ is deleted and regenerated. The output is
deterministic for the pinned versions below (fixed seeds, single-threaded
torch on CPU).

pinned versions (the fixtures in git were generated with exactly these):
    python        3.11.7
    torch         2.15.0 (+cu132 wheel, run on CPU)
    transformers  5.24.0
    peft          0.21.2
    tokenizers    0.23.3
    safetensors   0.8.0
    numpy         2.4.6
    accelerate    1.15.0 (pulled in by the install; not used directly)

Notes on transformers 5.x that matter for consumers of these files:
  * `save_pretrained` writes rope settings as `rope_parameters` (with
    `rope_theta` inside) and the dtype as `dtype`. Hub checkpoints written by
    transformers 4.x use top-level `rope_theta`, `rope_scaling` and
    `torch_dtype` instead. To cover both, some model configs are rewritten to
    the 4.x ("legacy") layout after saving (see legacy_config() below); the
    script checks that transformers still loads them to the same rope config.
  * tokenizer_config.json is written by transformers 5 with
    tokenizer_class "TokenizersBackend" and the chat template in a separate
    chat_template.jinja. We rewrite tokenizer_class to "PreTrainedTokenizerFast"
    (what 4.x hub repos contain; 5.x loads it fine). The llama-style tokenizer
    keeps its chat_template inside tokenizer_config.json (4.x layout); the
    qwen-style one uses chat_template.jinja (5.x layout), so both are covered.
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
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TQDM_DISABLE"] = "1"

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from peft import LoraConfig, PeftModel, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_eval_common import corpus_loss, encode, read_jsonl_texts, sequence_logprobs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Work with repo-relative paths so that paths recorded by transformers/PEFT
# (e.g. adapter_config.json's base_model_name_or_path) do not leak this
# machine's absolute paths and the output is identical wherever it is run.
os.chdir(REPO)
FIX = Path("fixtures")

torch.set_num_threads(1)  # deterministic reductions, and polite on a 2-core box
torch.use_deterministic_algorithms(True)

VOCAB_SIZE = 384
INIT_STD = 0.3  # much larger than the default 0.02, so logits are far from uniform
NORM_STD = 0.1  # norm weights = 1 + N(0, NORM_STD)
LORA_B_STD = 0.3
DORA_MAG_STD = 0.1
SHARD_SIZE = "20KB"  # forces the bf16 llama-untied checkpoint into several shards


def seed_all(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def write_json(path, obj):
    """Pretty JSON, but with lists of numbers (token ids, losses) on one line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    text = re.sub(
        r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]",
        lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
        text,
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------
# 1. Tokenizers
# ---------------------------------------------------------------------------

WORDS = {
    "det": ["the", "a", "this", "that", "every", "some", "my", "our"],
    "adj": ["small", "quick", "bright", "quiet", "old", "new", "green", "warm", "cold", "happy",
            "tiny", "large", "red", "blue", "gentle", "strange"],
    "noun": ["cat", "dog", "river", "model", "garden", "city", "teacher", "window", "book", "tree",
             "train", "house", "song", "cloud", "road", "friend", "market", "village", "computer", "letter"],
    "verb": ["sees", "finds", "likes", "reads", "builds", "opens", "follows", "paints", "carries", "writes",
             "visits", "remembers", "learns", "watches"],
    "prep": ["near", "under", "behind", "with", "across", "inside", "over", "beside"],
    "adv": ["slowly", "quickly", "often", "never", "always", "today", "again", "soon"],
}


def make_corpus(seed=1234, n=4000):
    """Procedurally generated English-ish sentences (plus a little punctuation,
    digits and non-ASCII) to train the tiny BPE on. Deterministic."""
    rng = random.Random(seed)
    extras = ["café", "naïve", "über", "résumé", "déjà vu", "piñata"]
    lines = []
    for i in range(n):
        w = {k: rng.choice(v) for k, v in WORDS.items()}
        form = rng.randrange(5)
        if form == 0:
            s = f"{w['det'].capitalize()} {w['adj']} {w['noun']} {w['verb']} {w['prep']} the {rng.choice(WORDS['noun'])}."
        elif form == 1:
            s = f"{w['det'].capitalize()} {w['noun']} {w['adv']} {w['verb']} a {w['adj']} {rng.choice(WORDS['noun'])}!"
        elif form == 2:
            s = f"Why does {w['det']} {w['noun']} {w['verb'][:-1]} the {w['adj']} {rng.choice(WORDS['noun'])}?"
        elif form == 3:
            s = f"In {1900 + rng.randrange(125)}, {rng.randrange(2, 99)} {w['noun']}s {w['verb'][:-1]} {w['adv']}."
        else:
            s = f"The {w['noun']} at the {rng.choice(extras)} is {w['adj']}, {w['adv']} {w['adj']}."
        lines.append(s)
    return lines


LLAMA_CHAT_TEMPLATE = (
    # Zephyr-like template with a leading BOS (Llama family convention).
    "{{- bos_token -}}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_message = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- if system_message -%}"
    "{{ '<|system|>\\n' + system_message + eos_token + '\\n' }}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '<|user|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- else -%}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|assistant|>\\n' }}"
    "{%- endif -%}"
)

QWEN_CHAT_TEMPLATE = (
    # ChatML as used by Qwen2; `.strip()` is a Python str method, so a Jinja
    # engine needs Python compatibility (minijinja's pycompat) to render it.
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'].strip() + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- endif -%}"
)

# Qwen2's pre-tokenizer split pattern.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_llama_tokenizer(corpus):
    """Byte-level BPE with <unk>=0, <s>=1, </s>=2 (Llama ids) and a post-processor
    that prepends <s>, so tokenizer(text) adds BOS (Llama 3 layout:
    Sequence[ByteLevel, TemplateProcessing])."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single="<s> $A",
            pair="<s> $A <s> $B",
            special_tokens=[("<s>", bos_id)],
        ),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=LLAMA_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def build_qwen_tokenizer(corpus):
    """Qwen2-like: NFC normalizer, Split+ByteLevel pre-tokenizer, no BOS. The
    special tokens are *added* tokens placed after the BPE vocab (as in Qwen)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(specials),
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # adds no tokens
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=QWEN_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tok, out_dir, embed_chat_template):
    out_dir = Path(out_dir)
    # save_jinja_files=False keeps chat_template inside tokenizer_config.json
    # (transformers 4.x layout); True writes chat_template.jinja (5.x layout).
    tok.save_pretrained(out_dir, save_jinja_files=not embed_chat_template)
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = read_json(cfg_path)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    write_json(cfg_path, cfg)


TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"]


def copy_tokenizer(tok_dir, out_dir):
    for name in TOKENIZER_FILES:
        src = Path(tok_dir) / name
        if src.exists():
            shutil.copy(src, Path(out_dir) / name)


def make_tokenizers():
    corpus = make_corpus()
    llama = build_llama_tokenizer(corpus)
    qwen = build_qwen_tokenizer(corpus)
    assert len(llama) == VOCAB_SIZE, len(llama)
    assert len(qwen) == VOCAB_SIZE, len(qwen)
    save_tokenizer(llama, FIX / "tokenizers/llama-style", embed_chat_template=True)
    save_tokenizer(qwen, FIX / "tokenizers/qwen-style", embed_chat_template=False)
    # Round trip through AutoTokenizer so everything downstream uses exactly
    # what a consumer of the saved files gets.
    toks = {
        "llama-style": AutoTokenizer.from_pretrained(FIX / "tokenizers/llama-style"),
        "qwen-style": AutoTokenizer.from_pretrained(FIX / "tokenizers/qwen-style"),
    }
    assert toks["llama-style"]("hello")["input_ids"][0] == toks["llama-style"].bos_token_id
    assert toks["qwen-style"]("hello")["input_ids"] == toks["qwen-style"]("hello", add_special_tokens=False)["input_ids"]
    return toks


# ---------------------------------------------------------------------------
# 2. Data
# ---------------------------------------------------------------------------

EVAL_TEXTS = [
    "The quick cat sees the river.",
    "Why does every computer follow the cloud? 🤔",
    "Our teacher reads a green book at the café.",
    "In 1987, 42 friends visited the old market with a dog.",
    "My garden is quiet today; a gentle song carries over the house… déjà vu!",
]

TRAIN_TEXTS = [
    "The small dog finds the red ball under the tree.",
    "A bright window opens slowly over the quiet city.",
    "Some friends always write letters to the old teacher.",
    "This river follows the road across the green village.",
    "Why does my cat watch the warm cloud every day?",
    "In 2001, 12 trains carried books to the new market near the café.",
]


def make_data(toks):
    write_jsonl(FIX / "data/eval.jsonl", EVAL_TEXTS)
    write_jsonl(FIX / "data/train.jsonl", TRAIN_TEXTS)
    for name, tok in toks.items():
        lens = [len(encode(tok, t)) for t in EVAL_TEXTS]
        print(f"  eval token lengths ({name}): {lens}")
        assert all(8 < n <= 40 for n in lens), lens


def write_jsonl(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------
# 3. Tiny models
# ---------------------------------------------------------------------------

# filled by make_models(): name -> {style, dtype, legacy, shard}
MODELS = {}


@torch.no_grad()
def reinit_(model):
    """Re-initialise with a large std so the logits are far from uniform.
    Norm weights get 1 + N(0, 0.1) (so they are not all ones), biases N(0, 0.3)
    (so Qwen2's q/k/v biases are non-zero)."""
    for name, p in model.named_parameters():  # tied params appear only once
        if "norm" in name:
            p.copy_(1.0 + NORM_STD * torch.randn_like(p))
        else:
            p.normal_(0.0, INIT_STD)


def legacy_config(cfg):
    """Rewrite a transformers-5 config dict into the transformers-4.x layout
    (top-level rope_theta, rope_scaling, torch_dtype) that most hub
    checkpoints use."""
    cfg = dict(cfg)
    rp = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["rope_scaling"] = None if rp.get("rope_type", "default") == "default" else rp
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    return dict(sorted(cfg.items()))


def save_model(model, out_dir, dtype, tok_dir, legacy, shard):
    out_dir = Path(out_dir)
    model = model.to(dtype)
    model.config.dtype = dtype
    kwargs = {"max_shard_size": SHARD_SIZE} if shard else {}
    model.save_pretrained(out_dir, **kwargs)
    if legacy:
        write_json(out_dir / "config.json", legacy_config(read_json(out_dir / "config.json")))
    copy_tokenizer(tok_dir, out_dir)


def make_models(toks):
    llama_tok = toks["llama-style"]
    qwen_tok = toks["qwen-style"]
    common = dict(num_hidden_layers=2, vocab_size=VOCAB_SIZE, max_position_embeddings=256)
    llama_ids = dict(bos_token_id=llama_tok.bos_token_id, eos_token_id=llama_tok.eos_token_id, pad_token_id=None)
    qwen_ids = dict(
        bos_token_id=qwen_tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=qwen_tok.eos_token_id,
        pad_token_id=None,
    )

    specs = [
        # name, class, config, stored dtype, tokenizer style, legacy config layout, sharded
        ("llama-tied", LlamaForCausalLM, LlamaConfig(
            hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6, **common, **llama_ids),
         torch.float32, "llama-style", False, False),
        ("llama-untied", LlamaForCausalLM, LlamaConfig(
            hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
            tie_word_embeddings=False, rope_theta=500000.0, rms_norm_eps=1e-5,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
            **common, **llama_ids),
         torch.bfloat16, "llama-style", True, True),
        ("qwen2-tied", Qwen2ForCausalLM, Qwen2Config(
            hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6, use_sliding_window=False,
            **common, **qwen_ids),
         torch.float32, "qwen-style", False, False),
        ("mistral", MistralForCausalLM, MistralConfig(
            hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=False, sliding_window=None, rope_theta=10000.0, rms_norm_eps=1e-5,
            **common, **llama_ids),
         torch.float16, "llama-style", True, False),
    ]
    for seed, (name, cls, config, dtype, style, legacy, shard) in enumerate(specs, start=100):
        seed_all(seed)
        model = cls(config)
        reinit_(model)
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, do_sample=False)
        out_dir = FIX / "models" / name
        save_model(model, out_dir, dtype, FIX / "tokenizers" / style, legacy, shard)
        MODELS[name] = dict(style=style, dtype=dtype, legacy=legacy, shard=shard)
        # Sanity: transformers reloads the (possibly rewritten) config to the
        # same rope settings and the stored weights equal the in-memory ones.
        reloaded = load_base(name)
        assert reloaded.config.rope_parameters == config.rope_parameters, (
            name, reloaded.config.rope_parameters, config.rope_parameters)
        ref = model.to(dtype).float().state_dict()
        for k, v in reloaded.state_dict().items():
            assert torch.equal(v, ref[k]), (name, k)


def load_base(name):
    model = AutoModelForCausalLM.from_pretrained(FIX / "models" / name, dtype=torch.float32)
    model.eval()
    return model


# ---------------------------------------------------------------------------
# 4. PEFT adapters
# ---------------------------------------------------------------------------

ADAPTERS = {
    "llama-tied__lora-qv": ("llama-tied", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-untied__all-linear": ("llama-untied", dict(
        r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True,
        rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 3})),
    "llama-tied__dora": ("llama-tied", dict(
        r=4, lora_alpha=8, use_dora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])),
    "qwen2-tied__regex": ("qwen2-tied", dict(
        r=2, lora_alpha=4, target_modules=r".*\.layers\.1\.self_attn\.(q|k|v)_proj")),
    "mistral__layers": ("mistral", dict(
        r=4, lora_alpha=4, target_modules=["q_proj", "o_proj", "down_proj"], layers_to_transform=[1])),
}


@torch.no_grad()
def randomize_adapter_(peft_model):
    """PEFT initialises lora_B to zero (adapter = no-op). Make it non-zero so the
    adapter visibly changes the outputs; perturb the DoRA magnitude (which PEFT
    initialises to the column norms of W) by x(1 + N(0, 0.1))."""
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.normal_(0.0, LORA_B_STD)
        elif "lora_magnitude_vector" in name:
            p.mul_(1.0 + DORA_MAG_STD * torch.randn_like(p))


def make_adapters():
    for seed, (adapter, (base_name, kwargs)) in enumerate(ADAPTERS.items(), start=200):
        seed_all(seed)
        base = load_base(base_name)  # f32 values of the *stored* (possibly bf16/f16) weights
        cfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", **kwargs)
        peft_model = get_peft_model(base, cfg)
        randomize_adapter_(peft_model)
        peft_model.save_pretrained(FIX / "adapters" / adapter)
        tidy_adapter_dir(FIX / "adapters" / adapter)


def tidy_adapter_dir(out_dir):
    """PEFT writes a boilerplate model card README.md (5 KB) next to every
    adapter; it carries no information the tests need, so drop it. PEFT also
    stores a list-valued target_modules from a Python set, so its order depends
    on PYTHONHASHSEED; sort it so reruns are byte-identical (PEFT treats the
    list as a set, so this does not change semantics)."""
    out_dir = Path(out_dir)
    card = out_dir / "README.md"
    if card.exists():
        card.unlink()
    cfg_path = out_dir / "adapter_config.json"
    cfg = read_json(cfg_path)
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    write_json(cfg_path, cfg)


def load_with_adapter(adapter, **kwargs):
    base_name = ADAPTERS[adapter][0]
    model = PeftModel.from_pretrained(load_base(base_name), FIX / "adapters" / adapter, **kwargs)
    model.eval()
    return model


# ---------------------------------------------------------------------------
# 5. Reference log-probabilities
# ---------------------------------------------------------------------------

def write_reference(model, tok, out_stem):
    Path(out_stem).parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, text in enumerate(EVAL_TEXTS):
        ids = encode(tok, text)
        tensors[f"input_ids.{i}"] = torch.tensor(ids, dtype=torch.int64)
        tensors[f"logprobs.{i}"] = sequence_logprobs(model, ids).contiguous()
    save_file(tensors, f"{out_stem}.safetensors")
    stats = corpus_loss(model, tok, EVAL_TEXTS)
    stats["max_len_8"] = corpus_loss(model, tok, EVAL_TEXTS, max_len=8)
    write_json(f"{out_stem}.json", stats)
    return tensors, stats


def make_references(toks):
    diffs = {}
    losses = {}
    base_tensors = {}
    for name, info in MODELS.items():
        t, s = write_reference(load_base(name), toks[info["style"]], FIX / "reference" / name)
        base_tensors[name] = t
        losses[name] = s["loss"]
    for adapter, (base_name, _) in ADAPTERS.items():
        tok = toks[MODELS[base_name]["style"]]
        t, s = write_reference(load_with_adapter(adapter), tok, FIX / "reference" / adapter)
        losses[adapter] = s["loss"]
        diffs[adapter] = max(
            (t[k] - base_tensors[base_name][k]).abs().max().item() for k in t if k.startswith("logprobs."))
        assert diffs[adapter] > 0.05, (adapter, diffs[adapter])
    return diffs, losses


# ---------------------------------------------------------------------------
# 6. Merged checkpoints
# ---------------------------------------------------------------------------

def make_merged(toks):
    merged_losses = {}
    for adapter, (base_name, _) in ADAPTERS.items():
        info = MODELS[base_name]
        merged = load_with_adapter(adapter).merge_and_unload()
        out_dir = FIX / "merged" / adapter
        # saved in the BASE's dtype (bf16 stays bf16), same config layout/sharding
        save_model(merged, out_dir, info["dtype"], FIX / "tokenizers" / info["style"], info["legacy"], info["shard"])
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
        merged_losses[adapter] = corpus_loss(reloaded, toks[info["style"]], EVAL_TEXTS)["loss"]
    return merged_losses


# ---------------------------------------------------------------------------
# 7. Greedy generation
# ---------------------------------------------------------------------------

GEN_CASES = [
    ("llama-tied", None),
    ("llama-tied", "llama-tied__lora-qv"),
    ("llama-tied", "llama-tied__dora"),
    ("qwen2-tied", None),
]
GEN_PROMPTS = ["The quick cat", "Why does my garden"]


@torch.no_grad()
def make_generate(toks):
    out = []
    for base_name, adapter in GEN_CASES:
        model = load_with_adapter(adapter) if adapter else load_base(base_name)
        tok = toks[MODELS[base_name]["style"]]
        eos = model.generation_config.eos_token_id
        for prompt in GEN_PROMPTS:
            ids = torch.tensor([tok(prompt)["input_ids"]], dtype=torch.long)
            gen = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=12, pad_token_id=eos)
            new = gen[0, ids.shape[1]:].tolist()
            stopped = len(new) > 0 and new[-1] == eos
            if stopped:
                new = new[:-1]
            out.append({
                "model": base_name,
                "adapter": adapter,
                "prompt": prompt,
                "prompt_ids": ids[0].tolist(),
                "max_new_tokens": 12,
                "token_ids": new,
                "stopped_at_eos": stopped,
                "text": tok.decode(new, skip_special_tokens=False),
            })
    write_json(FIX / "reference/generate.json", out)
    return out


# ---------------------------------------------------------------------------
# 8. Chat templates
# ---------------------------------------------------------------------------

CHAT_CASES = [
    dict(messages=[
        {"role": "system", "content": "You are a tiny model."},
        {"role": "user", "content": "  What does the cat see?  "},
    ], add_generation_prompt=True),
    dict(messages=[
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": " The river is warm today. "},
        {"role": "user", "content": "Why, café? 🤔"},
    ], add_generation_prompt=True),
    dict(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a tree."},
        {"role": "assistant", "content": "The green tree."},
    ], add_generation_prompt=False),
    dict(messages=[
        {"role": "user", "content": "Only a user turn."},
    ], add_generation_prompt=False),
    # error case: the llama template calls raise_exception for unknown roles
    dict(messages=[
        {"role": "tool", "content": "42"},
    ], add_generation_prompt=False),
]


def make_chat(toks):
    out = []
    for style, model in [("llama-style", "llama-tied"), ("qwen-style", "qwen2-tied")]:
        tok = toks[style]
        for case in CHAT_CASES:
            entry = {"model": model, "tokenizer": style, **case}
            try:
                text = tok.apply_chat_template(
                    case["messages"], tokenize=False, add_generation_prompt=case["add_generation_prompt"])
                enc = tok.apply_chat_template(
                    case["messages"], tokenize=True, add_generation_prompt=case["add_generation_prompt"])
                ids = enc["input_ids"] if hasattr(enc, "keys") else enc
                # apply_chat_template tokenizes without adding special tokens
                # (the template itself emits BOS where wanted)
                assert ids == tok(text, add_special_tokens=False)["input_ids"]
                entry.update(text=text, input_ids=ids, error=None)
            except Exception as e:  # noqa: BLE001 - recorded as the expected outcome
                entry.update(text=None, input_ids=None, error=str(e))
            out.append(entry)
    assert sum(e["error"] is not None for e in out) == 1, "expected exactly the llama tool-role case to fail"
    write_json(FIX / "reference/chat.json", out)


# ---------------------------------------------------------------------------
# 9. Training parity
# ---------------------------------------------------------------------------

TRAIN_LR = 0.05


def make_train(toks):
    result = {}
    for adapter in ["llama-tied__lora-qv", "llama-tied__dora"]:
        seed_all(300)
        base_name = ADAPTERS[adapter][0]
        tok = toks[MODELS[base_name]["style"]]
        model = PeftModel.from_pretrained(load_base(base_name), FIX / "adapters" / adapter, is_trainable=True)
        model.train()  # dropout is 0 everywhere, so train/eval mode give the same numbers
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=TRAIN_LR, momentum=0.0, weight_decay=0.0)
        losses = []
        for text in read_jsonl_texts(FIX / "data/train.jsonl"):
            ids = torch.tensor([tok(text)["input_ids"]], dtype=torch.long)
            logits = model(input_ids=ids).logits[0].float()
            # mean CE over predicted positions: token t predicted from positions < t
            loss = F.cross_entropy(logits[:-1], ids[0, 1:])
            losses.append(loss.item())  # recorded BEFORE this step's update
            opt.zero_grad()
            loss.backward()
            opt.step()
        suffix = adapter.split("__", 1)[1]
        out_dir = FIX / "train" / suffix
        model.save_pretrained(out_dir)
        tidy_adapter_dir(out_dir)
        shutil.copy(out_dir / "adapter_model.safetensors", out_dir / "final_adapter.safetensors")
        write_json(out_dir / "steps.json", {
            "adapter": adapter,
            "base_model": base_name,
            "lr": TRAIN_LR,
            "batch_size": 1,
            "steps": len(losses),
            "trainable_tensors": len(params),
            "losses": losses,
        })
        result[adapter] = losses
    return result


# ---------------------------------------------------------------------------
# README + summary
# ---------------------------------------------------------------------------

README = """# lowrank test fixtures

Generated by `python3 scripts/make_fixtures.py` (deterministic, offline; see the
pinned versions at the top of that script). Do not edit by hand: rerun the script.

- `tokenizers/{llama-style,qwen-style}/` tiny byte-level BPE (vocab 384) as HF files.
  llama-style: `<unk>`=0 `<s>`=1 `</s>`=2, BOS added by the post-processor, chat
  template inside tokenizer_config.json (transformers 4.x layout). qwen-style:
  no BOS, `<|endoftext|>` `<|im_start|>` `<|im_end|>` (eos) are added tokens 381-383,
  ChatML template (uses `.strip()`) in `chat_template.jinja` (transformers 5 layout).
- `data/eval.jsonl` (5 lines), `data/train.jsonl` (6 lines): `{"text": ...}`.
- `models/<name>/`: random tiny models (2 layers) + tokenizer files.
  `llama-tied` f32 tied (config in transformers-5 layout: `rope_parameters`, `dtype`);
  `llama-untied` bf16, sharded (index.json), head_dim 16, llama3 rope scaling
  (config in 4.x layout: `rope_theta`, `rope_scaling`, `torch_dtype`);
  `qwen2-tied` f32 tied, q/k/v biases (5.x layout); `mistral` f16 untied (4.x layout).
- `adapters/<model>__<suffix>/`: PEFT LoRA adapters (adapter_config.json +
  adapter_model.safetensors, f32) with random non-zero lora_B (and perturbed DoRA
  magnitudes). PEFT's model-card README.md is dropped and list-valued
  `target_modules` are sorted (PEFT writes them in set order). Note `all-linear` is
  saved expanded to full module paths (`model.layers.0.mlp.down_proj`, ...).
- `reference/<model>[__<suffix>].safetensors`: per eval line i, `input_ids.<i>`
  (i64 [T], `tokenizer(text)` incl. special tokens) and `logprobs.<i>` (f32 [T, V],
  log_softmax of the logits, f32 compute). `.json` next to it: loss / perplexity /
  tokens (sum of NLL for t>=1 over all lines / number of predicted tokens), and the
  same under `max_len_8` with every sequence truncated to its first 8 tokens.
- `reference/generate.json`: greedy generations (12 new tokens, eos stripped,
  `stopped_at_eos`). `reference/chat.json`: apply_chat_template text + ids per case
  (`error` set for the case the template rejects via raise_exception).
- `merged/<model>__<suffix>/`: `merge_and_unload()` saved in the base's dtype/layout.
- `train/{lora-qv,dora}/`: 6 SGD steps (lr 0.05, batch 1, train.jsonl in order):
  `steps.json` (loss before each update), trained adapter (`adapter_model.safetensors`,
  identical copy `final_adapter.safetensors`, `adapter_config.json`).
"""


def dir_size(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def main():
    if FIX.exists():
        shutil.rmtree(FIX)
    FIX.mkdir()
    print("1. tokenizers")
    toks = make_tokenizers()
    print("2. data")
    make_data(toks)
    print("3. models")
    make_models(toks)
    print("4. adapters")
    make_adapters()
    print("5. reference logprobs")
    diffs, losses = make_references(toks)
    print("6. merged")
    merged_losses = make_merged(toks)
    print("7. generate")
    gens = make_generate(toks)
    print("8. chat")
    make_chat(toks)
    print("9. train")
    train_losses = make_train(toks)
    (FIX / "README.md").write_text(README, encoding="utf-8")
    print("10. model families (scripts/make_family_fixtures.py)")
    import make_family_fixtures

    make_family_fixtures.main()

    print("\n== summary ==")
    for sub in sorted(p for p in FIX.iterdir() if p.is_dir()):
        print(f"  {sub}: {dir_size(sub) / 1024:.1f} KiB")
    print(f"  total: {dir_size(FIX) / 1024:.1f} KiB")
    print("  eval loss per model/adapter (merged checkpoint loss in brackets):")
    for k, v in losses.items():
        extra = f"  [merged {merged_losses[k]:.6f}]" if k in merged_losses else ""
        print(f"    {k:28s} {v:.6f}{extra}")
    print("  max |logprob(adapter) - logprob(base)|:")
    for k, v in diffs.items():
        print(f"    {k:28s} {v:.4f}")
    print("  generations:")
    for g in gens:
        print(f"    {g['model']:11s} {str(g['adapter']):22s} {g['prompt']!r} -> {g['text']!r} eos={g['stopped_at_eos']}")
    print("  training losses:")
    for k, v in train_losses.items():
        print(f"    {k:22s} " + " ".join(f"{x:.4f}" for x in v))


if __name__ == "__main__":
    main()
