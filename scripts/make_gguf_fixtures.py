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

pinned versions (the fixtures in git were generated with exactly these):
    python 3.11.7, numpy 2.4.6, gguf 0.19.0
"""

import argparse
import os

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    make_quants(np.random.default_rng(27))


if __name__ == "__main__":
    main()
