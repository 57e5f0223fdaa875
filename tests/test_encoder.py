"""The Flax MiniLM equals transformers' torch BertModel + the same pooling (embedded weights),
on one device and with a batch's rows split over eight."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from reasonrag_jax.models.encoder import TextEncoder, embedded_encoder_dir

TEXTS = ["Zyper\nZyper is a city in Poumkuquex. It was founded in 1562.",
         "Ada Quill was born in Zyper.",
         "The Voyage\nThe Voyage is a 1961 film directed by Ada Quill. " * 40,   # > 256 tokens
         "who directed the voyage?"]


@pytest.fixture(scope="module")
def torch_bert():
    import transformers

    path = embedded_encoder_dir()
    tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return tok, transformers.BertModel.from_pretrained(str(path), local_files_only=True).eval()


def reference(torch_bert, texts, pooling, normalize):
    import torch

    tok, bert = torch_bert
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = bert(**batch).last_hidden_state
    if pooling == "cls":
        out = h[:, 0]
    else:
        m = batch["attention_mask"][..., None].float()
        out = (h * m).sum(1) / m.sum(1)
    return (torch.nn.functional.normalize(out, dim=-1) if normalize else out).numpy()


@pytest.mark.slow
def test_mean_pooling_matches_transformers(torch_bert):
    enc = TextEncoder(embedded_encoder_dir())
    ours = enc.encode(TEXTS, "passage")
    np.testing.assert_allclose(ours, reference(torch_bert, TEXTS, "mean", True), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    # batch composition (padding to another length and batch size) does not change a row
    np.testing.assert_allclose(enc.encode(TEXTS[1:2], "passage"), ours[1:2], atol=1e-5)


@pytest.mark.slow
def test_cls_pooling_and_prefixes_match_transformers(torch_bert):
    enc = TextEncoder(embedded_encoder_dir(), pooling="cls", normalize=False,
                      query_prefix="query: ", passage_prefix="passage: ")
    np.testing.assert_allclose(enc.encode(TEXTS[:2], "query"),
                               reference(torch_bert, ["query: " + t for t in TEXTS[:2]], "cls", False),
                               atol=1e-4)
    np.testing.assert_allclose(enc.encode(TEXTS[:2], "passage"),
                               reference(torch_bert, ["passage: " + t for t in TEXTS[:2]], "cls", False),
                               atol=1e-4)


EIGHT_DEVICES = textwrap.dedent("""
    import json, sys
    import jax
    from reasonrag_jax.models.encoder import TextEncoder, embedded_encoder_dir
    assert jax.local_device_count() == 8
    emb = TextEncoder(embedded_encoder_dir()).encode(json.loads(sys.argv[1]))
    print("RESULT" + json.dumps(emb.tolist()))
""")


def test_rows_split_over_local_devices_equal_one_device():
    """Four texts pad to eight rows, one per device; the embeddings are the one-device ones."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICES, json.dumps(TEXTS)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.array(json.loads(proc.stdout.split("RESULT", 1)[1]))
    np.testing.assert_allclose(got, TextEncoder(embedded_encoder_dir()).encode(TEXTS), atol=1e-6)
