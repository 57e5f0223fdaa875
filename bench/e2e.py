"""End-to-end agentic RAG throughput: the batched JAX episode runner against the original's
structure, on 64 synthetic questions with SmolLM2-135M, greedy, guided mode.

The reference is how ReasonRAG's code runs a policy: one `transformers` generate call per step
per question, questions one after another, with the same prompts, the same protocol and the same
retriever (so only the policy side differs). Its guided scaffold choice is one forward pass
over the two continuations. JAX is timed on a second pass (the first compiles). Prints progress
lines, then one JSON line:
`{"jax_q_per_s", "reference_q_per_s", "ratio", "same_answers", ...}`.

    JAX_PLATFORMS=cpu .venv/bin/python bench/e2e.py [--questions 64] [--out runs/bench/e2e]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from reasonrag_jax.agent.episodes import EpisodeRunner
from reasonrag_jax.config import load_config
from reasonrag_jax.data.qa import read_qa
from reasonrag_jax.sampling import Completion

ROOT = Path(__file__).resolve().parent.parent


class TransformersPolicy:
    """The original's inference structure: every prompt is its own `generate` call."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def score(self, prompts, continuations):
        import torch

        out = []
        for prompt, conts in zip(prompts, continuations):
            p = self._ids(prompt)
            rows = [p + self._ids(c) for c in conts]
            width = max(map(len, rows))
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            with torch.no_grad():
                logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits
                                         .float(), -1)
            out.append([float(sum(logp[i, t - 1, r[t]] for t in range(len(p), len(r))))
                        for i, r in enumerate(rows)])
        return np.array(out)

    def generate(self, prompts, params, seeds, n=1):
        import torch

        assert n == 1 and params.temperature == 0, "the reference runs greedy only"
        tok, out = self.tokenizer, []
        for prompt in prompts:
            ids = torch.tensor([self._ids(prompt)])
            with torch.no_grad():
                gen = self.model.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=False,
                    max_new_tokens=params.max_new_tokens, stop_strings=list(params.stop),
                    tokenizer=tok, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                    output_scores=True, return_dict_in_generate=True)
            new = gen.sequences[0, ids.shape[1]:].tolist()
            logprobs = [float(torch.log_softmax(s[0].float(), -1)[t])
                        for s, t in zip(gen.scores, new)]
            finish = "length"
            if new and new[-1] == tok.eos_token_id:
                new, logprobs, finish = new[:-1], logprobs[:-1], "eos"
            text, stop = tok.decode(new, skip_special_tokens=True), None
            hits = [(text.find(s), s) for s in params.stop if s in text]
            if hits:
                i, stop = min(hits)
                text, finish = text[: i + len(stop)], "stop"
            out.append([Completion(text, new, logprobs, finish, stop)])
        return out


def load_reference():
    import torch
    from transformers import AutoModelForCausalLM

    from reasonrag_jax.models.weights import embedded_policy_path, load_tokenizer

    path = embedded_policy_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    return TransformersPolicy(model.eval(), load_tokenizer(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "e2e")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "smollm2_cpu.yaml")
    args = ap.parse_args()

    from reasonrag_jax.data.synthetic import write_synthetic
    from reasonrag_jax.models.weights import load_policy
    from reasonrag_jax.retrieval.index import Retriever, build_index
    from reasonrag_jax.sampling import Sampler

    cfg = load_config(args.config, ["agent.mode=guided", "agent.temperature=0.0"])
    data, index = args.out / "data", args.out / "index"
    if not (data / "test.jsonl").exists():
        write_synthetic(data, seed=0)
    if not index.is_dir():
        build_index(data / "corpus.jsonl", index, cfg.retrieval)
    examples = read_qa(data / "test.jsonl")[: args.questions]
    retriever = Retriever.load(index, cfg.retrieval)
    seeds = list(range(len(examples)))

    model, tokenizer = load_policy("embedded", dtype=cfg.model.dtype,
                                   param_dtype=cfg.model.param_dtype)
    runner = EpisodeRunner(Sampler(model, tokenizer, cfg.sampler), retriever, cfg.agent)
    # A first pass compiles every shape the run needs (once per process); the second is timed.
    t0 = time.perf_counter()
    runner.finish(runner.start(examples), 0.0, seeds)
    warm_s = time.perf_counter() - t0
    print(f"jax first pass (with compilation): {warm_s:.1f}s", flush=True)
    t0 = time.perf_counter()
    ours = [r[0] for r in runner.finish(runner.start(examples), 0.0, seeds)]
    jax_s = time.perf_counter() - t0
    steps = sum(len(ep.steps) for ep in ours)
    print(f"jax: {len(ours)} questions, {steps} steps in {jax_s:.1f}s "
          f"({len(ours) / jax_s:.3f} q/s)", flush=True)

    reference = EpisodeRunner(load_reference(), retriever,
                              dataclasses.replace(cfg.agent, batch_size=1))
    theirs, t0 = [], time.perf_counter()
    for i, ex in enumerate(examples):
        theirs += reference.finish(reference.start([ex]), 0.0, [seeds[i]])[0]
        if (i + 1) % 8 == 0:
            print(f"reference: {i + 1}/{len(examples)} questions, "
                  f"{time.perf_counter() - t0:.1f}s", flush=True)
    ref_s = time.perf_counter() - t0

    same = [a.prediction == b.prediction for a, b in zip(ours, theirs)]
    for a, b in zip(ours, theirs):
        if a.prediction != b.prediction:
            print(f"differs on {a.example.id}: jax {a.prediction!r} vs reference "
                  f"{b.prediction!r}", flush=True)
    jax_qps, ref_qps = len(ours) / jax_s, len(theirs) / ref_s
    print(json.dumps({"jax_q_per_s": round(jax_qps, 4), "reference_q_per_s": round(ref_qps, 4),
                      "ratio": round(jax_qps / ref_qps, 2),
                      "same_answers": round(sum(same) / len(same), 4),
                      "questions": len(examples), "jax_s": round(jax_s, 1),
                      "reference_s": round(ref_s, 1), "jax_first_pass_s": round(warm_s, 1)}))


if __name__ == "__main__":
    main()
