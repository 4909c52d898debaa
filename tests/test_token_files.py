"""Token files: any vocabulary, the dtype from a sidecar or data.token_dtype, memory-mapped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loco.node.config import ConfigError, DataConfig
from loco.node.data import Sampler, check_corpus, load_corpus
from loco.node.token_files import open_tokens, write_tokens


def test_uint32_ids_round_trip_through_a_sidecar_and_are_checked_against_the_vocabulary(tmp_path):
    ids = (np.arange(50_000, dtype=np.int64) * 7919) % 70_000
    write_tokens(tmp_path / "t.bin", ids, vocab_size=70_000, tokenizer="tokenizer.json")
    meta = json.loads((tmp_path / "t.json").read_text())
    assert meta == {"dtype": "uint32", "vocab_size": 70_000, "tokenizer": "tokenizer.json"}
    cfg = DataConfig(path=str(tmp_path / "t.bin"), val_fraction=0.1)
    train, val = load_corpus(cfg)
    assert np.array_equal(np.concatenate([train, val]), ids) and int(train.max()) > 65_535
    assert open_tokens(tmp_path / "t.bin").tokenizer == tmp_path / "tokenizer.json"
    check_corpus(train, val, 16, 70_000, cfg)
    with pytest.raises(ConfigError, match=r"t.json records a vocabulary of 70000, larger than the model's "
                                          r"vocabulary of 50257"):
        check_corpus(train, val, 16, 50_257, cfg)
    np.save(tmp_path / "t.npy", ids)  # no sidecar: the ids are scanned
    npy = DataConfig(path=str(tmp_path / "t.npy"), val_fraction=0.1)
    with pytest.raises(ConfigError, match=r"^data: token id 6999[0-9] is outside the model's vocabulary of 256$"):
        check_corpus(*load_corpus(npy), 16, 256, npy)
    rows, _ = Sampler(train, 16, 4, seed=1).next_batch()
    assert int(rows.max()) < 70_000


def test_dtype_errors_name_the_sidecar_or_the_key(tmp_path):
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "t.bin")
    (tmp_path / "t.json").write_text(json.dumps({"dtype": "float32"}))
    with pytest.raises(ConfigError, match=r"sidecar .*t.json has dtype 'float32'; expected one of uint16, uint32"):
        load_corpus(DataConfig(path=str(tmp_path / "t.bin")))
    (tmp_path / "t.json").write_text(json.dumps({"dtype": "uint16"}))
    with pytest.raises(ConfigError, match=r"data.token_dtype is 'uint32' but .*t.json records 'uint16'"):
        load_corpus(DataConfig(path=str(tmp_path / "t.bin"), token_dtype="uint32"))
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not JSON"):
        load_corpus(DataConfig(path=str(tmp_path / "t.bin")))
    (tmp_path / "t.json").unlink()
    (tmp_path / "odd.bin").write_bytes(b"\0" * 4002)
    with pytest.raises(ConfigError, match=r"odd.bin is not a token array \(4002 bytes is not a whole number of "
                                          r"uint32 ids\)"):
        load_corpus(DataConfig(path=str(tmp_path / "odd.bin"), token_dtype="uint32"))
    train, _ = load_corpus(DataConfig(path=str(tmp_path / "t.bin"), token_dtype="uint32"))  # stated: used
    assert train.dtype == np.uint32 and len(train) + len(_) == 500


def _rss_anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_a_token_file_far_larger_than_max_bytes_is_mapped_not_read(tmp_path):
    path = tmp_path / "big.bin"
    size = 256 << 20  # 128M uint16 ids
    with path.open("wb") as f:
        block = (np.arange(1 << 22, dtype=np.uint32) % 50_000).astype(np.uint16).tobytes()
        for _ in range(size // len(block)):
            f.write(block)
    cfg = DataConfig(path=str(path))  # data.max_bytes (8 MB) is far below its 256 MB
    before = _rss_anon_bytes()
    train, val = load_corpus(cfg)
    check_corpus(train, val, 64, 50_257, cfg)  # no sidecar: every id is scanned
    sampler = Sampler(train, 64, 8, seed=0)
    for _ in range(20):
        sampler.next_batch()
    assert len(train) + len(val) == size // 2
    assert _rss_anon_bytes() - before < size // 8  # reading it would cost `size` bytes


def test_data_keys_that_would_be_ignored_are_errors(tmp_path):
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "t.bin")
    np.save(tmp_path / "t.npy", np.arange(1000))
    (tmp_path / "a.txt").write_text("hello " * 100)
    cases = [({"path": str(tmp_path / "t.npy"), "token_dtype": "uint32"}, "data.token_dtype applies to a .bin"),
             ({"token_dtype": "uint16"}, "data.token_dtype applies to a .bin token file, not to the default corpus"),
             ({"path": str(tmp_path / "a.txt"), "text_column": "body"}, "data.text_column applies to a HuggingFace"),
             ({"path": str(tmp_path / "t.bin"), "max_bytes": 1000}, "data.max_bytes limits text corpora .* memory-mapped whole")]
    for fields, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_corpus(DataConfig(**fields))
