"""Model store: conversion, digests, refusal of tampered or missing models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from swarmshard.core.store import DigestMismatch, ModelNotFound, ModelStore, tensor_digest


def test_smollm2_is_converted_into_per_block_files(smollm2):
    assert smollm2.n_blocks == 30
    assert len(smollm2.block_digests) == 30 and len(set(smollm2.block_digests)) == 30
    assert all(smollm2.block_path(i).exists() for i in range(30))
    assert smollm2.split_error <= 1e-4
    # 2 (K,V) × head_dim 64 × 3 KV heads × 4 bytes
    assert smollm2.kv_bytes_per_token_per_block == 2 * 64 * 3 * 4


def test_resolve_is_idempotent(store, smollm2):
    again = store.resolve("smollm2-135m", progress=False)
    assert again == smollm2


def test_digest_depends_on_content_names_and_dtype():
    a = {"w": torch.ones(2, 3)}
    assert tensor_digest(a) == tensor_digest({"w": torch.ones(2, 3)})
    assert tensor_digest(a) != tensor_digest({"w": torch.ones(3, 2)})
    assert tensor_digest(a) != tensor_digest({"v": torch.ones(2, 3)})
    assert tensor_digest(a) != tensor_digest({"w": torch.ones(2, 3, dtype=torch.float16)})
    b = {"w": torch.ones(2, 3)}
    b["w"][1, 2] = 1.0001
    assert tensor_digest(a) != tensor_digest(b)


def test_tampered_block_is_refused(tmp_path, tiny_model_dirs):
    store = ModelStore(tmp_path)
    manifest = store.resolve(str(tiny_model_dirs["tiny-gpt2"]), progress=False)
    path = manifest.block_path(1)
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(path))
    store.load_span(manifest, 0, 1)  # other blocks still load
    with pytest.raises(DigestMismatch, match="block 1"):
        store.load_span(manifest, 0, 2)


def test_missing_model_names_the_problem(tmp_path):
    store = ModelStore(tmp_path)
    with pytest.raises(ModelNotFound, match="no-such-model"):
        store.resolve("no-such-model")
    with pytest.raises(ModelNotFound, match="not in the store"):
        store.open("never-converted")


def test_manifest_records_layout_and_sizes(store, tiny_model_dirs):
    manifest = store.resolve(str(tiny_model_dirs["tiny-gptneox"]), progress=False)
    data = json.loads((manifest.root / "manifest.json").read_text())
    assert data["layout"]["layers_attr"] == "layers"
    assert data["layout"]["base_prefix"] == "gpt_neox"
    assert len(manifest.block_bytes) == manifest.n_blocks == 6
