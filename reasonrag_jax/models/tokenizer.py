"""Tokenizers of a policy: a Hugging Face directory's `tokenizer.json`, or one built from a GGUF
file's metadata.

transformers reads GGUF tokenizers only through its GGUF integration, which imports torch; the
runtime has no torch, so the GGUF vocabulary, merges, special tokens and chat template are read
here with the `gguf` package and assembled with `tokenizers`. tests/test_tokenizer.py checks the
result tokenises and templates exactly as transformers' GGUF tokenizer does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from reasonrag_jax.io import InputError

# GGUF token types (llama.cpp `llama_token_type`)
_CONTROL, _USER_DEFINED = 3, 4


def _gguf_fields(path: Path) -> dict[str, Any]:
    """`tokenizer.*` metadata of a GGUF file (tensors are not read)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def gguf_tokenizer(path: str | Path) -> Any:
    """A transformers fast tokenizer equal to the one transformers builds from a GGUF file, for
    byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`: SmolLM2, Qwen2, Llama 3)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    meta = _gguf_fields(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise InputError(f"{path}: GGUF tokenizer model {kind!r} is not supported (byte-level BPE, "
                         "'gpt2', is); use the model's Hugging Face directory instead")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_tokens([AddedToken(t, special=ty == _CONTROL, normalized=False)
                    for t, ty in zip(tokens, types) if ty in (_CONTROL, _USER_DEFINED)])

    def special(name: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{name}_token_id")
        return None if i is None else tokens[i]

    if meta.get("tokenizer.ggml.add_bos_token"):
        from tokenizers import processors

        bos = special("bos")
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, meta["tokenizer.ggml.bos_token_id"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=special("bos"), eos_token=special("eos"),
        unk_token=special("unknown"), pad_token=special("padding"),
        chat_template=meta.get("tokenizer.chat_template"))


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a local HF dir or GGUF file; never remote, never remote code."""
    path = Path(path)
    if path.suffix == ".gguf":
        return gguf_tokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
