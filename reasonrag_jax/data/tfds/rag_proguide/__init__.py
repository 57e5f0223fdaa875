"""TFDS builder `rag_proguide`: the published RAG_ProGuide.json from `manual_dir`."""
from reasonrag_jax.data.tfds.rag_proguide.rag_proguide_dataset_builder import Builder

__all__ = ["Builder"]
