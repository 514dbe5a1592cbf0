#!/usr/bin/env python3
"""Generate fixtures/quant/: bitsandbytes 4-bit (NF4/FP4) quantization references for
crates/lowrank-quant, plus one tiny llama saved by transformers in the bitsandbytes 4-bit
serialization.

Usage (from anywhere; CPU only, no network):

    pip install bitsandbytes==0.50.2
    python3 scripts/make_quant_fixtures.py

fixtures/quant/ is deleted and regenerated (reference.json: eval losses and QLoRA training
losses of transformers + bitsandbytes + PEFT over the 4-bit base, for the Rust parity tests). The output is deterministic for the pinned
versions below (fixed inputs, single-threaded torch on CPU).

pinned versions (the fixtures in git were generated with exactly these):
    python        3.11.7
    torch         2.15.0 (+cu132 wheel, run on CPU, ATen CPU capability AVX2)
    bitsandbytes  0.50.2 (CPU backend: libbitsandbytes_cpu.so)
    transformers  5.24.0
    safetensors   0.8.0
    numpy         2.4.6

What bitsandbytes does on CPU (and what the Rust code reproduces):
  * quantize_4bit runs the "default" (pure torch) kernel: per block of `blocksize`
    elements of the flattened tensor, absmax = max|x|; full blocks scale by
    x * (1/absmax) (absmax clamped to >= 1e-38 only inside the reciprocal), the short
    last block by x / am with am = max(max|x|, 1e-38) (and am is what is stored);
    clamp to [-1, 1]; code = torch.bucketize(scaled, midpoints of the sorted table)
    i.e. the number of midpoints strictly below the value (a tie goes to the lower
    code); FP4 maps the sorted position back through argsort of its table. Two codes a
    byte, first element in the high nibble, an odd count padded with a zero code.
  * double quant: offset = absmax.mean() (torch's float cascade sum / n), then
    quantize_blockwise(absmax - offset, blocksize=256) with the signed dynamic map,
    which on CPU is the C++ quantize_cpu: absmax per 256, v * (1/absmax), index into a
    65536-entry LUT at uint16(fma((v+1)*0.5, 65535, 0.5)).
  * The 8-bit dequant is code[q] * nested_absmax, then + offset (two roundings).

The sum of the absmax values depends on the width of torch's Vectorized<float>: 8 lanes
(AVX2, NEON, default) — the capability these fixtures were made on — or 16 (AVX-512).

fixtures/quant-straddle/ (written by make_straddle(), after fixtures/quant/; run with the
argument `straddle` to regenerate that folder alone): 4-bit blocks that do not align with
weight rows. bitsandbytes cuts the row-major flattened weight into blocks, so a block may
end mid-row or span several rows. The tiny llama `llama-i176` (hidden 32, intermediate 176,
2 layers, f32) has down_proj in_features 176: at block 64 its blocks straddle rows; at block
256 every block spans several rows of every projection; at block 4096 q/k/v/o (<= 1024
values) are one short block each and gate/up/down (5632 values) one full block plus a short
one. transformers' BitsAndBytesConfig has no block size, so the decoder linears are replaced
by bnb.nn.Linear4bit with Params4bit(blocksize=...) (at block 64 this gives the very losses
of load_in_4bit, checked below). Files:
  * llama-i176/: the f32 model + fixtures/models/llama-tied's tokenizer files;
  * llama-i176__lora/, llama-i176__dora/: PEFT adapters (r 4 on all seven projections,
    lora_B ~ N(0, 0.3), DoRA magnitude x (1 + N(0, 0.1)));
  * reference.json: "eval": eval loss (as in fixtures/quant/) for every adapter (none, lora,
    dora) x block (64, 256, 4096) x nf4/fp4 x double quant or not, plus the f32 base;
    "qlora_train": per-step losses of 6 SGD steps (lr 0.05, batch 1, train.jsonl in order)
    from each adapter over three 4-bit bases; "decode": greedy decoding (the prompt in one
    forward, then one token a step over the KV cache: one row through every 4-bit linear)
    of one prompt over four 4-bit bases, with the tokens and each step's logits in
    decode.safetensors (`<case>.logits`: steps x vocab).
"""

import json
import os
import shutil
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TQDM_DISABLE"] = "1"
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
os.chdir(REPO)
OUT = Path("fixtures/quant")

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

NF4 = F.get_4bit_type("nf4", device="cpu")
FP4 = F.get_4bit_type("fp4", device="cpu")


def midpoints(code):
    s = torch.sort(code).values
    return (s[:-1] + s[1:]) / 2


def make_inputs():
    """Deterministic f32 inputs with exact zeros, exact midpoints (ties), outliers and
    all-zero blocks. Generated with numpy's PCG64 so the bytes are reproducible."""
    rng = np.random.default_rng(1234)
    ins = {}

    w = rng.standard_normal(300).astype(np.float32) * np.float32(0.05)
    w[0] = 1.0  # absmax 1 in the first block: the next entries scale to themselves
    mids = np.concatenate([midpoints(NF4).numpy(), midpoints(FP4).numpy()])
    w[1 : 1 + len(mids)] = mids  # exact ties for both tables (31 values, < 64)
    w[40:44] = 0.0
    w[44] = -0.0
    w[70] = 25.0  # outlier
    w[150] = -40.0
    w[260] = 3.0
    w[261:264] = [1.5, -1.5, 0.75]  # x/am exact halves in the short last block
    w[299] = -3.0
    ins["w3x100"] = w.reshape(3, 100)

    ins["w64x64"] = (rng.standard_normal((64, 64)) * 0.02).astype(np.float32)
    ins["w64x64"][5, 7] = 0.9  # outliers
    ins["w64x64"][33, 0] = -1.3

    v = (rng.standard_t(3, 1000) * 0.1).astype(np.float32)
    v[::97] = 0.0
    ins["v1000"] = v

    ins["v77"] = (rng.standard_normal(77) * 2.0).astype(np.float32)  # odd length: pad nibble

    z = np.zeros(200, dtype=np.float32)  # zero blocks, incl. a zero short last block
    z[:64] = rng.standard_normal(64).astype(np.float32)
    ins["z200"] = z

    # 640 blocks of 64: exercises torch's cascade sum (levels) for the DQ offset and
    # three nested 256-blocks (the last one short).
    ins["w256x160"] = (rng.standard_normal((256, 160)) * 0.03).astype(np.float32)
    return ins


def quant_case(x, kind, dq, bs):
    q, qs = F.quantize_4bit(x, blocksize=bs, compress_statistics=dq, quant_type=kind)
    deq = F.dequantize_4bit(q, qs)
    t = {"packed": q.contiguous(), "dequant": deq.contiguous(), "quant_map": qs.code.contiguous()}
    meta = {"packed_shape": list(q.shape), "shape": list(qs.shape), "blocksize": qs.blocksize}
    if dq:
        t["absmax_q"] = qs.absmax.contiguous()
        t["nested_absmax"] = qs.state2.absmax.contiguous()
        t["nested_quant_map"] = qs.state2.code.contiguous()
        t["offset"] = qs.offset.reshape(1).contiguous()
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        t["absmax"] = absmax.contiguous()  # the restored absmax
        t["absmax_direct"] = torch.ops.bitsandbytes.quantize_4bit.default(x, bs, kind, torch.uint8)[1]
        meta["nested_blocksize"] = qs.state2.blocksize
        meta["nested_offset"] = qs.offset.item()
    else:
        t["absmax"] = qs.absmax.contiguous()
    return t, meta


def tiny_llama():
    """Load fixtures/models/llama-tied with load_in_4bit (nf4, double quant) and save it."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        "fixtures/models/llama-tied", quantization_config=cfg, device_map="cpu", dtype=torch.float32
    )
    dest = OUT / "llama-tied-nf4-dq"
    model.save_pretrained(dest, safe_serialization=True)
    for p in list(dest.iterdir()):
        if p.name not in ("config.json", "model.safetensors"):
            p.unlink()
    # The reader's reference: each quantized weight dequantized by bitsandbytes.
    ref = {}
    for name, mod in model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            w = mod.weight
            ref[f"{name}.weight"] = F.dequantize_4bit(w.data, w.quant_state).contiguous()
    save_file(ref, str(OUT / "llama-tied-nf4-dq.dequant.safetensors"))
    return sorted(ref)


BNB_VARIANTS = [("nf4", True), ("fp4", False)]
# (base model, adapter or None) whose eval loss over a 4-bit base is recorded.
EVAL_CASES = [
    ("llama-tied", None),
    ("llama-tied", "llama-tied__lora-qv"),
    ("llama-tied", "llama-tied__dora"),
    ("llama-untied", None),
    ("llama-untied", "llama-untied__all-linear"),
]
TRAIN_LR = 0.05  # as scripts/make_fixtures.py's training parity


def bnb_config(kind, dq):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_use_double_quant=dq,
        bnb_4bit_compute_dtype=torch.float32,
    )


def load_4bit(name, kind, dq):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        f"fixtures/models/{name}", quantization_config=bnb_config(kind, dq), device_map="cpu", dtype=torch.float32
    )
    model.eval()
    return model


def eval_texts(path="fixtures/data/eval.jsonl"):
    with open(path) as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def eval_loss(model, tok):
    """`lowrank eval`'s loss: sum of NLL of every token t >= 1 given < t over all lines of
    fixtures/data/eval.jsonl (tokenizer(text), special tokens included) / predicted tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for text in eval_texts():
            ids = torch.tensor([tok(text)["input_ids"]], dtype=torch.long)
            if ids.shape[1] < 2:
                continue
            logits = model(input_ids=ids).logits[0].float()
            nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum")
            total += nll.item()
            count += ids.shape[1] - 1
    return total / count, count


def eval_references():
    """Eval loss of the fixture models over a 4-bit base (transformers + bitsandbytes + PEFT),
    and the same models in f32 for scale."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = []
    for name, adapter in EVAL_CASES:
        tok = AutoTokenizer.from_pretrained(f"fixtures/models/{name}")
        variants = [(k, dq) for k, dq in BNB_VARIANTS] + [(None, False)]
        for kind, dq in variants:
            if kind is None:
                model = AutoModelForCausalLM.from_pretrained(f"fixtures/models/{name}", dtype=torch.float32).eval()
            else:
                model = load_4bit(name, kind, dq)
            if adapter is not None:
                model = PeftModel.from_pretrained(model, f"fixtures/adapters/{adapter}").eval()
            loss, tokens = eval_loss(model, tok)
            out.append({
                "model": name, "adapter": adapter, "quant_type": kind, "double_quant": dq,
                "loss": loss, "tokens": tokens,
            })
            print(f"  eval {name} {adapter} {kind} dq={dq}: {loss:.8f}")
    return out


def qlora_train_reference():
    """scripts/make_fixtures.py's training parity (6 SGD steps, lr 0.05, batch 1, train.jsonl
    in order, from the fixture adapter) over the NF4 + double quant base."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    out = {}
    for adapter in ["llama-tied__lora-qv", "llama-tied__dora"]:
        torch.manual_seed(300)
        tok = AutoTokenizer.from_pretrained("fixtures/models/llama-tied")
        model = PeftModel.from_pretrained(
            load_4bit("llama-tied", "nf4", True), f"fixtures/adapters/{adapter}", is_trainable=True
        )
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=TRAIN_LR, momentum=0.0, weight_decay=0.0)
        losses = []
        with open("fixtures/data/train.jsonl") as f:
            texts = [json.loads(line)["text"] for line in f if line.strip()]
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]], dtype=torch.long)
            logits = model(input_ids=ids).logits[0].float()
            loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
            losses.append(loss.item())  # before this step's update
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[adapter] = {
            "base": "llama-tied", "quant_type": "nf4", "double_quant": True, "lr": TRAIN_LR,
            "batch_size": 1, "trainable_tensors": len(params), "losses": losses,
        }
        print(f"  qlora train {adapter}: {losses}")
    return out


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)

    inputs = make_inputs()
    tensors = {}
    cases = []
    for name, arr in inputs.items():
        x = torch.from_numpy(arr)
        tensors[f"{name}.input"] = x
        combos = [(k, dq, bs) for k in ("nf4", "fp4") for dq in (False, True) for bs in (64, 128)]
        if name == "w256x160":
            combos = [("nf4", True, 64)]
        for kind, dq, bs in combos:
            key = f"{name}.{kind}.{'dq' if dq else 'plain'}.bs{bs}"
            t, meta = quant_case(x, kind, dq, bs)
            for k, v in t.items():
                tensors[f"{key}.{k}"] = v
            cases.append({"key": key, "input": name, "quant_type": kind, "double_quant": dq, **meta})

    tensors["maps.nf4"] = NF4.contiguous()
    tensors["maps.fp4"] = FP4.contiguous()
    tensors["maps.dynamic"] = F.create_dynamic_map(signed=True).contiguous()
    save_file(tensors, str(OUT / "cases.safetensors"))

    try:
        llama = tiny_llama()
        llama_note = "saved by transformers save_pretrained (load_in_4bit on CPU)"
    except Exception as e:  # pragma: no cover - documented fallback
        print(f"tiny llama 4-bit save failed: {e!r}", file=sys.stderr)
        raise

    info = {
        "versions": {
            "torch": torch.__version__,
            "bitsandbytes": bnb.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "cases": cases,
        "llama": {"dir": "llama-tied-nf4-dq", "note": llama_note, "quantized": llama},
    }
    reference = {
        "note": "eval loss (lowrank eval's definition) over fixtures/data/eval.jsonl with transformers "
        "+ bitsandbytes load_in_4bit (compute dtype float32, CPU) and PEFT adapters; quant_type null = f32 base. "
        "qlora_train: per-step losses of 6 SGD steps over the nf4 + double-quant base.",
        "versions": info["versions"],
        "eval": eval_references(),
        "qlora_train": qlora_train_reference(),
    }
    with open(OUT / "reference.json", "w") as f:
        json.dump(reference, f, indent=1)
        f.write("\n")
    with open(OUT / "cases.json", "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    for p in OUT.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)  # safetensors writes 0600
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total} bytes, {len(cases)} cases)")


# ---------------------------------------------------------------------------
# fixtures/quant-straddle/: blocks that straddle weight rows
# ---------------------------------------------------------------------------

STRADDLE = Path("fixtures/quant-straddle")
STRADDLE_MODEL = "llama-i176"
STRADDLE_BLOCKS = [64, 256, 4096]
STRADDLE_VARIANTS = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]
STRADDLE_ADAPTERS = {
    "llama-i176__lora": dict(use_dora=False),
    "llama-i176__dora": dict(use_dora=True),
}
# (adapter, quant type, double quant, block size) of the QLoRA training references.
STRADDLE_TRAIN = [
    (adapter, kind, dq, bs)
    for adapter in STRADDLE_ADAPTERS
    for kind, dq, bs in [("nf4", True, 64), ("fp4", False, 256), ("nf4", False, 4096)]
]
# (adapter, quant type, double quant, block size) of the greedy decoding references.
STRADDLE_DECODE = [
    (None, "nf4", True, 64),
    (None, "fp4", False, 4096),
    ("llama-i176__lora", "nf4", False, 256),
    ("llama-i176__dora", "fp4", True, 64),
]
DECODE_PROMPT = "The quick cat"
DECODE_STEPS = 8
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def straddle_model_dir():
    return STRADDLE / STRADDLE_MODEL


def make_straddle_model():
    """The f32 tiny llama whose down_proj rows (176 values) are not a multiple of 64;
    initialised like scripts/make_fixtures.py's models (N(0, 0.3), norms 1 + N(0, 0.1))."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(400)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=384, max_position_embeddings=256, tie_word_embeddings=True,
        rope_theta=10000.0, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, do_sample=False)
    out = straddle_model_dir()
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path("fixtures/models/llama-tied") / f, out / f)


def make_straddle_adapters():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for seed, (adapter, kwargs) in enumerate(STRADDLE_ADAPTERS.items(), start=410):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(straddle_model_dir(), dtype=torch.float32)
        cfg = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, bias="none",
                         target_modules=PROJECTIONS, **kwargs)
        peft_model = get_peft_model(base, cfg)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.3)
                elif "lora_magnitude_vector" in name:
                    p.mul_(1.0 + 0.1 * torch.randn_like(p))
        out = STRADDLE / adapter
        peft_model.save_pretrained(out)
        (out / "README.md").unlink(missing_ok=True)
        cfg_path = out / "adapter_config.json"
        cfg_json = json.loads(cfg_path.read_text())
        cfg_json["target_modules"] = sorted(cfg_json["target_modules"])  # a set in PEFT
        cfg_json["base_model_name_or_path"] = str(straddle_model_dir())
        cfg_path.write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")


def load_4bit_blocks(kind, dq, block_size):
    """The straddle model with every decoder linear replaced by a bitsandbytes Linear4bit
    quantized at `block_size` (what load_in_4bit does, at any block size)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(straddle_model_dir(), dtype=torch.float32)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False,
                                      compute_dtype=torch.float32, compress_statistics=dq, quant_type=kind)
                q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=kind,
                                             compress_statistics=dq, blocksize=block_size)
                q = q.to("cpu")  # quantizes
                assert q.weight.quant_state.blocksize == block_size
                setattr(parent, name, q)
    model.eval()
    return model


def with_straddle_adapter(model, adapter, trainable=False):
    from peft import PeftModel

    if adapter is None:
        return model
    return PeftModel.from_pretrained(model, STRADDLE / adapter, is_trainable=trainable)


def straddle_eval():
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(straddle_model_dir())
    out = []
    for adapter in [None, *STRADDLE_ADAPTERS]:
        base = AutoModelForCausalLM.from_pretrained(straddle_model_dir(), dtype=torch.float32).eval()
        if adapter is not None:
            base = PeftModel.from_pretrained(base, STRADDLE / adapter).eval()
        loss, tokens = eval_loss(base, tok)
        out.append({"adapter": adapter, "quant_type": None, "double_quant": False, "block_size": None,
                    "loss": loss, "tokens": tokens})
        for bs in STRADDLE_BLOCKS:
            for kind, dq in STRADDLE_VARIANTS:
                model = with_straddle_adapter(load_4bit_blocks(kind, dq, bs), adapter).eval()
                loss, tokens = eval_loss(model, tok)
                out.append({"adapter": adapter, "quant_type": kind, "double_quant": dq, "block_size": bs,
                            "loss": loss, "tokens": tokens})
                print(f"  straddle eval {adapter} {kind} dq={dq} bs={bs}: {loss:.8f}")
    # The replacement above is load_in_4bit at bitsandbytes' default block.
    for kind, dq in STRADDLE_VARIANTS:
        model = AutoModelForCausalLM.from_pretrained(
            straddle_model_dir(), quantization_config=bnb_config(kind, dq), device_map="cpu", dtype=torch.float32
        ).eval()
        want = next(c["loss"] for c in out if c["adapter"] is None and c["quant_type"] == kind
                    and c["double_quant"] == dq and c["block_size"] == 64)
        assert eval_loss(model, tok)[0] == want, (kind, dq)
    return out


def straddle_train():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(straddle_model_dir())
    with open("fixtures/data/train.jsonl") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    out = []
    for adapter, kind, dq, bs in STRADDLE_TRAIN:
        torch.manual_seed(300)
        model = with_straddle_adapter(load_4bit_blocks(kind, dq, bs), adapter, trainable=True)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=TRAIN_LR, momentum=0.0, weight_decay=0.0)
        losses = []
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]], dtype=torch.long)
            logits = model(input_ids=ids).logits[0].float()
            loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
            losses.append(loss.item())  # before this step's update
            opt.zero_grad()
            loss.backward()
            opt.step()
        out.append({"adapter": adapter, "quant_type": kind, "double_quant": dq, "block_size": bs,
                    "lr": TRAIN_LR, "batch_size": 1, "trainable_tensors": len(params), "losses": losses})
        print(f"  straddle qlora train {adapter} {kind} dq={dq} bs={bs}: {losses}")
    return out


def straddle_decode():
    """Greedy decoding with the KV cache: the prompt in one forward, then one token (one row
    through every 4-bit linear) per step; each step's last-position logits are kept."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(straddle_model_dir())
    prompt = tok(DECODE_PROMPT)["input_ids"]
    out, tensors = [], {}
    for adapter, kind, dq, bs in STRADDLE_DECODE:
        model = with_straddle_adapter(load_4bit_blocks(kind, dq, bs), adapter).eval()
        step_logits, tokens = [], []
        with torch.no_grad():
            step = model(input_ids=torch.tensor([prompt]), use_cache=True)
            for _ in range(DECODE_STEPS):
                last = step.logits[0, -1].float()
                step_logits.append(last)
                tokens.append(int(last.argmax()))  # the first maximum, like lowrank's argmax
                step = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=step.past_key_values,
                             use_cache=True)
        key = f"{adapter or 'base'}.{kind}.{'dq' if dq else 'plain'}.bs{bs}"
        tensors[f"{key}.logits"] = torch.stack(step_logits).contiguous()
        out.append({"key": key, "adapter": adapter, "quant_type": kind, "double_quant": dq, "block_size": bs,
                    "prompt": DECODE_PROMPT, "prompt_ids": prompt, "token_ids": tokens})
        print(f"  straddle decode {key}: {tokens}")
    save_file(tensors, str(STRADDLE / "decode.safetensors"))
    return out


def make_straddle():
    if STRADDLE.exists():
        shutil.rmtree(STRADDLE)
    STRADDLE.mkdir(parents=True)
    make_straddle_model()
    make_straddle_adapters()
    reference = {
        "note": "4-bit blocks that straddle weight rows (see scripts/make_quant_fixtures.py): "
        "transformers + bitsandbytes (Linear4bit at each block size, compute dtype float32, CPU) + PEFT. "
        "eval: lowrank eval's loss over fixtures/data/eval.jsonl (quant_type null = f32 base); "
        "qlora_train: per-step losses of 6 SGD steps; decode: greedy tokens, logits in decode.safetensors.",
        "versions": {
            "torch": torch.__version__,
            "bitsandbytes": bnb.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "model": STRADDLE_MODEL,
        "eval": straddle_eval(),
        "qlora_train": straddle_train(),
        "decode": straddle_decode(),
    }
    with open(STRADDLE / "reference.json", "w") as f:
        json.dump(reference, f, indent=1)
        f.write("\n")
    for p in STRADDLE.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    total = sum(p.stat().st_size for p in STRADDLE.rglob("*") if p.is_file())
    print(f"wrote {STRADDLE} ({total} bytes)")


if __name__ == "__main__":
    if sys.argv[1:] == ["straddle"]:
        make_straddle()
    else:
        main()
        make_straddle()
