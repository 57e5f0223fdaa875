"""The guided first-step choice of a policy: log P("So the next query is <query>") minus
log P("So the answer is <answer>") on each question's first reasoning prompt.

Why: in guided mode that difference decides whether a policy searches at all, and a short SFT
can leave it on either side (the demo's flipped with its forced-answer records), so check it on
training or dev questions before spending evaluation and MCTS on a checkpoint. Every later
reasoning state of an eval run, for several checkpoints at once: `reasonrag-jax stop-choice`.

    python bench/first_choice.py --run runs/demo3 --checkpoint runs/demo3/ckpt/sft --split sft

Prints `{"query_minus_answer": [...], "mean": ..., "searching_fraction": ..., "isa": ...}`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import print_result

from reasonrag_jax.agent import protocol as P
from reasonrag_jax.agent.episodes import runner_from_config
from reasonrag_jax.config import load_config
from reasonrag_jax.data.qa import read_qa
from reasonrag_jax.eval.stop_choice import answer_margins


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a demo run dir (data/, index/)")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--split", default="sft", help="data/<split>.jsonl; never the test split")
    ap.add_argument("--questions", type=int, default=12)
    args = ap.parse_args()
    if args.split == "test":
        raise SystemExit("first_choice: check training or dev questions, not the test split")
    cfg = load_config()
    runner = runner_from_config(cfg, args.checkpoint, args.run / "index")
    examples = read_qa(args.run / "data" / f"{args.split}.jsonl")[:args.questions]
    turns = [P.turn(ex.question, (), cfg.agent.max_retrievals) for ex in examples]  # as the runner
    prompts = [P.render(runner.sampler.tokenizer, t.instruction, t.input) for t in turns]
    diff = -answer_margins(runner.sampler, prompts)
    print_result({"checkpoint": args.checkpoint, "split": args.split,
                  "query_minus_answer": [round(float(d), 3) for d in diff],
                  "mean": round(float(diff.mean()), 3),
                  "searching_fraction": float((diff > 0).mean())})


if __name__ == "__main__":
    main()
