#!/usr/bin/env python3
"""Generate fixtures/combine/: two PEFT LoRA adapters and the updates PEFT's own
add_weighted_adapter makes of them, for the cases where PEFT computes what
`lowrank combine` computes.

Usage: python3 scripts/make_combine_fixtures.py   (offline, deterministic; the
pinned versions of make_fixtures.py: torch 2.15.0, transformers 5.24.0, peft 0.21.2).

PEFT's *_svd combination types prune/merge the dense updates ΔWᵢ = sᵢ·BᵢAᵢ
(as lowrank does), then re-factorize by SVD. They differ from lowrank in that
they weight by wᵢ·sᵢ (applying the scale twice) and elect TIES signs before
weighting; both vanish when every sᵢ = 1 (lora_alpha = r) and the weights are
equal. So the adapters here have lora_alpha = r = 4 and the references are:

  svd                  weights 0.7, 0.3 (no election; s = 1), svd_rank 8 = Σ rᵢ
  ties_svd             weights 1, 1, density 0.5, majority "total" and "frequency"
  magnitude_prune_svd  weights 0.7, 0.3, density 0.5

with svd_rank 16 for the pruned ones (PEFT requires svd_rank ≤ min(d, k)): the
best rank-16 approximation of the merged update, unique for these inputs, so
lowrank's `--rank 16` must give the same ΔW (and v_proj, k_proj, 16×32, exactly). density·n is a whole number for every module (PEFT
keeps ⌊density·n⌋ entries, lowrank round(density·n)). DARE draws torch's random
masks and is not compared.

Writes (fixtures/combine/):
  a/, b/                 the adapters (q_proj, v_proj of llama-tied; b also k_proj,
                         so target sets differ)
  reference.safetensors  "<case>.<module>" → ΔW (out × in, f32) of the combined
                         adapter, from PEFT's get_delta_weight
  reference.json         the cases: method, weights, density, majority sign
"""

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "fixtures/models/llama-tied"
OUT = ROOT / "fixtures/combine"

CASES = [
    {"name": "svd", "method": "svd", "weights": [0.7, 0.3], "svd_rank": 8},
    {"name": "ties_svd_total", "method": "ties_svd", "weights": [1.0, 1.0], "density": 0.5,
     "majority_sign": "total", "svd_rank": 16},
    {"name": "ties_svd_frequency", "method": "ties_svd", "weights": [1.0, 1.0], "density": 0.5,
     "majority_sign": "frequency", "svd_rank": 16},
    {"name": "magnitude_prune_svd", "method": "magnitude_prune_svd", "weights": [0.7, 0.3],
     "density": 0.5, "svd_rank": 16},
]


def base_model():
    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)


def write_adapter(name, targets, seed):
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(base_model(), config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.lora_A["default"].weight.normal_(0.0, 0.3)
                module.lora_B["default"].weight.normal_(0.0, 0.3)
    model.save_pretrained(OUT / name)
    # PEFT writes the absolute base path; keep the fixture relocatable.
    config_path = OUT / name / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "fixtures/models/llama-tied"
    config["target_modules"] = sorted(config["target_modules"])  # a set: hash order
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (OUT / name / "README.md").unlink(missing_ok=True)


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    write_adapter("a", ["q_proj", "v_proj"], seed=1)
    write_adapter("b", ["q_proj", "v_proj", "k_proj"], seed=2)

    model = PeftModel.from_pretrained(base_model(), OUT / "a", adapter_name="a")
    model.load_adapter(OUT / "b", adapter_name="b")
    tensors = {}
    for case in CASES:
        model.add_weighted_adapter(
            ["a", "b"],
            case["weights"],
            case["name"],
            combination_type=case["method"],
            svd_rank=case["svd_rank"],
            density=case.get("density"),
            majority_sign_method=case.get("majority_sign", "total"),
        )
        for name, module in model.base_model.model.named_modules():
            if isinstance(module, LoraLayer) and case["name"] in module.lora_A:
                delta = module.get_delta_weight(case["name"]).detach().float().contiguous()
                tensors[f"{case['name']}.{name}"] = delta
    save_file(tensors, OUT / "reference.safetensors", metadata={"format": "pt"})
    for path in OUT.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    (OUT / "reference.json").write_text(json.dumps({"cases": CASES}, indent=2) + "\n")
    print(f"wrote {len(tensors)} reference updates to {OUT}")


if __name__ == "__main__":
    main()
