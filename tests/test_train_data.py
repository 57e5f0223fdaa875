"""Pairs / SFT readers and encoding: chat template, prompt mask, truncation rule, packed prefix
trees, buckets."""
import json

import numpy as np
import pytest

from reasonrag_jax.io import InputError
from reasonrag_jax.config import bucket
from reasonrag_jax.train.data import (batch_arrays, encode_examples, encode_pairs, encode_sft,
                                      pack, read_pairs, read_sft, truncate)
from reasonrag_jax.train.trainer import batch_rows, fitted_batch_size


@pytest.fixture(scope="module")
def tokenizer():
    from reasonrag_jax.models.weights import embedded_policy_path, gguf_as_hf_dir, load_tokenizer

    return load_tokenizer(gguf_as_hf_dir(embedded_policy_path()))


PAIR = {"instruction": "Be brief.", "input": "Who wrote X?", "prompt": "ignored",
        "chosen": "<query>author of X</query>", "rejected": "<answer>Y</answer>",
        "chosen_action_type": "Query Generation", "rejected_action_type": "Answer Generation",
        "chosen_content": "author of X", "rejected_content": "Y", "layer": 1}


def test_reads_jsonl_and_published_json_list(tmp_path):
    jl = tmp_path / "pairs.jsonl"
    jl.write_text(json.dumps({**PAIR, "question_id": "q1", "chosen_reward": 0.9,
                              "rejected_reward": 0.1}) + "\n")
    lst = tmp_path / "RAG_ProGuide.json"
    lst.write_text(json.dumps([PAIR, {**PAIR, "input": "Who wrote Z?"}], indent=1))
    assert read_pairs(jl)[0] == {k: PAIR[k] for k in ("instruction", "input", "chosen", "rejected")}
    assert [p["input"] for p in read_pairs(lst)] == ["Who wrote X?", "Who wrote Z?"]


@pytest.mark.parametrize("bad,msg", [
    ({"rejected": None}, r"pairs.jsonl:2: field 'rejected' should be str"),
    ({"chosen": "  "}, r"pairs.jsonl:2: field 'chosen' is empty"),
    ({"rejected": PAIR["chosen"]}, r"pairs.jsonl:2: field 'rejected' is identical"),
])
def test_bad_pairs_name_line_and_field(tmp_path, bad, msg):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(PAIR) + "\n" + json.dumps({**PAIR, **bad}) + "\n")
    with pytest.raises(InputError, match=msg):
        read_pairs(path)
    missing = tmp_path / "sft.jsonl"
    missing.write_text(json.dumps({"instruction": "", "output": "a"}) + "\n")
    with pytest.raises(InputError, match=r"sft.jsonl:1: field 'input' is missing"):
        read_sft(missing)


def test_a_pair_is_one_row_prompt_then_chosen_then_rejected(tokenizer):
    enc = encode_pairs(tokenizer, [PAIR], max_length=256)
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote X?"}],
        tokenize=False, add_generation_prompt=True)
    p = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert text.endswith("<|im_start|>assistant\n")
    c, r = (tokenizer(PAIR[side], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for side in ("chosen", "rejected"))
    n = len(p) + len(c) + len(r)
    assert enc.num_slots == 2 and enc.tokens.shape == (1, n) and enc.lengths[0] == n
    assert enc.tokens[0].tolist() == p + c + r
    assert enc.slots[0].tolist() == [-1] * len(p) + [0] * len(c) + [1] * len(r)
    assert tokenizer.decode(enc.tokens[0, enc.slots[0] == 0]) == PAIR["chosen"] + "<|im_end|>"
    assert tokenizer.decode(enc.tokens[0, enc.slots[0] == 1]) == PAIR["rejected"] + "<|im_end|>"
    # both sides continue the prompt: positions restart, the first token of each is predicted
    # from the prompt's last, and the prompt's subtree holds both
    P, C = len(p), len(c)
    assert enc.positions[0].tolist() == list(range(P + C)) + list(range(P, P + len(r)))
    assert enc.sources[0, P] == enc.sources[0, P + C] == P - 1 and enc.sources[0, P + 1] == P
    assert enc.ends[0, P - 1] == n and enc.ends[0, P] == P + C and enc.ends[0, P + C] == n
    assert enc.truncated == 0


def test_truncation_rule():
    prompt, long_c, short_c = list(range(100, 130)), list(range(20)), list(range(5))
    # completion fits with a shortened prompt: the prompt keeps its end, completions are whole
    p, cs, cut = truncate(prompt, [long_c, short_c], max_length=40)
    assert cut and p == prompt[-20:] and cs == [long_c, short_c]
    # completion too long: the prompt keeps max_length // 2 tokens, completions are cut at the end
    p, cs, cut = truncate(prompt, [long_c, short_c], max_length=30)
    assert p == prompt[-15:] and cs == [long_c[:15], short_c]
    assert truncate(prompt, [short_c], 64) == (prompt, [short_c], False)


def test_overlong_pairs_are_counted_not_dropped(tokenizer):
    long = {**PAIR, "input": "word " * 200}
    enc = encode_pairs(tokenizer, [PAIR, long, long], max_length=64)
    assert enc.truncated == 2 and len(enc.tokens) == 3
    # each side of a cut pair is prompt + completion of at most max_length (the longer exactly),
    # as TRL would cut it
    seg = enc.slots[1, :enc.lengths[1]]
    sides = [(seg == -1).sum() + (seg == side).sum() for side in (0, 1)]
    assert max(sides) == 64 and min(sides) > (seg == -1).sum()
    sft = encode_sft(tokenizer, [{"instruction": "", "input": "hi", "output": "x " * 200}], 32)
    assert sft.truncated == 1 and sft.lengths[0] == 32 and (sft.slots[0] == 0).sum() == 16


def test_buckets_and_batches(tokenizer):
    assert bucket(70, (256, 64, 128)) == 128 and bucket(300, (64, 128)) == 384
    enc = encode_pairs(tokenizer, [PAIR, {**PAIR, "input": "word " * 40}], max_length=512)
    assert 32 < enc.lengths[0] <= 64 < enc.lengths[1] <= 128
    rows = batch_arrays(enc, np.array([0, 0]), (32, 64, 128))
    tail = np.arange(enc.lengths[0], 64)
    assert rows["tokens"].shape == (2, 64) and (rows["slots"][0, tail] == -1).all()
    # padding attends to itself only: nothing sees it, and it sees nothing
    assert (rows["ends"][0, tail] == tail + 1).all() and (rows["sources"][0, tail] == tail).all()
    assert batch_arrays(enc, np.array([0, 1]), (32, 64, 128))["tokens"].shape == (2, 128)
    # the data order is a pure function of the step; an epoch is a permutation (the last batch
    # wraps around to stay full)
    rows = np.concatenate([batch_rows(s, 5, 2, 0) for s in range(3)])
    assert len(rows) == 6 and set(rows[:5].tolist()) == {0, 1, 2, 3, 4}
    np.testing.assert_array_equal(batch_rows(4, 5, 2, 0), batch_rows(4, 5, 2, 0))


def test_a_batch_shrinks_to_the_units_when_there_are_fewer_than_a_batch():
    assert fitted_batch_size(4, 1, 2) == 2                 # 2 pairs: one step of 2, not [a b a b]
    assert fitted_batch_size(8, 2, 3) == 4                 # 2 micro-batches (or shards) of 2:
                                                           # one unit still fills the 4th row
    assert fitted_batch_size(8, 4, 3) == 4
    assert fitted_batch_size(4, 1, 10) == 4                # enough units: the configured batch
    assert fitted_batch_size(8, 8, 3) == 8
    rows = batch_rows(0, 2, fitted_batch_size(4, 1, 2), 0)
    assert sorted(rows.tolist()) == [0, 1]


def test_length_grouped_batches_cover_the_epoch_with_similar_lengths():
    lengths = np.random.default_rng(0).permutation(64) * 10      # distinct lengths 0..630
    epoch = [batch_rows(s, 64, 4, 0, lengths, group=4) for s in range(16)]
    assert sorted(np.concatenate(epoch).tolist()) == list(range(64))   # still a permutation
    spans = [np.ptp(lengths[b]) for b in epoch]
    # a batch is 4 length-neighbours among 16 random units: far tighter than random batches
    rand = [np.ptp(lengths[batch_rows(s, 64, 4, 0)]) for s in range(16)]
    assert np.mean(spans) < 0.5 * np.mean(rand)
    np.testing.assert_array_equal(batch_rows(21, 64, 4, 0, lengths, group=4),
                                  batch_rows(21, 64, 4, 0, lengths, group=4))


def ancestors(enc, row):
    """Each token's ancestors (itself included) read from `ends`: what it attends to."""
    n = enc.lengths[row]
    return [[j for j in range(i + 1) if i < enc.ends[row, j]] for i in range(n)]


def test_packed_rows_share_prompt_prefixes_and_keep_each_example_whole():
    """Three examples — two share a prompt prefix, one shares only its first token, one has the
    same prompt as another — packed in one row: every completion token sees exactly its own
    prompt and the completion before it, at the positions it has alone, and each shared
    prompt token is stored once."""
    examples = [([1, 2, 3, 4], [[50, 51]]), ([9, 8], [[60]]), ([1, 2, 7], [[70, 71, 72]]),
                ([1, 2, 3, 4], [[80]])]
    one = encode_examples(examples, pad_id=0)
    packed = encode_examples(examples, pad_id=0, pack_length=64)
    assert len(one.lengths) == 4 and len(packed.lengths) == 1 and packed.num_slots == 4
    assert packed.lengths[0] == 7 + 7 and one.lengths.sum() == 13 + 7   # prompts, completions
    seen = ancestors(packed, 0)
    # every slot's tokens, and what each attends to, match the example in its own row
    for k, (prompt, (completion,)) in enumerate(sorted(examples)):
        alone = encode_examples([(prompt, [completion])], pad_id=0)
        at = np.flatnonzero(packed.slots[0] == k)
        assert packed.tokens[0, at].tolist() == completion
        assert packed.positions[0, at].tolist() == list(range(len(prompt), len(prompt) +
                                                               len(completion)))
        for i, i_alone in zip(at, np.flatnonzero(alone.slots[0] == 0)):
            assert packed.tokens[0, seen[i]].tolist() == alone.tokens[0, ancestors(alone, 0)[
                i_alone]].tolist()
            src = packed.sources[0, i]
            assert packed.tokens[0, src] == alone.tokens[0, alone.sources[0, i_alone]]
    # [1, 2] once for three examples, [1, 2, 3, 4] once for two
    assert packed.tokens[0, :packed.lengths[0]][packed.slots[0, :packed.lengths[0]] < 0].tolist() \
        == [1, 2, 3, 4, 7, 9, 8]


def test_pack_fills_rows_in_prompt_order_up_to_the_length():
    examples = [([5, 1], [[9]]), ([1, 2, 3], [[9]]), ([1, 2, 4], [[9, 9]]), ([7] * 10, [[9]])]
    assert pack(examples, 0) == [[0], [1], [2], [3]]
    # sorted: [1 2 3], [1 2 4], [5 1], [7...]: 4 + 3 (shares [1 2]) = 7 tokens, then 3, then 11
    assert pack(examples, 7) == [[1, 2], [0], [3]]
    assert pack(examples, 10) == [[1, 2, 0], [3]]
    assert pack(examples, 6) == [[1], [2], [0], [3]]          # 4 + 3 > 6, 5 + 3 > 6
