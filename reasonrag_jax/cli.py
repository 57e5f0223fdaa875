"""`reasonrag-jax` command line: parse, load the config, call one function.

Every subcommand takes `--config FILE|NAME` and `--set key=value`. User errors (`InputError`)
print one line and exit 2; everything heavy is imported lazily so `--help` is instant. Results go
to stdout, status lines through `logging` to stderr.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from reasonrag_jax import __version__, logs
from reasonrag_jax.config import DEFAULT_CONFIG, Config, load_config, to_dict
from reasonrag_jax.io import InputError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reasonrag-jax", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("--config", default=DEFAULT_CONFIG,
                        help="YAML file, or the name of a shipped config "
                             f"(default: {DEFAULT_CONFIG})")
        sp.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key, e.g. train.beta=0.1")
        return sp

    add("config", "print the resolved config (YAML): the file, then every --set")
    sp = add("synth", "write the embedded synthetic knowledge base and questions")
    sp.add_argument("--out", type=Path, required=True)
    sp = add("index", "embed a FlashRAG corpus and build a ScaNN (or exact) index")
    sp.add_argument("--corpus", type=Path, required=True)
    sp.add_argument("--out", type=Path, required=True)
    sp.add_argument("--from-faiss", type=Path, default=None, metavar="FILE.index",
                    help="take the vectors from a FAISS Flat index instead of embedding "
                         "(needs the `faiss` extra)")
    sp.add_argument("--encoder", default=None,
                    help="the encoder that made those vectors (default: retrieval.encoder)")
    sp = add("eval", "run agentic RAG episodes and score EM / F1 / acc")
    sp.add_argument("--dataset", type=Path, required=True)
    sp.add_argument("--index", type=Path, required=True)
    sp.add_argument("--checkpoint", default=None, help="policy: training dir, HF dir or GGUF")
    sp.add_argument("--out", type=Path, required=True)
    sp = add("stop-choice", "the guided stop-or-search margin of policies on an eval's reasoning states")
    sp.add_argument("--traces", type=Path, required=True, help="an eval run's traces.jsonl")
    sp.add_argument("--checkpoint", action="append", required=True,
                    help="a policy to score (repeat to compare; the first is the reference)")
    sp.add_argument("--out", type=Path, required=True, help="JSON file to write")
    sp = add("generate", "MCTS + SPRE preference pairs (RAG-ProGuide format)")
    sp.add_argument("--dataset", type=Path, required=True)
    sp.add_argument("--index", type=Path, required=True)
    sp.add_argument("--checkpoint", default=None)
    sp.add_argument("--out", type=Path, required=True)
    sp = add("train", "DPO (or SFT with --set train.objective=sft) on a pairs / SFT jsonl")
    sp.add_argument("--pairs", type=Path, required=True)
    sp.add_argument("--init", default=None, help="starting policy (default: model.policy)")
    sp.add_argument("--out", type=Path, required=True)
    sp = add("export", "write a trained checkpoint as a Hugging Face directory")
    sp.add_argument("--checkpoint", required=True)
    sp.add_argument("--out", type=Path, required=True)
    sp = add("demo", "the whole method on the embedded default (Base / SFT / ORL / PRL table)")
    sp.add_argument("--out", type=Path, default=Path("runs/demo"))
    sp.add_argument("--quick", action="store_true", help="small budget (about 8 minutes)")
    sp.add_argument("--preset", help="a `demo.presets` entry of the config (e.g. ablation)")
    return p


def _config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config, args.overrides)
    if getattr(args, "encoder", None):
        cfg.retrieval.encoder = args.encoder
    return cfg


def persistent_compilation_cache() -> None:
    """Keep compiled XLA programs on disk: every demo stage and every re-run of a command builds
    new samplers and train steps of the same shapes, and compiling the unrolled serving decoder
    costs seconds per shape on a CPU."""
    import jax

    from reasonrag_jax.io import cache_root

    jax.config.update("jax_compilation_cache_dir", str(cache_root() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def set_matmul_precision(precision: str) -> None:
    """`model.matmul_precision` for every product this process traces from here on."""
    import jax

    jax.config.update("jax_default_matmul_precision", precision)


def run(args: argparse.Namespace) -> None:
    cfg = _config(args)
    if args.command == "config":
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return
    import jax

    from reasonrag_jax.sharding import maybe_initialize_distributed

    maybe_initialize_distributed()
    logs.setup(lead=jax.process_index() == 0)
    persistent_compilation_cache()
    set_matmul_precision(cfg.model.matmul_precision)
    if args.command in ("train", "generate", "eval"):
        from reasonrag_jax.sharding import mesh_shape

        mesh_shape(cfg.mesh, jax.device_count())  # an impossible mesh fails before any loading
    if args.command == "synth":
        from reasonrag_jax.data.synthetic import write_synthetic

        for name, path in write_synthetic(args.out, seed=cfg.seed).items():
            print(f"{name}: {path}")
    elif args.command == "index":
        from reasonrag_jax.retrieval.index import build_index, build_index_from_faiss

        if args.from_faiss is not None:
            print(build_index_from_faiss(args.from_faiss, args.corpus, args.out, cfg.retrieval))
        else:
            print(build_index(args.corpus, args.out, cfg.retrieval))
    elif args.command == "eval":
        from reasonrag_jax.eval.evaluate import run_eval

        run_eval(cfg, args.dataset, args.index, args.checkpoint, args.out)
    elif args.command == "stop-choice":
        from reasonrag_jax.eval.stop_choice import format_table, run_stop_choice

        print(format_table(run_stop_choice(cfg, args.traces, args.checkpoint, args.out)))
    elif args.command == "generate":
        from reasonrag_jax.mcts.search import run_generate

        run_generate(cfg, args.dataset, args.index, args.out, args.checkpoint)
    elif args.command == "train":
        from reasonrag_jax.train.trainer import run_sft, run_train

        train = run_sft if cfg.train.objective == "sft" else run_train
        train(cfg, args.pairs, args.out, args.init)
    elif args.command == "export":
        from reasonrag_jax.models.policy import export_hf, load_policy

        model, tokenizer = load_policy(args.checkpoint)
        export_hf(model, tokenizer, args.out)
        print(args.out)
    elif args.command == "demo":
        from reasonrag_jax.demo import run_demo

        run_demo(cfg, args.out, quick=args.quick, preset=args.preset, overrides=args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        run(args)
    except InputError as e:
        print(f"reasonrag-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"reasonrag-jax {args.command}: interrupted; re-run the same command to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
