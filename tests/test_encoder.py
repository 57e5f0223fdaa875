"""The Flax MiniLM equals transformers' torch BertModel + the same pooling (embedded weights)."""
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
