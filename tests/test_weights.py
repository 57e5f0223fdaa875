"""Weights: HF dirs (single, sharded, bfloat16), GGUF, export; checked against transformers."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from reasonrag_jax.io import InputError
from reasonrag_jax.models.decoder import PRESETS
from reasonrag_jax.models.decoder import DecoderConfig
from reasonrag_jax.models.policy import load_policy, resolve_policy
from reasonrag_jax.models.weights import (
    _unpermute_rope, export_hf, load_hf_dir, read_safetensors, write_safetensors)


@nnx.jit
def forward(model, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return model(tokens, positions)[0]


def torch_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


def flat_params(model) -> dict:
    return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


TOKENS = np.random.default_rng(0).integers(0, 97, (2, 11), dtype=np.int32)


def test_sharded_index_dir_loads_the_same_model(make_hf_dir, tiny_qwen2_cfg):
    path, reference = make_hf_dir(tiny_qwen2_cfg, seed=3, max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model = load_hf_dir(path)
    np.testing.assert_allclose(forward(model, TOKENS), torch_logits(reference, TOKENS),
                               atol=1e-4, rtol=0)


def test_bfloat16_checkpoint_is_memory_mapped_and_exact(make_hf_dir, tiny_llama_cfg, tmp_path):
    """Qwen2.5 ships bfloat16 safetensors, which safetensors' numpy reader cannot open."""
    _, reference = make_hf_dir(tiny_llama_cfg, seed=4)
    reference.to(torch.bfloat16).save_pretrained(tmp_path)
    tensors = read_safetensors(tmp_path / "model.safetensors")
    embed = tensors["model.embed_tokens.weight"]
    assert isinstance(embed.base, np.memmap) and embed.dtype == ml_dtypes.bfloat16
    expected = reference.model.embed_tokens.weight.float().detach().numpy()
    np.testing.assert_array_equal(embed.astype(np.float32), expected)
    model = load_hf_dir(tmp_path, param_dtype="bfloat16")
    assert model.embed[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(model.embed[...], np.float32), expected)
    export_hf(model, None, tmp_path / "out")                     # stays bfloat16 on export
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert theirs.dtype == torch.bfloat16
    for name, value in reference.state_dict().items():
        assert torch.equal(theirs.state_dict()[name], value), name


def test_safetensors_writer_roundtrips_and_torch_reads_it(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
               "b": np.array([1.5, -2.25, 3.0], ml_dtypes.bfloat16)}
    write_safetensors(tensors, tmp_path / "x.safetensors")
    back = read_safetensors(tmp_path / "x.safetensors")
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype
        np.testing.assert_array_equal(back[name], value)
    theirs = load_file(tmp_path / "x.safetensors")
    assert theirs["b"].dtype == torch.bfloat16 and theirs["b"].float().tolist() == [1.5, -2.25, 3]
    assert theirs["a"].tolist() == [[0, 1, 2], [3, 4, 5]]


def family_cfg(family: str, llama: DecoderConfig, qwen2: DecoderConfig) -> DecoderConfig:
    """Mistral is Llama-shaped: the tiny Llama under Mistral's model_type (untied head).
    llama3: Llama 3.x RoPE scaling with an original context of 32 positions, so the tiny head's
    8 frequencies fall in all three bands (divided, interpolated, kept)."""
    if family == "mistral":
        return dataclasses.replace(llama, model_type="mistral", tie_word_embeddings=False)
    if family == "llama3":
        return dataclasses.replace(llama, rope_theta=500000.0, rope_llama3=(8.0, 1.0, 4.0, 32))
    return llama if family == "llama" else qwen2


@pytest.mark.parametrize("family", ["llama", "llama3", "mistral", "qwen2"])
def test_export_then_transformers_load_gives_identical_logits(
        family, make_hf_dir, tiny_llama_cfg, tiny_qwen2_cfg, tmp_path):
    cfg = family_cfg(family, tiny_llama_cfg, tiny_qwen2_cfg)
    path, reference = make_hf_dir(cfg, seed=5)
    model = load_hf_dir(path)
    np.testing.assert_allclose(forward(model, TOKENS), torch_logits(reference, TOKENS),
                               atol=1e-4, rtol=0)
    export_hf(model, None, tmp_path / "out")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(theirs).__name__ == {"llama": "LlamaForCausalLM", "llama3": "LlamaForCausalLM",
                                     "mistral": "MistralForCausalLM",
                                     "qwen2": "Qwen2ForCausalLM"}[family]
    assert theirs.config.rope_parameters["rope_type"] == ("llama3" if family == "llama3"
                                                          else "default")
    np.testing.assert_allclose(torch_logits(theirs, TOKENS), forward(model, TOKENS),
                               atol=1e-5, rtol=0)
    again = flat_params(load_hf_dir(tmp_path / "out"))
    for name, value in flat_params(model).items():
        np.testing.assert_array_equal(again[name], value)


def test_bad_directories_are_one_line_input_errors(tmp_path, tiny_llama_cfg):
    (tmp_path / "config.json").write_text(json.dumps(tiny_llama_cfg.to_hf()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(InputError, match="pickled .bin weights are never loaded"):
        load_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**tiny_llama_cfg.to_hf(),
                                                      "model_type": "gpt2"}))
    with pytest.raises(InputError, match=r"config\.json: unsupported model_type 'gpt2'"):
        load_hf_dir(tmp_path)
    with pytest.raises(InputError, match="not a GGUF file, a Hugging Face directory"):
        load_policy(str(tmp_path / "missing"))


def test_missing_tensor_is_named(make_hf_dir, tiny_llama_cfg, tmp_path):
    path, _ = make_hf_dir(tiny_llama_cfg, seed=6)
    tensors = dict(read_safetensors(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    write_safetensors(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(InputError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
        load_hf_dir(tmp_path)


def test_unpermute_inverts_llama_cpp_rope_permutation():
    """llama.cpp's converter interleaves the two rotary halves of each head's Q/K rows."""
    heads, head_dim, cols = 3, 8, 5
    w = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
    llama_cpp = (w.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2)
                 .reshape(heads * head_dim, cols))
    assert not np.array_equal(llama_cpp, w)
    np.testing.assert_array_equal(_unpermute_rope(llama_cpp, heads), w)


@pytest.mark.slow
def test_embedded_gguf_matches_transformers_reading_of_it(smollm2, smollm2_torch):
    """Our GGUF de-quantisation (+ Q/K un-permutation) = transformers' GGUF loader."""
    model, tokenizer = smollm2
    assert model.cfg == PRESETS["smollm2-135m"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    ours = flat_params(model)
    theirs = smollm2_torch.state_dict()
    np.testing.assert_array_equal(ours[("embed",)], theirs["model.embed_tokens.weight"].numpy())
    q3 = theirs["model.layers.3.self_attn.q_proj.weight"].numpy()
    np.testing.assert_array_equal(ours[("wq",)][3], q3.T.reshape(576, 9, 64))
    k7 = theirs["model.layers.7.self_attn.k_proj.weight"].numpy()
    np.testing.assert_array_equal(ours[("wk",)][7], k7.T.reshape(576, 3, 64))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Name three colors."}],
                                         tokenize=False, add_generation_prompt=True)
    ids = np.asarray([tokenizer(text, add_special_tokens=False)["input_ids"]], np.int32)
    assert ids[0, 0] == 1 and ids.shape[1] > 20         # <|im_start|>, default system message
    logits = np.asarray(forward(model, ids))
    ref = torch_logits(smollm2_torch, ids)
    np.testing.assert_allclose(logits, ref, atol=2e-3, rtol=0)
    assert np.abs(logits - ref).max() < 1e-3 * np.abs(ref).max()
    assert jax.numpy.argmax(logits[0, -1]) == ref[0, -1].argmax()


def test_export_shards_with_an_index_and_lists_every_eos(make_hf_dir, tiny_qwen2_cfg, tmp_path):
    """A 7B export is ~15 GB: shards of at most `max_shard_bytes` and an index, as transformers
    writes them; generation_config.json carries config.json's EOS list and the tokenizer's."""
    path, reference = make_hf_dir(dataclasses.replace(tiny_qwen2_cfg, eos_token_id=5,
                                                      extra_eos_token_ids=(7,)), seed=8)
    model = load_hf_dir(path)
    assert model.cfg.eos_token_id == 5 and model.cfg.extra_eos_token_ids == (7,)
    tokenizer = type("Tok", (), {"eos_token_id": 9, "pad_token_id": 9, "save_pretrained":
                                 lambda self, d: None})()
    export_hf(model, tokenizer, tmp_path / "out", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert all((tmp_path / "out" / f).stat().st_size < 40_000 + 4096 for f in files)
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [5, 7, 9] and generation["pad_token_id"] == 9
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id == [5, 7, 9]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(torch_logits(theirs, TOKENS), torch_logits(reference, TOKENS),
                               atol=1e-5, rtol=0)


def test_hub_id_in_the_local_cache_resolves_offline(make_hf_dir, tiny_llama_cfg, tmp_path,
                                                    monkeypatch):
    """`model.policy: org/name` finds the snapshot `hf download` left in the cache; an id not
    there is one line saying so (nothing is downloaded)."""
    import shutil

    from huggingface_hub import constants

    path, _ = make_hf_dir(tiny_llama_cfg, seed=9)
    repo = tmp_path / "hub" / "models--org--tiny-llama"
    shutil.copytree(path, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_policy("org/tiny-llama") == repo / "snapshots" / ("a" * 40)
    model = load_hf_dir(resolve_policy("org/tiny-llama"))   # (the tiny dir has no tokenizer)
    assert model.cfg.num_layers == tiny_llama_cfg.num_layers
    with pytest.raises(InputError, match="org/other: no such path, and not in the local Hugging "
                                         "Face cache"):
        resolve_policy("org/other")


def test_mistral_with_a_sliding_window_is_refused(tmp_path, tiny_llama_cfg):
    """Mistral-7B-v0.1 attends over a 4096-token window, which this decoder does not; later
    Mistrals (`sliding_window: null`) load as Llama-shaped models."""
    hf = {**tiny_llama_cfg.to_hf(), "model_type": "mistral", "sliding_window": 64}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(InputError, match=r"config\.json: sliding-window attention \(64 tokens\)"):
        load_hf_dir(tmp_path)
    assert DecoderConfig.from_hf({**hf, "sliding_window": None}).model_type == "mistral"
