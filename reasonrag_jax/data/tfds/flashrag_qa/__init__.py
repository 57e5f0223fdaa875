"""TFDS builder `flashrag_qa`: FlashRAG-format QA jsonl files from `manual_dir`."""
from reasonrag_jax.data.tfds.flashrag_qa.flashrag_qa_dataset_builder import Builder

__all__ = ["Builder"]
