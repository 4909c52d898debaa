"""A real swarm training a model other than the byte-level default: a HuggingFace GPT-2 (its
vocabulary of 50257) on a corpus `loco tokenize` made, exported and loaded back with
transformers alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import FAST, REPO, read_records

pytestmark = pytest.mark.swarm

# FAST without the built-in GPT's shape (a factory's model brings its own) and without the
# text corpus's byte budget (a token file is mapped whole)
NOT_MODEL = [s for s in FAST if not s.startswith(("model.", "data.max_bytes"))]


def _sets(*items: str) -> list[str]:
    return [arg for item in [*NOT_MODEL, *items] for arg in ("--set", item)]


def _outer(out: Path, node: str) -> list[dict]:
    return [r for r in read_records(out / "metrics" / f"{node}.jsonl") if r["event"] == "outer"]


def _swarm(procs, out: Path, config: Path, *sets: str) -> None:
    p = procs.loco("swarm", "--nodes", "2", "--config", str(config), "--out", str(out), *_sets(*sets), log="swarm")
    assert p.wait(timeout=400) == 0, procs.log("swarm")[-4000:]
    last = [_outer(out, n)[-1] for n in ("node0", "node1")]
    assert all(r["status"] == "ok" and r["group_size"] == 2 for r in last), last
    assert last[0]["weights_hash"] == last[1]["weights_hash"]  # the members agree


def _cli(*args: str) -> str:
    """A `loco` command that starts no node, run in this process (no interpreter to start
    and no imports to repeat on a busy machine)."""
    from click.testing import CliRunner

    from loco.node.cli import main

    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _val_loss_of_export(model_dir: Path, run: Path) -> float:
    """The exported folder loaded by transformers alone, on the node's own validation windows."""
    from transformers import AutoModelForCausalLM

    from loco.node.config import build_config
    from loco.node.data import load_corpus, validation_batches

    cfg = build_config(json.loads((run / "config" / "node0.json").read_text()))
    _, val = load_corpus(cfg.data)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()
    losses = []
    with torch.no_grad():
        for x, y in validation_batches(val, cfg.model.block_size, cfg.data.batch_size, cfg.data.val_batches,
                                       cfg.train.seed):
            logits = model(x).logits
            losses.append(float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                  y.reshape(-1))))
    return sum(losses) / len(losses)


def test_a_huggingface_gpt2_trains_on_a_loco_tokenized_corpus_exports_and_loads_without_loco(procs, tmp_path):
    from tokenizers import Tokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in sorted((REPO / "node").glob("*.py")):  # a small real corpus: loco's own source
        (corpus / path.name).write_bytes(path.read_bytes())
    tokens = tmp_path / "tok"
    said = _cli("tokenize", str(corpus), "--out", str(tokens), "--vocab-size", "600")
    meta = json.loads((tokens / "tokens.json").read_text())
    assert meta == {"dtype": "uint16", "vocab_size": 600, "tokenizer": "tokenizer.json"}
    assert "model.vocab_size=600" in said
    ids = np.fromfile(tokens / "tokens.bin", dtype=np.uint16)
    tok = Tokenizer.from_file(str(tokens / "tokenizer.json"))  # the sidecar's tokenizer gives the same ids
    first = sorted(corpus.iterdir())[0].read_text()
    encoded = tok.encode(first).ids
    assert ids[: len(encoded)].tolist() == encoded and tok.decode(encoded) == first
    assert int(ids[len(encoded)]) == tok.token_to_id("<|endoftext|>")

    config = tmp_path / "hf.toml"  # GPT-2's vocabulary of 50257 over the 600 ids the corpus uses
    config.write_text(f"""
[model]
factory = "loco.hf:causal_lm"
block_size = 32

[model.kwargs.config]
model_type = "gpt2"
vocab_size = 50257
n_positions = 64
n_embd = 32
n_layer = 2
n_head = 2

[data]
path = "{tokens / 'tokens.bin'}"
""")
    out = tmp_path / "run"
    _swarm(procs, out, config, "train.rounds=2", "data.batch_size=4")
    start = next(r for r in read_records(out / "metrics" / "node0.jsonl") if r["event"] == "start")
    last = _outer(out, "node0")[-1]
    assert last["val_loss"] < start["val_loss"] - 0.3  # it learnt
    model_dir = tmp_path / "model"
    assert "(huggingface)" in _cli("export", str(out), "--out", str(model_dir))
    assert json.loads((model_dir / "config.json").read_text())["vocab_size"] == 50257
    assert _val_loss_of_export(model_dir, out) == pytest.approx(last["val_loss"], rel=1e-5)
