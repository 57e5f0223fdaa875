"""End-to-end agentic RAG throughput: the JAX episode runner against the original's structure,
on synthetic questions with a SmolLM2-135M policy that searches, greedy, guided mode.

The policy is a short SFT warm-up on gold chains (the demo's recipe), made once and cached under
`--out`, so episodes have the demo's several query / evidence steps (`steps_per_question`).
Peers, both `transformers` on torch with the same threads and device (`--device cuda`: JAX and
torch both on the GPU, both float32 at full precision, or both bfloat16 with `--dtype
bfloat16`), the same prompts, protocol, retriever and exported weights, run in this process
after the JAX side:
- `ratio` — the original's structure (`run_batch` in its pipeline): every round, ONE batched,
  left-padded `generate` call over all active questions (same stop strings and max tokens) and
  ONE batched forward pass scoring the guided scaffolds.
- `ratio_sequential` — one question at a time, one `generate` call per step (on the first
  `--sequential-questions` questions: it is slow; rates are questions per second), with
  transformers' prompt lookup (`prompt_lookup_num_tokens=3`, as the JAX sampler drafts 3
  tokens a step; transformers runs it at batch size 1 only, so the batched peer goes without).
Warm-up is excluded on both sides: JAX runs the whole question set once first (every program
shape the timed pass uses is compiled; `jax_first_pass_s` reports that pass), then drops its
prefix cache and runs again timed; the peers run two questions first.
`same_answers` compares predictions with each peer (`same_answers` with the batched one).

`generate_speedup`: MCTS + SPRE (the demo's search settings) on `--mcts-questions` training
questions, questions per minute with the prefix cache against the same runner with it off
(`sampler.prefix_cache_mb=0`), in this run; `generate_same_trees` checks both wrote the same trees.
`generate_decode_fraction(_no_reuse)` is the share of each search's wall time spent decoding, and
`generate_speedup_outside_decode` the speedup of the rest (prompts read, scored, prefilled; host
code): decoding is the same work in both arms, so that is what reuse itself changes.
Token counts come from the sampler's own counters: `prefill_tokens_per_question` is prompt tokens
computed (not padding, not cached), `padding_fraction` the share of prefill slots that held
padding, `prefix_hit_rate` the share of prompt tokens read from the cache,
`decode_tokens_per_step` the tokens a live row's decode step emitted (1 + drafts kept).

    JAX_PLATFORMS=cpu .venv/bin/python bench/e2e.py [--questions 64] [--out runs/bench/e2e]
    python bench/e2e.py --device cuda [--threads N]
    # A/B of a runner setting: the JAX pass alone (minutes, not the whole bench's 40)
    JAX_PLATFORMS=cpu .venv/bin/python bench/e2e.py --jax-only --set sampler.draft_tokens=1
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import time
from pathlib import Path

import jax
import numpy as np
from common import print_result, use_device

from reasonrag_jax.agent.episodes import EpisodeRunner
from reasonrag_jax.config import load_config
from reasonrag_jax.data.qa import read_qa
from reasonrag_jax.sampling import Completion

ROOT = Path(__file__).resolve().parent.parent


class TransformersPolicy:
    """A `transformers` model behind the runner's sampler interface (greedy only). Log-probs
    are gathered on the model's device and read back once a call, as a GPU needs."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer, self.device = model, tokenizer, model.device

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def score(self, prompts, continuations):
        """One forward pass over every (prompt, continuation) row, right-padded."""
        import torch

        rows = [(i, j, self._ids(p), self._ids(c)) for i, (p, conts) in
                enumerate(zip(prompts, continuations)) for j, c in enumerate(conts)]
        width = max(len(p) + len(c) for *_, p, c in rows)
        ids = torch.tensor([p + c + [0] * (width - len(p) - len(c)) for *_, p, c in rows],
                           device=self.device)
        mask = torch.tensor([[1] * (len(p) + len(c)) + [0] * (width - len(p) - len(c))
                             for *_, p, c in rows], device=self.device)
        # Continuation token t of row r is predicted at position len(prompt) + t - 1.
        row, pos, tok = (torch.tensor(x, device=self.device) for x in zip(*(
            (r, len(p) + t - 1, x) for r, (*_, p, c) in enumerate(rows) for t, x in enumerate(c))))
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=mask).logits[row, pos]
            picked = torch.log_softmax(logits.float(), -1).gather(1, tok[:, None])[:, 0].tolist()
        out = np.full((len(prompts), max(map(len, continuations))), -np.inf)
        k = 0
        for i, j, _, c in rows:
            out[i, j], k = sum(picked[k:k + len(c)]), k + len(c)
        return out

    def generate(self, prompts, params, seeds, n=1):
        """One batched, left-padded `generate` call over every prompt (prompt lookup when
        there is one)."""
        import torch

        assert n == 1 and params.temperature == 0, "the peer runs greedy only"
        tok = self.tokenizer
        ids = [self._ids(p) for p in prompts]
        width = max(map(len, ids))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        batch = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids],
                            device=self.device)
        # Prompt lookup, as the JAX sampler drafts; transformers supports it at batch 1 only.
        lookup = {"prompt_lookup_num_tokens": 3} if len(prompts) == 1 else {}
        with torch.no_grad():
            gen = self.model.generate(
                batch, attention_mask=mask, do_sample=False, max_new_tokens=params.max_new_tokens,
                stop_strings=list(params.stop), tokenizer=tok, eos_token_id=tok.eos_token_id,
                pad_token_id=pad, output_scores=True, return_dict_in_generate=True, **lookup)
            new_ids = gen.sequences[:, width:]
            all_logprobs = torch.log_softmax(torch.stack(gen.scores, 1).float(), -1).gather(
                2, new_ids[:, :len(gen.scores), None])[..., 0].tolist()
        out = []
        for new, logprobs in zip(new_ids.tolist(), all_logprobs):
            finish = "length"
            if tok.eos_token_id in new:
                cut = new.index(tok.eos_token_id)
                new, logprobs, finish = new[:cut], logprobs[:cut], "eos"
            text, stop = tok.decode(new, skip_special_tokens=True), None
            hits = [(text.find(s), s) for s in params.stop if s in text]
            if hits:
                i, stop = min(hits)
                text, finish = text[: i + len(stop)], "stop"
            out.append([Completion(text, new, logprobs, finish, stop)])
        return out


def searching_policy(cfg, data: Path, index: Path, out: Path, questions: int) -> tuple[Path, Path]:
    """The demo's SFT warm-up on gold chains of `questions` training questions (made once) →
    (training dir for JAX, exported Hugging Face dir for transformers)."""
    from reasonrag_jax.agent.protocol import gold_sft_records
    from reasonrag_jax.io import append_jsonl
    from reasonrag_jax.models.policy import load_policy
    from reasonrag_jax.models.weights import export_hf
    from reasonrag_jax.retrieval.index import Retriever
    from reasonrag_jax.train.trainer import run_sft

    records, ckpt, hf = out / "sft.jsonl", out / "sft", out / "sft_hf"
    if not records.exists():
        retriever = Retriever.load(index, cfg.retrieval)
        rows = [r for ex in read_qa(data / "train.jsonl")[:questions]
                for r in gold_sft_records(ex, retriever, cfg.agent)]
        append_jsonl(records, rows)
    sft = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, objective="sft", epochs=cfg.demo.sft_epochs,
        learning_rate=cfg.demo.sft_learning_rate))
    ckpt = run_sft(sft, records, ckpt, None)
    if not hf.is_dir():
        export_hf(*load_policy(str(ckpt)), hf)
    return ckpt, hf


def run_jax(runner: EpisodeRunner, examples, seeds) -> tuple[list, float]:
    t0 = time.perf_counter()
    out = [r[0] for r in runner.finish(runner.start(examples), 0.0, seeds)]
    return out, time.perf_counter() - t0


def search_rate(cfg, runner: EpisodeRunner, examples) -> tuple[float, float, list]:
    """Questions per minute of MCTS + SPRE (warm: two questions searched first), and the share
    of the timed search's wall time spent decoding."""
    from reasonrag_jax.mcts.search import search

    search(runner, examples[:2], cfg.mcts, cfg.seed)
    runner.sampler.stats.reset()
    t0 = time.perf_counter()
    trees = search(runner, examples, cfg.mcts, cfg.seed)
    wall = time.perf_counter() - t0
    return len(examples) / wall * 60, runner.sampler.stats.decode_s / wall, trees


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--sequential-questions", type=int, default=16)
    ap.add_argument("--mcts-questions", type=int, default=24)
    ap.add_argument("--sft-questions", type=int, default=32)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "e2e")
    ap.add_argument("--config", default="smollm2_cpu")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="compute dtype of both sides' policy (trained in float32)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="CPUs for both sides (JAX's pool, torch's threads)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override (repeatable); the SFT policy is made without them")
    ap.add_argument("--jax-only", action="store_true",
                    help="stop after the timed JAX pass: no search, no peers")
    args = ap.parse_args()
    use_device(args.device, args.threads)

    from reasonrag_jax.data.synthetic import write_synthetic
    from reasonrag_jax.mcts.search import search_config
    from reasonrag_jax.models.policy import load_policy
    from reasonrag_jax.retrieval.index import Retriever, build_index
    from reasonrag_jax.sampling import Sampler

    from reasonrag_jax.cli import persistent_compilation_cache, set_matmul_precision

    persistent_compilation_cache()
    base = ["agent.mode=guided", "agent.temperature=0.0"]
    policy_cfg = load_config(args.config, base)         # the SFT policy's: made once, cached
    cfg = load_config(args.config, [*base, *args.set])
    set_matmul_precision(cfg.model.matmul_precision)          # float32 means float32 on a GPU
    data, index = args.out / "data", args.out / "index"
    if not (data / "test.jsonl").exists():
        write_synthetic(data, seed=0)
    if not index.is_dir():
        build_index(data / "corpus.jsonl", index, cfg.retrieval)
    ckpt, hf_dir = searching_policy(policy_cfg, data, index, args.out, args.sft_questions)
    examples = read_qa(data / "test.jsonl")[: args.questions]
    retriever = Retriever.load(index, cfg.retrieval)
    seeds = list(range(len(examples)))
    model, tokenizer = load_policy(str(ckpt), dtype=args.dtype)

    def runner(agent=cfg.agent, **sampler):
        return EpisodeRunner(Sampler(model, tokenizer, dataclasses.replace(cfg.sampler, **sampler)),
                             retriever, agent)

    jax_runner = runner()
    _, first_s = run_jax(jax_runner, examples, seeds)                 # compiles every shape
    print(f"jax first pass (compiling): {first_s:.1f}s", flush=True)
    jax_runner.sampler.index.clear()                                  # the timed pass starts cold
    jax_runner.sampler.stats.reset()
    jax_runner.stats = type(jax_runner.stats)()
    ours, jax_s = run_jax(jax_runner, examples, seeds)
    s, r = jax_runner.sampler.stats, jax_runner.stats
    steps = sum(len(ep.steps) for ep in ours)
    jax_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    breakdown = {"score_s": r.score_s, "generate_s": r.generate_s, "retrieve_s": r.retrieve_s,
                 "host_s": r.host_s, "sampler_prefill_s": s.prefill_s,
                 "sampler_decode_s": s.decode_s, "steps": dict(r.steps),
                 "decode_idle_fraction": s.decode_idle / max(s.decode_idle + s.decode_steps, 1)}
    breakdown = {k: round(v, 3) if isinstance(v, float) else v for k, v in breakdown.items()}
    print(f"jax: {len(ours)} questions, {steps} steps in {jax_s:.1f}s; {json.dumps(breakdown)}",
          flush=True)
    jax_qps = len(ours) / jax_s
    jax_result = {
        "jax_q_per_s": round(jax_qps, 4),
        "steps_per_question": round(steps / len(ours), 2),
        "prefill_tokens_per_question": round(s.computed_tokens / len(ours), 1),
        "padding_fraction": round(s.padding_fraction, 4),
        "prefix_hit_rate": round(s.hit_rate, 4),
        "decode_tokens_per_step": round(s.decode_tokens / max(s.decode_steps, 1), 2),
        "jax_peak_rss_mb": round(jax_rss_mb), "questions": len(examples),
        "jax_s": round(jax_s, 1), "jax_first_pass_s": round(first_s, 1),
        "threads": args.threads, "dtype": args.dtype, "overrides": args.set,
        "device": jax.devices()[0].device_kind}
    if args.jax_only:
        print_result({**jax_result, **{k: v for k, v in breakdown.items() if k != "steps"},
                      "predictions": [ep.prediction for ep in ours]})
        return

    # MCTS + SPRE with and without prefix reuse (the demo's search settings).
    mcts_cfg = search_config(cfg)
    mcts_examples = read_qa(data / "train.jsonl")[-args.mcts_questions:]
    rates, decode_share, trees = {}, {}, {}
    for name, mb in (("reuse", cfg.sampler.prefix_cache_mb), ("no_reuse", 0)):
        rates[name], decode_share[name], trees[name] = search_rate(
            mcts_cfg, runner(mcts_cfg.agent, prefix_cache_mb=mb), mcts_examples)
        print(f"generate ({name}): {rates[name]:.2f} questions/min, "
              f"{decode_share[name]:.1%} of it decoding", flush=True)
    # Reuse changes what is read, not what is decoded: the speedup of the search's time outside
    # decode is what prefix reuse itself bought and, with decode the same in both arms, the most
    # `generate_speedup` can be.
    outside_decode = {k: (1 - decode_share[k]) / rates[k] for k in rates}

    import torch
    from transformers import AutoModelForCausalLM

    from reasonrag_jax.models.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False             # full float32, like the JAX side
    peer_model = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=getattr(torch, args.dtype)).eval().to(args.device)
    peer = TransformersPolicy(peer_model, load_tokenizer(hf_dir))
    batched = EpisodeRunner(peer, retriever, dataclasses.replace(cfg.agent,
                                                                 batch_size=len(examples)))
    batched.finish(batched.start(examples[:2]), 0.0, seeds[:2])      # warm-up
    t0 = time.perf_counter()
    theirs = [x[0] for x in batched.finish(batched.start(examples), 0.0, seeds)]
    batched_s = time.perf_counter() - t0
    print(f"batched transformers: {batched_s:.1f}s", flush=True)
    sequential = EpisodeRunner(peer, retriever, dataclasses.replace(cfg.agent, batch_size=1))
    k = min(args.sequential_questions, len(examples))
    t0 = time.perf_counter()
    one_by_one = [sequential.finish(sequential.start([ex]), 0.0, [seeds[i]])[0][0]
                  for i, ex in enumerate(examples[:k])]
    sequential_s = time.perf_counter() - t0
    print(f"sequential transformers ({k} questions): {sequential_s:.1f}s", flush=True)

    def same(a, b):
        return round(float(np.mean([x.prediction == y.prediction for x, y in zip(a, b)])), 4)

    for a, b in zip(ours, theirs):
        if a.prediction != b.prediction:
            print(f"differs on {a.example.id}: jax {a.prediction!r} vs transformers "
                  f"{b.prediction!r}", flush=True)
    print_result({
        **jax_result,
        "batched_q_per_s": round(len(theirs) / batched_s, 4),
        "sequential_q_per_s": round(k / sequential_s, 4),
        "ratio": round(jax_qps / (len(theirs) / batched_s), 2),
        "ratio_sequential": round(jax_qps / (k / sequential_s), 2),
        "same_answers": same(ours, theirs),
        "same_answers_sequential": same(ours[:k], one_by_one),
        "generate_q_per_min": round(rates["reuse"], 3),
        "generate_q_per_min_no_reuse": round(rates["no_reuse"], 3),
        "generate_speedup": round(rates["reuse"] / rates["no_reuse"], 2),
        "generate_same_trees": trees["reuse"] == trees["no_reuse"],
        "generate_decode_fraction": round(decode_share["reuse"], 3),
        "generate_decode_fraction_no_reuse": round(decode_share["no_reuse"], 3),
        "generate_speedup_outside_decode": round(
            outside_decode["no_reuse"] / outside_decode["reuse"], 2),
        "batched_s": round(batched_s, 1), "sequential_s": round(sequential_s, 1)})


if __name__ == "__main__":
    main()
