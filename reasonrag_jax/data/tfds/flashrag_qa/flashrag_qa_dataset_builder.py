"""`flashrag_qa`: every `<split>.jsonl` in `manual_dir` (FlashRAG QA format) becomes a split.

FlashRAG ships its benchmarks (nq, hotpotqa, 2wikimultihopqa, musique, …) as `train.jsonl`,
`dev.jsonl` and `test.jsonl`; point `manual_dir` at one dataset's folder. Lines are checked by
`read_qa`, so a bad file fails with the same one-line error as everywhere else. `metadata` is
free-form per dataset and is kept as a JSON string.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from reasonrag_jax.data.qa import read_qa
from reasonrag_jax.io import InputError

_SPLIT = re.compile(r"^\w+$")


class Builder(tfds.core.GeneratorBasedBuilder):
    """FlashRAG QA sets from local files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put a FlashRAG QA dataset's `<split>.jsonl` files (e.g. train.jsonl, dev.jsonl, "
        "test.jsonl) in `manual_dir`.")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Question answering in FlashRAG's jsonl format.",
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "question": tfds.features.Text(),
                "golden_answers": tfds.features.Sequence(tfds.features.Text()),
                "metadata": tfds.features.Text(doc="the line's `metadata` object as JSON"),
            }),
            homepage="https://github.com/RUC-NLPIR/FlashRAG",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager
                          ) -> dict[str, Iterator[tuple[str, dict[str, Any]]]]:
        manual = Path(os.fspath(dl_manager.manual_dir))
        files = sorted(p for p in manual.glob("*.jsonl") if _SPLIT.match(p.stem))
        if not files:
            raise InputError(f"{manual}: no <split>.jsonl files (e.g. train.jsonl) to build from")
        return {p.stem: self._generate_examples(p) for p in files}

    def _generate_examples(self, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
        for ex in read_qa(path):
            yield ex.id, {"id": ex.id, "question": ex.question,
                          "golden_answers": list(ex.golden_answers),
                          "metadata": json.dumps(ex.metadata, ensure_ascii=False)}
