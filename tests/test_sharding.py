"""Mesh and logical rules; a step sharded fsdp × tensor over 8 CPU devices equals one device."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
from jax.sharding import PartitionSpec as P

from reasonrag_jax.config import MeshConfig
from reasonrag_jax.io import InputError
from reasonrag_jax.sharding import logical_to_spec, mesh_shape

RULES = MeshConfig().rules


def test_mesh_shape_fills_one_free_axis_and_refuses_mismatch():
    assert mesh_shape(MeshConfig(), 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    got = mesh_shape(MeshConfig(shape={"fsdp": -1, "tensor": 4}), 8)
    assert got == {"data": 1, "fsdp": 2, "tensor": 4}
    with pytest.raises(InputError, match="needs 4 devices, 8 are available"):
        mesh_shape(MeshConfig(shape={"data": 2, "tensor": 2}), 8)
    with pytest.raises(InputError, match="unknown axis 'model'"):
        mesh_shape(MeshConfig(shape={"model": 2}), 2)
    with pytest.raises(InputError, match="at most one axis"):
        mesh_shape(MeshConfig(shape={"data": -1, "fsdp": -1}), 2)


def test_logical_rules_to_partition_specs():
    spec = logical_to_spec(("layers", "embed", "heads", "head_dim"), RULES)
    assert spec == P(None, "fsdp", "tensor", None)
    assert logical_to_spec(("vocab", "embed"), RULES) == P("tensor", "fsdp")
    assert logical_to_spec(("batch", None), RULES) == P(("data", "fsdp"), None)
    # a mesh axis is used once per array: the second "tensor" dimension stays whole
    assert logical_to_spec(("heads", "mlp"), RULES) == P("tensor", None)


SCRIPT = textwrap.dedent("""
    import dataclasses, json
    import jax, numpy as np
    from flax import nnx
    from reasonrag_jax.config import load_config
    from reasonrag_jax.models.decoder import Decoder, DecoderConfig
    from reasonrag_jax.sharding import make_mesh
    from reasonrag_jax.train import trainer
    from reasonrag_jax.train.data import batch_arrays, encode_examples

    assert jax.device_count() == 8
    cfg = DecoderConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e4, rms_norm_eps=1e-5,
                        tie_word_embeddings=False, qkv_bias=True, max_position_embeddings=64,
                        model_type="qwen2")
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    host = jax.tree.map(np.asarray, state.to_pure_dict())
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 512, (8, 20)).tolist()           # prompt, chosen, rejected
    pairs = encode_examples([(t[:10], [t[10:15], t[15:]]) for t in tokens], pad_id=0)
    rows = {f: x.reshape(2, 4, 24)                            # [accum, rows, T]
            for f, x in batch_arrays(pairs, np.arange(8), (24,)).items()}
    ref = rng.normal(-40, 2, (2, 4, 2)).astype(np.float32)
    out = {}
    for name, shape, devices in (("one", {"data": 1}, jax.devices()[:1]),
                                 ("sharded", {"data": 1, "fsdp": 2, "tensor": 4}, jax.devices())):
        run = load_config(None, ["train.learning_rate=1e-3", "train.warmup_ratio=0",
                                 "train.grad_accum=2", "train.batch_size=4",
                                 "train.weight_decay=0.1"])
        run.mesh.shape = shape
        mesh = make_mesh(run.mesh, devices)
        opt = trainer.make_optimizer(run.train, 10)
        place = trainer.placement(mesh, run.mesh.rules, state, opt)
        params, opt_state = trainer.place_state(host, opt, place)
        step = trainer.make_train_step(graphdef, opt, run.train, "dpo", place)
        g = lambda x, s: trainer.global_array(x, s)
        for _ in range(2):
            params, opt_state, metrics = step(params, opt_state, {
                f: g(x, place.micro) for f, x in rows.items()}, g(ref, place.micro))
        out[name] = {"loss": float(metrics["loss"]), "margin": float(metrics["rewards/margins"]),
                     "params": {k: np.asarray(v).tolist() for k, v in params.items()},
                     "specs": {k: list(v.sharding.spec) for k, v in params.items()},
                     "mu": list(opt_state[1][0].mu["wq"].sharding.spec)}
    print("RESULT" + json.dumps(out))
""")


def test_sharded_step_equals_single_device_step():
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    one, sharded = res["one"], res["sharded"]
    assert sharded["specs"]["wq"] == [None, "fsdp", "tensor", None]
    assert sharded["specs"]["lm_head"] == ["fsdp", "tensor"]
    # 2 KV heads do not split 4 ways: that dimension is replicated, the rest stays sharded
    assert sharded["specs"]["wk"] == [None, "fsdp", None, None]
    assert sharded["mu"] == sharded["specs"]["wq"]
    assert sharded["loss"] == pytest.approx(one["loss"], abs=1e-5)
    assert sharded["margin"] == pytest.approx(one["margin"], abs=1e-5)
    import numpy as np

    for k in one["params"]:
        np.testing.assert_allclose(np.array(sharded["params"][k]), np.array(one["params"][k]),
                                   atol=1e-5, rtol=0, err_msg=k)
