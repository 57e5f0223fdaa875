"""`python -m reasonrag_jax` is the `reasonrag-jax` command."""
import sys

from reasonrag_jax.cli import main

sys.exit(main())
