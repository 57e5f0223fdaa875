"""The GGUF tokenizer we build from metadata equals transformers' (which needs torch), and the
embedded policy loads with torch absent."""
import subprocess
import sys

import pytest

from reasonrag_jax.models.tokenizer import gguf_tokenizer
from reasonrag_jax.models.weights import embedded_policy_path

TEXTS = ["Hello world", " leading space", "<|im_start|>user\nHi<|im_end|>\n",
         "naïve café 東京 🤖", "a  b\t\tc\n\n\nd   ", "<repo_name>x<file_sep>y<|endoftext|>",
         "12345 3.14159 1,000,000", "", "<query>who directed Lumen?</query>",
         "Don't stop—it's 5 o'clock!"]
CHATS = [[{"role": "user", "content": "What?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"},
          {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}]]


@pytest.mark.slow
def test_gguf_tokenizer_equals_transformers_gguf_tokenizer():
    from transformers import AutoTokenizer

    path = embedded_policy_path()
    ours = gguf_tokenizer(path)
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                        local_files_only=True)
    for text in TEXTS:
        ids = ref(text)["input_ids"]
        assert ours(text)["input_ids"] == ids, text
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    for chat in CHATS:
        for gen in (False, True):
            assert (ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
                    == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.all_special_tokens == ref.all_special_tokens and len(ours) == len(ref)


TORCH_FREE = """
import sys
sys.modules["torch"] = None        # `import torch` now fails, as in a venv without it
from reasonrag_jax.models.tokenizer import load_tokenizer
from reasonrag_jax.models.weights import embedded_policy_path, load_gguf
path = embedded_policy_path()
tok = load_tokenizer(path)
assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).startswith(
    "<|im_start|>system")
model = load_gguf(path)
assert model.embed[...].shape == (49152, 576)
print("ok")
"""


@pytest.mark.slow
def test_embedded_tokenizer_and_weights_load_without_torch():
    r = subprocess.run([sys.executable, "-c", TORCH_FREE], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
