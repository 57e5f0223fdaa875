"""Shipped configs: installed as `reasonrag_jax.configs` (setup.cfg `package_dir`), read by name
through `importlib.resources`, so `--config smollm2_cpu` works outside this repository."""
