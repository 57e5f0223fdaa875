"""DPO training throughput and peak memory: our jitted step vs TRL `DPOTrainer` on torch CPU.

Same model (SmolLM2-135M-Instruct, float32), the same pairs in the same order (file order, no
shuffling on either side), batch and max length, reference log-probs precomputed on both sides
(not timed), sigmoid loss at β 0.3, AdamW + clipping, the same learning rate at every step (TRL
gets the JAX side's rates as a `LambdaLR`), activations recomputed in the backward pass on both
sides (our `model.remat`, TRL's gradient checkpointing). Every TRL setting that decides what is
computed is set explicitly, not left to TRL's defaults. The pairs have the shape of agent steps:
a long prompt (a question and `--prompt-words` words of retrieved text, ~240 tokens by default)
and short completions (a query or an answer, tens of tokens), none cut by `--seq`. Tokens/s
counts the real tokens of TRL's two rows per pair (prompt + chosen, prompt + rejected) on both
sides; ours packs a pair into one row and computes its prompt once. Each side runs in its own
process so its peak RSS is its own.

`first_loss_abs_diff` compares the first step's loss; the policy equals the reference there, so
both sides should sit at ln 2 (a check that they score the same tokens alike);
`loss_abs_diff_max` compares every step's loss, after the updates too.

    .venv/bin/python bench/dpo.py [--batch 4 --seq 512 --prompt-words 200 --steps 5 --warmup 1]

Prints progress, then one JSON line: jax_tok_s, trl_tok_s, ratio, jax_peak_rss_mb, trl_peak_rss_mb,
first_loss_abs_diff, loss_abs_diff_max, … , isa.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import print_result

WORDS = ("river stone archive lantern harbor meadow signal copper garden violet engine summit "
         "quarry pilot orchard canyon beacon ledger marble falcon").split()


def write_pairs(path: Path, n: int, prompt_words: int) -> None:
    """n agent-step pairs: a question with `prompt_words` words of passage text, a query chosen
    over an early answer."""
    rows = []
    for i in range(n):
        passage = " ".join(WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(prompt_words))
        rows.append({"instruction": "Answer with evidence.",
                     "input": f"Question {i}: which {WORDS[i % len(WORDS)]} is older?\n"
                              f"Passages: {passage}",
                     "chosen": f"So the next query is <query>{WORDS[(i + 1) % len(WORDS)]} "
                               f"{WORDS[(i + 3) % len(WORDS)]} founding year</query>",
                     "rejected": f"So the answer is <answer>{WORDS[(i + 2) % len(WORDS)]}"
                                 "</answer>"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_jax(args) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from reasonrag_jax.cli import DEFAULT_CONFIG
    from reasonrag_jax.config import load_config
    from reasonrag_jax.models.weights import load_policy
    from reasonrag_jax.sharding import global_array, make_mesh
    from reasonrag_jax.train import trainer
    from reasonrag_jax.train.data import batch_arrays, encode_pairs, read_pairs

    total = args.warmup + args.steps
    # The CLI's config with remat on: TRL's DPOConfig defaults to gradient_checkpointing=True.
    cfg = load_config(DEFAULT_CONFIG, [
        f"train.batch_size={args.batch}", f"train.max_length={args.seq}",
        f"train.length_buckets=[{args.seq}]", f"train.max_steps={total}",
        "train.learning_rate=1e-6", "model.remat=true"])
    model, tokenizer = load_policy("embedded", remat=cfg.model.remat)
    pairs = read_pairs(args.pairs_file)
    data = encode_pairs(tokenizer, pairs, args.seq)
    buckets = (int(data.lengths.max()),)      # one shape: a pair's packed row
    assert data.truncated == 0, "no pair may be cut by --seq (TRL would cut it differently)"
    # the real tokens of TRL's two rows per pair: prompt + chosen, prompt + rejected
    completion = (data.slots >= 0).sum(1)
    pair_tokens = 2 * (data.lengths - completion) + completion
    graphdef, state = nnx.split(model)
    optimizer = trainer.make_optimizer(cfg.train, total)
    place = trainer.placement(make_mesh(cfg.mesh), cfg.mesh.rules, state, optimizer)
    params, opt_state = trainer.place_state(jax.tree.map(np.asarray, state.to_pure_dict()),
                                            optimizer, place)
    del model, state
    with tempfile.TemporaryDirectory() as tmp:
        ref = trainer.reference_logps(graphdef, params, data, args.batch, buckets, place,
                                      Path(tmp), "float32")
    step = trainer.make_train_step(graphdef, optimizer, cfg.train, "dpo", place)
    elapsed, losses = 0.0, []
    for s in range(total):
        rows = np.arange(s * args.batch, (s + 1) * args.batch)   # file order, as TRL
        arrays = batch_arrays(data, rows, buckets)
        t0 = time.perf_counter()
        batch = {f: global_array(x[None], place.micro) for f, x in arrays.items()}
        params, opt_state, metrics = step(params, opt_state, batch,
                                          global_array(ref[rows][None], place.micro))
        losses.append(float(metrics["loss"]))
        if s >= args.warmup:
            elapsed += time.perf_counter() - t0
        print(f"[jax] step {s + 1}/{total}: loss {losses[-1]:.4f}, {time.perf_counter() - t0:.2f}s",
              flush=True)
    timed = int(pair_tokens[args.warmup * args.batch:total * args.batch].sum())
    return {"tok_s": timed / elapsed, "timed_tokens": timed, "losses": losses,
            "lrs": [float(trainer.lr_schedule(cfg.train, total)(s)) for s in range(total)],
            "peak_rss_mb": peak_rss_mb()}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from reasonrag_jax.models.weights import embedded_policy_path, gguf_as_hf_dir
    from reasonrag_jax.train.data import read_pairs

    path = gguf_as_hf_dir(embedded_policy_path())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)

    def prompt(p):
        return tokenizer.apply_chat_template(
            [{"role": "system", "content": p["instruction"]},
             {"role": "user", "content": p["input"]}],
            tokenize=False, add_generation_prompt=True)

    rows = [{"prompt": prompt(p), "chosen": p["chosen"], "rejected": p["rejected"]}
            for p in read_pairs(args.pairs_file)]
    total = args.warmup + args.steps
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t0)
            print(f"[trl] step {state.global_step}/{total}: {times[-1]:.2f}s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(
            output_dir=tmp, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
            max_length=args.seq, truncation_mode="keep_start", padding_free=False,
            pad_to_multiple_of=None, loss_type=["sigmoid"], beta=0.3, label_smoothing=0.0,
            precompute_ref_log_probs=True, gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False}, disable_dropout=True,
            train_sampling_strategy="sequential", dataloader_drop_last=False,
            optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
            learning_rate=1e-6, weight_decay=0.0, max_grad_norm=1.0,   # schedule: see below
            max_steps=total, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
            dataloader_num_workers=0, seed=0, bf16=False, fp16=False)
        # Our schedule, step by step (it gives update k the rate a 0-based schedule gives at
        # k + 1; HF's warm-up would start at 0): the JAX side's rates, as a LambdaLR.
        lrs = json.loads(args.lrs)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda k: lrs[min(k, len(lrs) - 1)] / 1e-6)
        dpo = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[Timer()],
                         optimizers=(optimizer, schedule))
        data = list(dpo.train_dataset)
        dpo.train()
    losses = [h["loss"] for h in dpo.state.log_history if "loss" in h]
    assert all(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))
               <= args.seq for r in data), "no TRL row may be cut by --seq"
    pair_tokens = [2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
                   for r in data]
    timed = sum(pair_tokens[args.warmup * args.batch:total * args.batch])
    return {"tok_s": timed / sum(times[args.warmup:]), "timed_tokens": timed,
            "losses": losses, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--seq", type=int, default=512, help="max length (no pair is cut)")
    parser.add_argument("--prompt-words", type=int, default=200,
                        help="words of passage text in each prompt")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps (compilation)")
    parser.add_argument("--side", choices=("jax", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--pairs-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--lrs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        result = (run_jax if args.side == "jax" else run_trl)(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        pairs = Path(tmp) / "pairs.jsonl"
        write_pairs(pairs, args.batch * (args.warmup + args.steps), args.prompt_words)
        for side in ("jax", "trl"):
            print(f"[bench] {side}: batch {args.batch} pairs, max length {args.seq}, "
                  f"{args.steps} timed steps", flush=True)
            env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
            cmd = [sys.executable, __file__, "--side", side, "--pairs-file", str(pairs),
                   *(f"--{k}={getattr(args, k)}" for k in ("batch", "seq", "steps", "warmup"))]
            if side == "trl":
                cmd.append("--lrs=" + json.dumps(results["jax"]["lrs"]))
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = proc.stdout.splitlines()
            print("\n".join(x for x in lines if x.startswith(f"[{side}]")), flush=True)
            result = [x for x in lines if x.startswith("RESULT ")]
            if proc.returncode or not result:
                sys.exit(f"[bench] {side} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            results[side] = json.loads(result[-1][len("RESULT "):])
            print(f"[bench] {side}: {results[side]['tok_s']:.1f} tok/s, peak RSS "
                  f"{results[side]['peak_rss_mb']:.0f} MB, losses {results[side]['losses']}",
                  flush=True)
    jax_r, trl_r = results["jax"], results["trl"]
    if jax_r["timed_tokens"] != trl_r["timed_tokens"]:
        sys.exit(f"[bench] the sides tokenized the pairs differently: {jax_r['timed_tokens']} vs "
                 f"{trl_r['timed_tokens']} timed tokens")
    diffs = [abs(a - b) for a, b in zip(jax_r["losses"], trl_r["losses"], strict=True)]
    print_result({"jax_tok_s": round(jax_r["tok_s"], 1), "trl_tok_s": round(trl_r["tok_s"], 1),
                  "ratio": round(jax_r["tok_s"] / trl_r["tok_s"], 2),
                  "jax_peak_rss_mb": round(jax_r["peak_rss_mb"]),
                  "trl_peak_rss_mb": round(trl_r["peak_rss_mb"]),
                  "first_loss_abs_diff": float(f"{diffs[0]:.3g}"),
                  "loss_abs_diff_max": float(f"{max(diffs):.3g}"),
                  "timed_tokens": jax_r["timed_tokens"], "batch_pairs": args.batch,
                  "max_length": args.seq, "prompt_words": args.prompt_words,
                  "timed_steps": args.steps})


if __name__ == "__main__":
    main()
