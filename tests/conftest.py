"""Shared fixtures: tiny decoder configs, tiny random Hugging Face model dirs, and SmolLM2.

The real SmolLM2 is loaded once per session (from the de-quantised cache of the embedded GGUF);
torch is imported only inside the fixtures that need a reference model.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from reasonrag_jax.cli import set_matmul_precision  # noqa: E402
from reasonrag_jax.config import ModelConfig  # noqa: E402
from reasonrag_jax.models.decoder import DecoderConfig  # noqa: E402

# As every CLI command does: on a GPU the float32 comparisons below compare float32 math.
set_matmul_precision(ModelConfig().matmul_precision)

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=128)


@pytest.fixture(scope="session")
def tiny_llama_cfg() -> DecoderConfig:
    """Llama with tied embeddings, no q/k/v bias."""
    return DecoderConfig(**TINY, rope_theta=10000.0, tie_word_embeddings=True, qkv_bias=False)


@pytest.fixture(scope="session")
def tiny_qwen2_cfg() -> DecoderConfig:
    """Qwen2 with q/k/v bias and an untied LM head."""
    return DecoderConfig(**TINY, rope_theta=1e6, tie_word_embeddings=False, qkv_bias=True,
                         model_type="qwen2")


def make_torch_model(cfg: DecoderConfig, seed: int = 0):
    """A transformers model with every weight random (biases and norms too, unlike HF init)."""
    import torch
    import transformers

    hf = {k: v for k, v in cfg.to_hf().items() if k != "torch_dtype"}
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**hf), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name else 0.0
            p.copy_(base + 0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def make_hf_dir(tmp_path_factory):
    """`make_hf_dir(cfg, seed=0, max_shard_size=None) -> (dir, torch model)`: a saved tiny model."""
    def make(cfg: DecoderConfig, seed: int = 0, max_shard_size: str | None = None):
        model = make_torch_model(cfg, seed)
        out = tmp_path_factory.mktemp(f"hf_{cfg.model_type}")
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(out, safe_serialization=True, **kwargs)
        return Path(out), model
    return make


@pytest.fixture(scope="session")
def smollm2():
    """(Decoder, tokenizer) of the embedded SmolLM2-135M-Instruct, float32."""
    from reasonrag_jax.models.weights import load_policy

    return load_policy("embedded")


@pytest.fixture(scope="session")
def smollm2_torch():
    """transformers' own reading of the embedded GGUF: the independent reference.

    transformers takes ~25 s to read the GGUF, so its result is cached on disk (keyed by the
    transformers version) with the quantizer detached, as a plain float32 HF directory.
    """
    import torch
    import transformers

    from reasonrag_jax.io import atomic_dir
    from reasonrag_jax.models.weights import cache_dir, embedded_policy_path

    path = embedded_policy_path()
    ref = cache_dir(path, f"transformers-{transformers.__version__}")
    if not (ref / "config.json").is_file():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True)
        model.hf_quantizer = None
        del model.config.quantization_config
        with atomic_dir(ref) as tmp:
            model.save_pretrained(tmp)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        ref, dtype=torch.float32, local_files_only=True)
    return model.eval()
