#!/usr/bin/env python3
"""Generate fixtures/families/: one tiny random model per newer model family (Qwen3, ...)
with PEFT adapters and the references lowrank's Rust tests compare against —
log-probabilities, greedy tokens, SGD training losses over an f32 and an NF4 base, chat
template renderings.

Usage (from anywhere; CPU only, no network; needs fixtures/tokenizers and fixtures/data
from scripts/make_fixtures.py, which runs this script at its end):

    python3 scripts/make_family_fixtures.py

fixtures/families/ is deleted and regenerated; the pinned versions and determinism notes of
scripts/make_fixtures.py and scripts/make_quant_fixtures.py apply.

Per family F, under fixtures/families/F/:
  model/                 the tiny model (f32, 2 layers, vocab 384) + tokenizer files; the
                         shapes are scaled down but keep what changes the math (see FAMILIES)
  adapters/<name>/       PEFT adapters: `all-linear` (LoRA on every linear), `dora` (DoRA on
                         every linear), `pattern` (rank_pattern, alpha_pattern and
                         layers_to_transform over the family's own module names)
  reference.safetensors  per case (`base` or an adapter name) and eval line i of the first
                         EVAL_LINES lines: `<case>.logprobs.<i>` (f32 [T, V]) and
                         `input_ids.<i>` (i64 [T])
  reference.json         eval losses (f32 base and adapters; over an NF4 + double-quant
                         base), greedy generations, per-step SGD losses (f32 and NF4 bases),
                         chat template renderings (or the template's error)
"""

import json
import os
import shutil
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402
from lm_eval_common import corpus_loss, encode, read_jsonl_texts, sequence_logprobs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
os.chdir(REPO)
OUT = Path("fixtures/families")
TEMPLATES = Path("scripts/chat_templates")

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

# The first eval lines only: full [T, V] log-probabilities are the bulk of the fixtures.
EVAL_LINES = 2
TRAIN_LR = 0.05
GEN_PROMPTS = ["The quick cat", "Why does my garden"]
GEN_TOKENS = 12


def qwen3_config(tok):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=mf.VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
        head_dim=16,  # != hidden / heads, as in the real Qwen3 models
        tie_word_embeddings=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        # The eval lines are longer than the window: layer 1 attends to 4 positions only.
        use_sliding_window=True, sliding_window=4, max_window_layers=1,
        max_position_embeddings=256,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id,
        pad_token_id=None,
    )


def phi3_config(tok):
    from transformers import Phi3Config

    return Phi3Config(
        vocab_size=mf.VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1,  # head_dim 16
        tie_word_embeddings=True,  # as Phi-4-mini
        rms_norm_eps=1e-5, sliding_window=6,
        # LongRoPE over 12 of the 16 head dimensions (Phi-4-mini's 0.75): eval line 0 (9
        # tokens) stays within original_max_position_embeddings and takes the short factors,
        # line 1 (18) the long ones; greedy generation crosses over mid-way.
        max_position_embeddings=64, original_max_position_embeddings=12,
        rope_parameters=dict(
            rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
            short_factor=[1.0, 1.1, 1.3, 1.7, 2.2, 3.0], long_factor=[1.0, 1.5, 2.5, 4.0, 6.0, 9.0],
            original_max_position_embeddings=12),
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id,
        pad_token_id=None,
    )


def gemma2_config(tok):
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=mf.VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,  # != hidden / heads
        query_pre_attn_scalar=24,  # != head_dim
        # Small caps, so that the random model's scores and logits reach into the tanh's bend.
        attn_logit_softcapping=4.0, final_logit_softcapping=8.0,
        # Layer 0 slides over 4 positions, layer 1 attends to everything.
        sliding_window=4, tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None,
    )


def gemma3_config(tok):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=mf.VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        # Layers 0 and 1 slide over 4 positions with their own RoPE base, layer 2 is global
        # with linear RoPE scaling (as gemma-3-4b and larger).
        sliding_window=4, sliding_window_pattern=3,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        tie_word_embeddings=True, rms_norm_eps=1e-6, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None,
    )


# name -> (config builder, tokenizer style, chat template file, pattern adapter's options)
FAMILIES = {
    "qwen3": dict(
        config=qwen3_config,
        style="qwen-style",
        template="qwen3.jinja",
        pattern=dict(
            target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
            rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
            alpha_pattern={"o_proj": 3},
        ),
    ),
    "phi3": dict(
        config=phi3_config,
        style="qwen-style",
        template="phi4-mini.jinja",
        # At 0.05 the per-step gradients agree to 5e-6 (relative) yet the losses drift apart
        # by 5e-4 within six steps.
        train_lr=0.01,
        pattern=dict(
            target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
            rank_pattern={"qkv_proj": 2, "model.layers.1.mlp.down_proj": 6},
            alpha_pattern={"gate_up_proj": 3},
        ),
    ),
    "gemma2": dict(
        config=gemma2_config,
        style="llama-style",
        template="gemma2.jinja",
        pattern=dict(
            target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
            rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
            alpha_pattern={"o_proj": 3},
        ),
    ),
    "gemma3": dict(
        config=gemma3_config,
        style="llama-style",
        template="gemma3.jinja",
        # As phi3: one step's losses agree to 2e-6, six steps at 0.05 drift to 2e-4.
        train_lr=0.01,
        pattern=dict(
            target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
            rank_pattern={"k_proj": 2, "model.layers.1.mlp.down_proj": 6},
            alpha_pattern={"o_proj": 3},
        ),
    ),
}

CHAT_CASES = [
    dict(messages=[
        {"role": "system", "content": "You are a tiny model."},
        {"role": "user", "content": "What does the cat see?"},
    ], add_generation_prompt=True),
    dict(messages=[
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": "The river is warm today."},
        {"role": "user", "content": "Why, café?"},
    ], add_generation_prompt=True),
    dict(messages=[
        {"role": "user", "content": "Name a tree."},
        {"role": "assistant", "content": "<think>\nA short one.\n</think>\n\nThe green tree."},
    ], add_generation_prompt=False),
]


def adapter_configs(family):
    return {
        "all-linear": dict(r=4, lora_alpha=8, target_modules="all-linear"),
        "dora": dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True),
        "pattern": dict(r=4, lora_alpha=4, layers_to_transform=[1], **FAMILIES[family]["pattern"]),
    }


def model_dir(family):
    return OUT / family / "model"


def load_base(family):
    return AutoModelForCausalLM.from_pretrained(model_dir(family), dtype=torch.float32).eval()


def with_adapter(model, family, adapter, **kwargs):
    return PeftModel.from_pretrained(model, OUT / family / "adapters" / adapter, **kwargs)


def make_model(family, seed):
    spec = FAMILIES[family]
    tok_dir = Path("fixtures/tokenizers") / spec["style"]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = spec["config"](tok)
    mf.seed_all(seed)
    model = AutoModelForCausalLM.from_config(config)
    mf.reinit_(model)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, do_sample=False)
    out = model_dir(family)
    mf.save_model(model, out, torch.float32, tok_dir, legacy=False, shard=False)
    (out / "chat_template.jinja").write_text((TEMPLATES / spec["template"]).read_text())
    return AutoTokenizer.from_pretrained(out)


def make_adapters(family, seed):
    for offset, (name, kwargs) in enumerate(adapter_configs(family).items()):
        mf.seed_all(seed + offset)
        cfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", **kwargs)
        peft_model = get_peft_model(load_base(family), cfg)
        mf.randomize_adapter_(peft_model)
        out = OUT / family / "adapters" / name
        peft_model.save_pretrained(out)
        mf.tidy_adapter_dir(out)
        # Keep the fixture free of this machine's paths.
        cfg_path = out / "adapter_config.json"
        cfg_json = mf.read_json(cfg_path)
        cfg_json["base_model_name_or_path"] = f"fixtures/families/{family}/model"
        mf.write_json(cfg_path, cfg_json)


def references(family, tok):
    texts = read_jsonl_texts("fixtures/data/eval.jsonl")
    tensors, losses = {}, {}
    base_lp = None
    for case in ["base", *adapter_configs(family)]:
        model = load_base(family)
        if case != "base":
            model = with_adapter(model, family, case).eval()
        for i, text in enumerate(texts[:EVAL_LINES]):
            ids = encode(tok, text)
            tensors[f"input_ids.{i}"] = torch.tensor(ids, dtype=torch.int64)
            tensors[f"{case}.logprobs.{i}"] = sequence_logprobs(model, ids).contiguous()
        losses[case] = corpus_loss(model, tok, texts)["loss"]
        if case == "base":
            base_lp = tensors["base.logprobs.0"]
        else:
            # The adapter must change the outputs visibly, and merging must not.
            assert (tensors[f"{case}.logprobs.0"] - base_lp).abs().max() > 0.05, case
            merged = model.merge_and_unload()
            lp = sequence_logprobs(merged, encode(tok, texts[0]))
            assert (lp - tensors[f"{case}.logprobs.0"]).abs().max() < 1e-4, case
    save_file(tensors, str(OUT / family / "reference.safetensors"))
    return losses


@torch.no_grad()
def generations(family, tok):
    out = []
    for adapter in [None, "all-linear"]:
        model = load_base(family)
        if adapter:
            model = with_adapter(model, family, adapter).eval()
        eos = model.generation_config.eos_token_id
        for prompt in GEN_PROMPTS:
            ids = torch.tensor([tok(prompt)["input_ids"]], dtype=torch.long)
            gen = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=GEN_TOKENS, pad_token_id=eos)
            new = gen[0, ids.shape[1]:].tolist()
            stopped = len(new) > 0 and new[-1] == eos
            if stopped:
                new = new[:-1]
            out.append(dict(adapter=adapter, prompt=prompt, prompt_ids=ids[0].tolist(),
                            max_new_tokens=GEN_TOKENS, token_ids=new, stopped_at_eos=stopped))
    return out


def bnb_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)


def load_nf4(family):
    return AutoModelForCausalLM.from_pretrained(
        model_dir(family), quantization_config=bnb_config(), device_map="cpu", dtype=torch.float32).eval()


def sgd_losses(model, tok, lr):
    """scripts/make_fixtures.py's training parity: SGD at `lr`, batch 1, train.jsonl in
    order, the loss recorded before each step's update."""
    torch.manual_seed(300)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=0.0)
    losses = []
    for text in read_jsonl_texts("fixtures/data/train.jsonl"):
        ids = torch.tensor([tok(text)["input_ids"]], dtype=torch.long)
        logits = model(input_ids=ids).logits[0].float()
        loss = F.cross_entropy(logits[:-1], ids[0, 1:])
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def train_lr(family):
    """0.05 as scripts/make_fixtures.py, or less where the tiny random model's steps amplify
    f32 rounding differences (any two correct implementations drift apart there)."""
    return FAMILIES[family].get("train_lr", TRAIN_LR)


def training(family, tok):
    out = {}
    for adapter in ["all-linear", "dora"]:
        model = with_adapter(load_base(family), family, adapter, is_trainable=True)
        out[adapter] = sgd_losses(model, tok, train_lr(family))
    return out


def nf4(family, tok):
    texts = read_jsonl_texts("fixtures/data/eval.jsonl")
    evals = {}
    for case in ["base", "all-linear"]:
        model = load_nf4(family)
        if case != "base":
            model = with_adapter(model, family, case).eval()
        evals[case] = corpus_loss(model, tok, texts)["loss"]
    model = with_adapter(load_nf4(family), family, "all-linear", is_trainable=True)
    return dict(quant_type="nf4", double_quant=True, eval=evals,
                train={"all-linear": sgd_losses(model, tok, train_lr(family))})


def chats(tok):
    out = []
    for case in CHAT_CASES:
        entry = dict(case)
        try:
            text = tok.apply_chat_template(
                case["messages"], tokenize=False, add_generation_prompt=case["add_generation_prompt"])
            entry.update(text=text, error=None)
        except Exception as e:  # noqa: BLE001 - the template's own error is the reference
            entry.update(text=None, error=str(e))
        out.append(entry)
    return out


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    for index, family in enumerate(FAMILIES):
        seed = 1000 + 100 * index
        print(f"{family}: model")
        tok = make_model(family, seed)
        print(f"{family}: adapters")
        make_adapters(family, seed + 10)
        print(f"{family}: references")
        reference = dict(eval_lines=EVAL_LINES, eval=references(family, tok))
        reference["generate"] = generations(family, tok)
        print(f"{family}: training")
        reference["train"] = dict(lr=train_lr(family), batch_size=1, losses=training(family, tok))
        print(f"{family}: nf4")
        reference["nf4"] = nf4(family, tok)
        reference["chat"] = chats(tok)
        mf.write_json(OUT / family / "reference.json", reference)
        for p in (OUT / family).rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        print(f"  {family}: {mf.dir_size(OUT / family) / 1024:.1f} KiB; eval {reference['eval']}")
        print(f"  train {reference['train']['losses']}")
        print(f"  nf4 {reference['nf4']}")


if __name__ == "__main__":
    main()
