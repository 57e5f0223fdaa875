"""SFT training throughput: prefix-tree packed rows against one record per row, same trainer.

The records are the gold-chain step records of the first `--questions` SFT questions of the
`ablation` preset, built here as `reasonrag-jax demo` builds them (synthetic knowledge base,
index, retrieval). Every step record of a question repeats the system prompt, the question and
the history so far. One record per row, `--batch` records a step, is the layout LLaMA-Factory and
TRL train on (and ours with `train.pack_length` 0); packed, `train.pack_length` `--pack-length`
and `--pack-batch` rows a step, each shared prompt prefix is computed once. Both run one epoch over
the same records with the same jitted train step (SmolLM2-135M, the CPU config: float32, remat),
after an untimed step of every row shape they use compiled it. Tokens/s counts the records' own
tokens (prompt + completion, what one record per row computes) on both sides, so the ratio is
the epoch's time ratio. `loss_rel_diff` compares the token-mean loss over all records at the
initial weights computed both ways (the two layouts must score the records alike).

    .venv/bin/python bench/sft.py [--questions 16 --batch 8 --pack-length 512 --pack-batch 3]

Prints progress, then one JSON line: packed_tok_s, row_tok_s, speedup, tokens and padding of
each layout, loss_rel_diff, peak_rss_mb, isa.
"""
from __future__ import annotations

import argparse
import math
import resource
import tempfile
import time
from pathlib import Path

from common import print_result


def sft_records(questions: int, out: Path) -> tuple[Path, int]:
    """The ablation preset's gold-chain SFT records of its first `questions` SFT questions."""
    from reasonrag_jax.agent.protocol import gold_sft_records
    from reasonrag_jax.cli import DEFAULT_CONFIG
    from reasonrag_jax.config import load_config
    from reasonrag_jax.data.qa import read_qa
    from reasonrag_jax.demo import apply_preset, write_demo_data
    from reasonrag_jax.io import append_jsonl
    from reasonrag_jax.retrieval.index import Retriever, build_index

    cfg = apply_preset(load_config(DEFAULT_CONFIG), "ablation")
    data = write_demo_data(cfg.demo, cfg.seed, out / "data")
    build_index(data["corpus"], out / "index", cfg.retrieval)
    retriever = Retriever.load(out / "index", cfg.retrieval)
    examples = read_qa(data["sft"])[:questions]
    records = [r for ex in examples for r in gold_sft_records(ex, retriever, cfg.agent)]
    append_jsonl(out / "sft.jsonl", records)
    return out / "sft.jsonl", len(examples)


def train_steps(step, params, opt_state, batches, ref, place):
    """One jitted train step per batch of row arrays, each waited for."""
    import jax

    from reasonrag_jax.sharding import global_array

    for rows in batches:
        on_device = {f: global_array(x[None], place.micro) for f, x in rows.items()}
        params, opt_state, metrics = step(params, opt_state, on_device, ref)
        jax.block_until_ready(metrics)
    return params, opt_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=16, help="SFT questions (their records)")
    parser.add_argument("--batch", type=int, default=8, help="records a step, one per row")
    parser.add_argument("--pack-length", type=int, default=512, help="tokens per packed row")
    parser.add_argument("--pack-batch", type=int, default=3, help="packed rows a step")
    args = parser.parse_args()

    import jax
    import numpy as np
    from flax import nnx

    from reasonrag_jax.cli import DEFAULT_CONFIG
    from reasonrag_jax.config import load_config
    from reasonrag_jax.models.policy import load_policy
    from reasonrag_jax.sharding import global_array, make_mesh
    from reasonrag_jax.train import trainer
    from reasonrag_jax.train.data import batch_arrays, encode_examples, pad_id

    with tempfile.TemporaryDirectory() as tmp:
        path, questions = sft_records(args.questions, Path(tmp))
        cfg = load_config(DEFAULT_CONFIG, ["train.objective=sft"])
        tc = cfg.train
        model, tokenizer = load_policy(cfg.model.policy, dtype=cfg.model.dtype,
                                       param_dtype=cfg.model.param_dtype, remat=cfg.model.remat)
        examples, truncated = trainer.load_examples(tokenizer, path, "sft", tc.max_length)
    graphdef, state = nnx.split(model)
    del model
    layouts = {"row": (0, args.batch), "packed": (args.pack_length, args.pack_batch)}
    encoded = {k: encode_examples(examples, pad_id(tokenizer), pack) for k, (pack, _) in
               layouts.items()}
    steps = {k: math.ceil(len(encoded[k].lengths) / batch) for k, (_, batch) in layouts.items()}
    optimizer = trainer.make_optimizer(tc, max(steps.values()))
    place = trainer.placement(make_mesh(cfg.mesh), cfg.mesh.rules, state, optimizer)
    initial = jax.tree.map(np.asarray, state.to_pure_dict())
    del state
    record_tokens = int(encoded["row"].lengths.sum())
    print(f"[bench] {len(examples)} records of {questions} questions ({truncated} cut), "
          f"{record_tokens} tokens; packed rows hold {int(encoded['packed'].lengths.sum())}",
          flush=True)

    result = {}
    for name, (_, batch) in layouts.items():
        enc = encoded[name]
        params, opt_state = trainer.place_state(initial, optimizer, place)
        lp = trainer.row_logps(trainer.make_logps_fn(graphdef, place, enc.num_slots), params, enc,
                               batch, tc.length_buckets, place, "initial loss")
        loss = float(trainer.objective_loss(tc, "sft", lp, enc.slots, 0 * lp)[0])
        step = trainer.make_train_step(graphdef, optimizer, tc, "sft", place)
        zeros = global_array(np.zeros((1, batch, enc.num_slots), np.float32), place.micro)
        batches = [trainer.batch_rows(s, len(enc.lengths), batch, tc.seed, enc.lengths)
                   for s in range(steps[name])]
        arrays = [batch_arrays(enc, rows, tc.length_buckets) for rows in batches]
        warm = {a["tokens"].shape[1]: a for a in arrays}      # one step of every row shape
        params, opt_state = train_steps(step, params, opt_state, warm.values(), zeros, place)
        began = time.perf_counter()
        params, opt_state = train_steps(step, params, opt_state, arrays, zeros, place)
        seconds = time.perf_counter() - began
        slots = sum(a["tokens"].size for a in arrays)
        computed = int(sum(enc.lengths[rows].sum() for rows in batches))
        result[name] = {"tok_s": record_tokens / seconds, "seconds": seconds, "loss": loss,
                        "rows": len(enc.lengths), "steps": steps[name], "slots": slots,
                        "padding": 1 - computed / slots}
        print(f"[bench] {name}: {len(enc.lengths)} rows, {steps[name]} steps of {batch}, "
              f"{seconds:.1f} s ({result[name]['tok_s']:.1f} record tok/s), "
              f"{result[name]['padding']:.1%} of {slots} slots padding, initial loss {loss:.5f}",
              flush=True)
    row, packed = result["row"], result["packed"]
    print_result({"packed_tok_s": round(packed["tok_s"], 1), "row_tok_s": round(row["tok_s"], 1),
                  "speedup": round(packed["tok_s"] / row["tok_s"], 2),
                  "record_tokens": record_tokens, "packed_slots": packed["slots"],
                  "row_slots": row["slots"], "packed_padding": round(packed["padding"], 3),
                  "row_padding": round(row["padding"], 3),
                  "loss_rel_diff": float(f"{abs(packed['loss'] / row['loss'] - 1):.3g}"),
                  "records": len(examples), "questions": questions, "batch": args.batch,
                  "pack_length": args.pack_length, "pack_batch": args.pack_batch,
                  "length_buckets": list(tc.length_buckets),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})


if __name__ == "__main__":
    main()
