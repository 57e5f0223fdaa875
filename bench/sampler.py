"""Sampler throughput: the jitted JAX sampler against `transformers.generate`, SmolLM2-135M.

256-token prompts, 128 new tokens, greedy, batch 1 and 16 (`--batches`); the JAX sampler without
its prefix cache (transformers keeps no KV across calls), as many decode rows as the batch. Both
sides run on the CPU, or both on the GPU with `--device cuda`; both in float32 at full precision
(on a GPU neither side uses TF32: XLA's default would, torch's does not), or both in bfloat16
with `--dtype bfloat16`. transformers runs in a child process, so neither warms the other's
caches or thread pools. Both sides get the same threads: the process is pinned to `--threads` CPUs
before JAX starts (XLA:CPU sizes its thread pool by the CPUs it may run on) and the child
inherits the pinning and sets torch to as many threads; both counts are reported. Both sides
take the best of the same `--repeats` runs for every timing. EOS is ignored on both sides so
every row decodes exactly 128 tokens.

The decode floor is measured in the same run: the policy's weight bytes over the device's copy
bandwidth (STREAM convention: bytes read + bytes written per second). A decode step must read
every weight once; at the largest batch it also reads the KV cache (reported alongside). Also
reported: the step's weight matmuls alone at the largest batch (`decode_matmuls_ms_b16`), the
rate XLA's dots actually stream the weights at — the floor this engine can reach, against the
copy-bandwidth one. Prefill has a compute floor instead: the same weight matmuls on a full
prefill call's rows (`sampler.prefill_tokens`, no output head), as tokens a second
(`prefill_matmuls_tok_s`) and GFLOP/s (`prefill_matmuls_gflops`), against the sampler's
prefill rate at the largest batch (`jax_prefill_tok_s_bN`, which also pays attention, the
admission head and one decode step).

Prints progress lines, then one JSON line:
`{"jax_tok_s_b1", "hf_tok_s_b1", "ratio_b1", "jax_tok_s_b16", "hf_tok_s_b16", "ratio_b16",
"decode_step_ms_b16", "decode_floor_ms_b16", "greedy_match", "jax_threads", "torch_threads",
"repeats", "device", "dtype", "isa"}` (+ breakdown fields; a `_bN` field for every batch N).

    JAX_PLATFORMS=cpu .venv/bin/python bench/sampler.py [--threads N] [--repeats R] [--jax-only]
    .venv/bin/python bench/sampler.py --device cuda --batches 1 16 64 [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import print_result, use_device

PROMPT_LEN, NEW_TOKENS = 256, 128
PASSAGE = ("The river town of {i} grew around a stone bridge built in {y}. Its market sold wool, "
           "salt and dried fish, and every spring the council counted the boats that passed. ")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_prompts(tokenizer, rows: int) -> list[list[int]]:
    """`rows` chat prompts of exactly PROMPT_LEN tokens (left-trimmed long passages)."""
    out = []
    for r in range(rows):
        text = " ".join(PASSAGE.format(i=f"Town{r}{k}", y=1200 + 37 * r + k) for k in range(12))
        chat = [{"role": "user", "content": text + f"\nWrite a short history of Town{r}0."}]
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) >= PROMPT_LEN, len(ids)
        out.append(ids[-PROMPT_LEN:])
    return out


def best_of(repeats: int, fn, *args) -> tuple[float, object]:
    """(fastest wall time of `repeats` calls of fn(*args), the last result)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t)
    return min(times), out


def copy_bandwidth(device: str, nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes per second moved by a large copy (read + write), like STREAM's Copy: a memcpy on the
    CPU, a jitted elementwise copy in the GPU's memory."""
    if device == "cpu":
        src = np.ones(nbytes // 4, np.float32)
        dst = np.empty_like(src)
        return 2 * nbytes / best_of(repeats, np.copyto, dst, src)[0]
    import jax
    import jax.numpy as jnp

    src = jnp.ones(nbytes // 4, jnp.float32)
    negate = jax.jit(jnp.negative)          # reads and writes every byte; XLA cannot elide it
    jax.block_until_ready(negate(src))
    return 2 * nbytes / best_of(repeats, lambda: jax.block_until_ready(negate(src)))[0]


def matmul_step_ms(params: dict, cfg, rows: int, repeats: int = 7, head: bool = True) -> float:
    """One decode step's weight matmuls alone, chained through every layer and the output head
    at `rows` rows: what XLA's dot reaches streaming the weights, the part of a step that no
    change to attention, sampling or the loop can remove. `head=False`: the layers only, as a
    prefill call runs them (it takes logits at few positions)."""
    import jax
    import jax.numpy as jnp

    from reasonrag_jax.models.decoder import dense, logits

    @jax.jit
    def matmuls(params, x):
        for p in params["layers"]:
            heads = dense(x, p["wq"].reshape(x.shape[-1], -1))
            kv = dense(x, p["wk"].reshape(x.shape[-1], -1)) + dense(
                x, p["wv"].reshape(x.shape[-1], -1))
            x = x + dense(heads, p["wo"].reshape(-1, x.shape[-1])) + jnp.mean(kv)
            x = x + dense(jax.nn.silu(dense(x, p["w_gate"])) * dense(x, p["w_up"]), p["w_down"])
        return logits(cfg, params, x[:, None]) if head else x

    x = jnp.ones((rows, cfg.hidden_size), params["embed"].dtype)
    jax.block_until_ready(matmuls(params, x))
    return 1e3 * best_of(repeats, lambda: jax.block_until_ready(matmuls(params, x)))[0]


def hf_child(prompts_file: str, args: argparse.Namespace, model_dir: str) -> None:
    """Runs in the child process: transformers greedy generate, timings + tokens as JSON."""
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False             # full float32, like the JAX side
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, args.dtype), local_files_only=True).eval().to(args.device)
    model.generation_config.eos_token_id = None    # decode exactly NEW_TOKENS, like the JAX side
    model.generation_config.pad_token_id = 0
    prompts = json.loads(Path(prompts_file).read_text())
    def run(ids, new):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new, min_new_tokens=new)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return out

    out = {"threads": torch.get_num_threads()}
    for b in args.batches:
        ids = torch.tensor(prompts[:b], device=args.device)
        run(ids, 2)
        out[f"prefill_s_b{b}"] = best_of(args.repeats, run, ids, 1)[0]
        out[f"total_s_b{b}"], tokens = best_of(args.repeats, run, ids, NEW_TOKENS)
        out[f"tokens_b{b}"] = tokens[:, PROMPT_LEN:].tolist()
        log(f"hf  batch {b}: {b * NEW_TOKENS / out[f'total_s_b{b}']:.1f} tok/s "
            f"(prefill {out[f'prefill_s_b{b}']:.2f} s)")
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeats", type=int, default=2, help="runs per timing, best taken")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="rows per call")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--jax-only", action="store_true",
                    help="skip transformers (its fields are null): a quick decode-floor check")
    ap.add_argument("--hf-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    use_device(args.device, args.threads)        # the transformers child inherits both

    from reasonrag_jax.models.weights import embedded_policy_path, gguf_as_hf_dir
    model_dir = gguf_as_hf_dir(embedded_policy_path())
    if args.hf_child:
        hf_child(args.hf_child[0], args, args.hf_child[1])
        return

    import jax

    from reasonrag_jax.cli import set_matmul_precision
    from reasonrag_jax.config import SamplerConfig
    from reasonrag_jax.models.decoder import ATTENTION_BLOCK
    from reasonrag_jax.models.weights import load_policy
    from reasonrag_jax.sampling import Sampler, SamplingParams

    set_matmul_precision("highest")                 # no TF32 on a GPU, as on the torch side
    model, tokenizer = load_policy(str(model_dir), dtype=args.dtype, param_dtype=args.dtype)
    batches, top = args.batches, max(args.batches)
    prompts = make_prompts(tokenizer, top)
    hf: dict = {}                              # empty with --jax-only: its fields are null
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file = Path(tmp) / "prompts.json"
        prompts_file.write_text(json.dumps(prompts))
        if not args.jax_only:
            log(f"transformers in a child process, {args.threads} threads ...")
            child = subprocess.run(
                [sys.executable, __file__, "--threads", str(args.threads), "--repeats",
                 str(args.repeats), "--device", args.device, "--dtype", args.dtype,
                 "--batches", *map(str, batches), "--hf-child", str(prompts_file),
                 str(model_dir)], check=True, stdout=subprocess.PIPE, text=True)
            hf = json.loads(child.stdout.strip().splitlines()[-1])

    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    first = SamplingParams(max_new_tokens=1, ignore_eos=True)
    res, match = {}, True
    for b in batches:
        # Like transformers.generate: no prompt reuse across calls (a repeat would otherwise
        # find its prompt's KV cached), b decode rows, a cache just long enough, one token a
        # step (no drafts: this compares decode steps; `bench/e2e.py` measures drafting on
        # real episodes).
        sampler = Sampler(model, tokenizer, SamplerConfig(
            max_batch=b, cache_size=-(-(PROMPT_LEN + NEW_TOKENS) // ATTENTION_BLOCK) * ATTENTION_BLOCK,
            prefix_cache_mb=0, draft_tokens=0))
        rows, seeds = prompts[:b], list(range(b))
        sampler.generate_ids(rows, params, seeds)                         # compile
        res[f"prefill_s_b{b}"] = best_of(args.repeats, sampler.generate_ids, rows, first,
                                         seeds)[0]
        res[f"total_s_b{b}"], out = best_of(args.repeats, sampler.generate_ids, rows, params,
                                            seeds)
        tokens = [c[0].token_ids for c in out]
        same = [a == h for a, h in zip(tokens, hf.get(f"tokens_b{b}", []))]
        match &= all(same)
        log(f"jax batch {b}: {b * NEW_TOKENS / res[f'total_s_b{b}']:.1f} tok/s "
            f"(prefill {res[f'prefill_s_b{b}']:.2f} s), greedy rows equal to hf: "
            f"{sum(same)}/{len(same)}")

    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(sampler.params))
    cfg = model.cfg
    # Valid slots read, averaged over the steps.
    kv_bytes = (2 * cfg.num_layers * top * cfg.num_kv_heads * cfg.head_dim
                * jax.numpy.dtype(args.dtype).itemsize * (PROMPT_LEN + NEW_TOKENS // 2))
    bandwidth = copy_bandwidth(args.device)
    floor_ms = 1e3 * weight_bytes / bandwidth
    matmul_ms = matmul_step_ms(sampler.params, cfg, top)
    prefill_rows = SamplerConfig().prefill_tokens
    prefill_matmul_s = matmul_step_ms(sampler.params, cfg, prefill_rows, args.repeats,
                                      head=False) / 1e3
    layer_weights = sum(x.size for x in jax.tree.leaves(sampler.params["layers"]) if x.ndim > 1)

    def step_ms(r, b):
        return 1e3 * (r[f"total_s_b{b}"] - r[f"prefill_s_b{b}"]) / (NEW_TOKENS - 1) if r else None

    def per_s(count, r, key):
        return count / r[key] if r else None

    log(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; weights {weight_bytes / 1e6:.0f} MB -> "
        f"floor {floor_ms:.2f} ms; + mean KV read {kv_bytes / 1e6:.0f} MB -> "
        f"{1e3 * (weight_bytes + kv_bytes) / bandwidth:.2f} ms; weight matmuls alone "
        f"{matmul_ms:.2f} ms ({weight_bytes / matmul_ms / 1e6:.1f} GB/s); "
        f"jax step {step_ms(res, top):.2f} ms at batch {top}; prefill matmuls alone "
        f"{prefill_rows / prefill_matmul_s:.0f} tok/s against the sampler's "
        f"{per_s(top * PROMPT_LEN, res, f'prefill_s_b{top}'):.0f}")
    result: dict = {}
    for b in batches:
        result.update({
            f"jax_tok_s_b{b}": per_s(b * NEW_TOKENS, res, f"total_s_b{b}"),
            f"hf_tok_s_b{b}": per_s(b * NEW_TOKENS, hf, f"total_s_b{b}"),
            f"ratio_b{b}": hf[f"total_s_b{b}"] / res[f"total_s_b{b}"] if hf else None,
            f"decode_step_ms_b{b}": step_ms(res, b),
            f"hf_decode_step_ms_b{b}": step_ms(hf, b),
            f"jax_prefill_tok_s_b{b}": per_s(b * PROMPT_LEN, res, f"prefill_s_b{b}"),
            f"hf_prefill_tok_s_b{b}": per_s(b * PROMPT_LEN, hf, f"prefill_s_b{b}"),
        })
    result.update({
        "greedy_match": bool(match) if hf else None,
        f"decode_floor_ms_b{top}": floor_ms,
        f"decode_floor_with_kv_ms_b{top}": 1e3 * (weight_bytes + kv_bytes) / bandwidth,
        f"decode_matmuls_ms_b{top}": matmul_ms,
        "prefill_matmuls_tok_s": prefill_rows / prefill_matmul_s,
        "prefill_matmuls_gflops": 2 * layer_weights * prefill_rows / prefill_matmul_s / 1e9,
        "copy_gb_s": bandwidth / 1e9,
        "jax_threads": len(os.sched_getaffinity(0)),
        "torch_threads": hf.get("threads"),
        "repeats": args.repeats,
        "device": jax.devices()[0].device_kind,
        "dtype": args.dtype,
    })
    print_result({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()})


if __name__ == "__main__":
    main()
