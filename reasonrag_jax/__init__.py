"""reasonrag-jax: ReasonRAG (process-supervised agentic RAG) in JAX/Flax."""
__version__ = "0.1.0"
