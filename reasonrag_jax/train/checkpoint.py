"""Orbax checkpoints of a training run, and the policy they hold.

A training directory has `policy.json` (decoder config, dtypes, base policy), `tokenizer/`, and
`checkpoints/<step>/` written by an Orbax CheckpointManager: params, optimiser state, and a JSON
record of step, data position and the run's whole config (checked on resume). Orbax writes each
step to a temporary directory and renames it when complete, so a kill never leaves a step that
looks finished.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from reasonrag_jax.io import InputError, write_json_atomic
from reasonrag_jax.models.decoder import Decoder, DecoderConfig
from reasonrag_jax.models.tokenizer import load_tokenizer


def manager(out_dir: Path, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(Path(out_dir).resolve() / "checkpoints", options=options)


def save(mngr: ocp.CheckpointManager, step: int, params: Any, opt_state: Any,
         record: dict[str, Any]) -> None:
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        record=ocp.args.JsonSave(record)))


def restore(mngr: ocp.CheckpointManager, step: int, params: Any, opt_state: Any | None
            ) -> dict[str, Any]:
    """Restore onto the shardings / dtypes of the given (possibly abstract) trees; leaves with no
    sharding (an `eval_shape` model) land on this process's first device, whatever mesh wrote them.
    """
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def abstract(tree):
        def one(x):
            x = ocp.utils.to_shape_dtype_struct(x)
            return x if getattr(x, "sharding", None) is not None else jax.ShapeDtypeStruct(
                x.shape, x.dtype, sharding=local)
        return jax.tree.map(one, tree)

    items = {"params": ocp.args.StandardRestore(abstract(params)),
             "record": ocp.args.JsonRestore()}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardRestore(abstract(opt_state))
    try:
        return dict(mngr.restore(step, args=ocp.args.Composite(**items)))
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise InputError(f"{mngr.directory}/{step}: cannot restore checkpoint ({e})") from None


def write_policy_card(out_dir: Path, cfg: DecoderConfig, tokenizer: Any, base: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    write_json_atomic(out_dir / "policy.json", {"decoder": cfg.to_hf(), "dtype": cfg.dtype,
                                                "param_dtype": cfg.param_dtype, "base": base})


def load_trained_policy(out_dir: str | Path, step: int | None = None, *, dtype: str | None = None,
                        remat: bool = False) -> tuple[Decoder, Any]:
    """(Decoder with the latest — or given — checkpoint's params, tokenizer) of a training dir.

    Params come back in the dtype they were trained in; `dtype` overrides the compute dtype.
    """
    out_dir = Path(out_dir)
    card_file = out_dir / "policy.json"
    if not card_file.is_file():
        raise InputError(f"{out_dir}: not a training directory (no policy.json)")
    try:
        card = json.loads(card_file.read_text())
        cfg = DecoderConfig.from_hf(card["decoder"], dtype=dtype or card["dtype"],
                                    param_dtype=card["param_dtype"], remat=remat)
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{card_file}: not a valid policy card ({type(e).__name__}: {e})") from None
    mngr = manager(out_dir, keep=1, async_save=False)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise InputError(f"{out_dir}/checkpoints: no finished checkpoint")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    params = restore(mngr, step, state.to_pure_dict(), None)["params"]
    mngr.close()
    return nnx.merge(graphdef, params), load_tokenizer(out_dir / "tokenizer")
