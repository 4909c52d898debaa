"""A local HuggingFace datasets folder as data.path (the datasets extra)."""

from __future__ import annotations

import datasets  # the test extra installs it
import pytest

from loco.node.config import ConfigError, DataConfig
from loco.node.data import check_corpus, load_corpus


def test_text_and_token_id_folders_with_and_without_splits(tmp_path):
    texts = [f"row {i}: " + "abc " * (i % 7) for i in range(200)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "plain"))
    train, val = load_corpus(DataConfig(path=str(tmp_path / "plain"), val_fraction=0.1))
    assert bytes(train).split(b"\0")[:2] == [t.encode() for t in texts[:2]]  # rows in order, NUL between
    assert bytes(val).split(b"\0")[0] == texts[180].encode()  # the last 10% of the rows

    ids = [[(i * 31 + j) % 50_000 for j in range(100)] for i in range(50)]
    split = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": ids[:40]}),
                                  "validation": datasets.Dataset.from_dict({"input_ids": ids[40:]})})
    split.save_to_disk(str(tmp_path / "tokens"))
    cfg = DataConfig(path=str(tmp_path / "tokens"))
    train, val = load_corpus(cfg)
    assert train.tolist() == sum(ids[:40], []) and val.tolist() == sum(ids[40:], [])
    check_corpus(train, val, 16, 50_000, cfg)
    with pytest.raises(ConfigError, match="outside the model's vocabulary of 256"):
        check_corpus(train, val, 16, 256, cfg)


def test_a_missing_column_or_split_is_a_one_line_error(tmp_path):
    datasets.Dataset.from_dict({"body": ["x" * 50] * 10}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ConfigError, match=r"data.text_column: .* has no column 'text' \(columns: body\)"):
        load_corpus(DataConfig(path=str(tmp_path / "d")))
    train, _ = load_corpus(DataConfig(path=str(tmp_path / "d"), text_column="body", val_fraction=0.2))
    assert bytes(train[:50]) == b"x" * 50
    datasets.DatasetDict({"other": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(tmp_path / "s"))
    with pytest.raises(ConfigError, match=r"has splits \['other'\], none named 'train'"):
        load_corpus(DataConfig(path=str(tmp_path / "s")))
