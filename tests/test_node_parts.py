"""Node components without the network: model factory, data, checkpoints."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from loco.node import checkpoint as ckpt
from loco.node.checkpoint_writer import Cadence, CheckpointWriter, private_copy
from loco.node.config import ConfigError, DataConfig, ModelConfig
from loco.node.data import Sampler, load_corpus, node_seed
from loco.node.model import GPT, build_model, unique_parameters
from tests.conftest import wait_until


def test_builtin_gpt_shapes_and_tied_weights():
    model = build_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, block_size=16))
    assert isinstance(model, GPT)
    logits = model(torch.randint(0, 256, (3, 16)))
    assert logits.shape == (3, 16, 256)
    params = unique_parameters(model)
    assert len(params) == len({id(p) for p in params}) < len(list(model.state_dict()))


def test_default_corpus_is_stdlib_source_split_by_file():
    train, val = load_corpus(DataConfig(max_bytes=400_000))
    assert len(train) > 300_000 and len(val) > 10_000
    text = bytes(train[:200_000]).decode("utf-8", errors="replace")
    assert "def " in text and "import " in text
    again_train, again_val = load_corpus(DataConfig(max_bytes=400_000))
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)  # deterministic


def test_user_data_formats(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 500)
    train, val = load_corpus(DataConfig(path=str(tmp_path / "a.txt"), val_fraction=0.1))
    assert len(train) + len(val) == 6000 and bytes(train[:5]) == b"hello"
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i}.txt").write_text(f"document {i} " * 50)
    train, val = load_corpus(DataConfig(path=str(folder), val_fraction=0.2))
    assert len(train) > 0 and len(val) > 0
    tokens = np.arange(10_000, dtype=np.uint16) % 256
    np.save(tmp_path / "t.npy", tokens)
    train, val = load_corpus(DataConfig(path=str(tmp_path / "t.npy"), val_fraction=0.1))
    assert len(train) == 9000 and int(train[300]) == 300 % 256
    tokens.tofile(tmp_path / "t.bin")
    train, _ = load_corpus(DataConfig(path=str(tmp_path / "t.bin"), val_fraction=0.1))
    assert len(train) == 9000
    with pytest.raises(ConfigError, match="does not exist"):
        load_corpus(DataConfig(path=str(tmp_path / "nope")))
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")  # not a whole number of uint16
    (tmp_path / "junk.npy").write_bytes(b"garbage, not numpy")
    np.save(tmp_path / "floats.npy", np.zeros((4, 4), dtype=np.float32))
    for name in ("odd.bin", "junk.npy", "floats.npy"):
        with pytest.raises(ConfigError, match=rf"{name}.*(not a token array|not 1-D integer)") as err:
            load_corpus(DataConfig(path=str(tmp_path / name)))
        assert "\n" not in str(err.value)


def test_samplers_differ_per_node_and_resume_exactly():
    data = np.arange(5000, dtype=np.uint8)
    a = Sampler(data, 16, 4, node_seed(0, "node0"))
    b = Sampler(data, 16, 4, node_seed(0, "node1"))
    assert not torch.equal(a.next_batch()[0], b.next_batch()[0])
    state = a.state_dict()
    expected = a.next_batch()
    c = Sampler(data, 16, 4, 123)
    c.load_state_dict(state)
    got = c.next_batch()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert c.batches_drawn == 2


def test_checkpoint_is_atomic_and_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "ck" / "n.pt"
    ckpt.save_checkpoint(path, {"round": 1, "w": torch.ones(3)})
    assert ckpt.load_checkpoint(path)["round"] == 1

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_checkpoint(path, {"round": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    state = ckpt.load_checkpoint(path)
    assert state["round"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["n.pt"]  # no temp file left behind (nor a .1: keep=1 rotates only when a write succeeds)
    assert ckpt.load_checkpoint(tmp_path / "none.pt") is None


def test_previous_checkpoints_are_kept_and_nan_is_never_written(tmp_path):
    path = tmp_path / "n.pt"
    for r in range(4):
        ckpt.save_checkpoint(path, {"round": r, "w": torch.full((3,), float(r))}, keep=2)
    assert ckpt.load_checkpoint(path)["round"] == 3
    assert [ckpt.load_checkpoint(ckpt.previous(path, n))["round"] for n in (1, 2)] == [2, 1]
    assert not ckpt.previous(path, 3).exists()
    before = path.read_bytes()
    with pytest.raises(ckpt.NonFiniteState, match=r"outer.anchor\[1\]"):
        ckpt.save_checkpoint(path, {"outer": {"anchor": [torch.ones(2), torch.tensor([1.0, float("nan")])]}})
    assert path.read_bytes() == before


@pytest.mark.parametrize("content", [b"", b"garbage", "truncated"])
def test_an_unreadable_checkpoint_is_a_one_line_error_and_stays_as_it_is(tmp_path, content):
    path = tmp_path / "n.pt"
    if content == "truncated":
        ckpt.save_checkpoint(path, {"round": 1, "w": torch.ones(1000)})
        content = path.read_bytes()[:500]
    path.write_bytes(content)
    with pytest.raises(ckpt.CheckpointError, match=r"n\.pt cannot be read") as err:
        ckpt.load_checkpoint(path)
    assert "\n" not in str(err.value)
    assert path.read_bytes() == content


def test_a_truncated_latest_checkpoint_is_moved_aside_and_the_previous_one_used(tmp_path, caplog):
    path = ckpt.checkpoint_file(tmp_path, "n")
    for r in range(3):
        ckpt.save_checkpoint(path, {"round": r, "w": torch.full((3,), float(r))}, keep=2)
    torn = path.read_bytes()[:-40]
    path.write_bytes(torn)
    with caplog.at_level("WARNING", logger="loco.node.checkpoint"):
        state, used = ckpt.load_latest(path)
    assert state["round"] == 1 and used == ckpt.previous(path, 1)
    aside = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1 and aside[0].read_bytes() == torn  # kept, not written over
    assert "cannot be read" in caplog.text and "resuming from n.safetensors.1" in caplog.text
    for p in (ckpt.previous(path, 1), ckpt.previous(path, 2)):
        p.write_bytes(b"junk")
    assert ckpt.load_latest(path) == (None, None)  # nothing readable: the node starts from the swarm


def test_checkpoints_open_with_safetensors_alone_and_never_unpickle(tmp_path):
    from safetensors import safe_open

    model = GPT(ModelConfig(n_layer=1, n_embd=16, n_head=2, block_size=8))
    state = {"trainer": {"model": model.state_dict(), "rng": {"numpy": np.random.get_state()}}, "round": 4,
             "outcomes": {"ok": 3}, "betas": (0.9, 0.95), "ids": {0: "a", 1: None},
             "a": {"b": torch.ones(2)}, "a.b": torch.zeros(2)}  # two paths that print alike
    path = ckpt.checkpoint_file(tmp_path, "n")
    ckpt.save_checkpoint(path, state)
    with safe_open(str(path), framework="pt") as f:
        assert torch.equal(f.get_tensor("trainer.model.tok.weight"), model.tok.weight)
        assert f.metadata()["format"] == "2"
    back = ckpt.load_checkpoint(path)
    assert back["round"] == 4 and back["betas"] == (0.9, 0.95) and back["ids"] == {0: "a", 1: None}
    assert torch.equal(back["a"]["b"], torch.ones(2)) and torch.equal(back["a.b"], torch.zeros(2))
    assert back["trainer"]["rng"]["numpy"][1].dtype == np.uint32
    np.random.set_state(back["trainer"]["rng"]["numpy"])  # usable as it was
    model.load_state_dict(back["trainer"]["model"])

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    legacy = path.with_suffix(".pt")  # a format-1 checkpoint is read through torch.load(weights_only=True)
    torch.save({"format": 1, "round": 2, "w": torch.ones(2), "x": Payload()}, legacy)
    path.unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"n.pt holds objects other than tensors .* not loaded"):
        ckpt.load_checkpoint(path)
    assert not marker.exists()
    torch.save({"format": 1, "round": 2, "rng": np.random.get_state()}, legacy)  # an honest old one: migrated
    assert ckpt.load_checkpoint(path)["round"] == 2


def test_temp_files_of_a_killed_writer_are_removed(tmp_path):
    path = tmp_path / "n.pt"
    ckpt.save_checkpoint(path, {"round": 1})
    stale = [tmp_path / "n.pt.abc123.tmp", tmp_path / "n.pt.x.tmp"]
    for s in stale:
        s.write_bytes(b"partial")
    (tmp_path / "other.pt.y.tmp").write_bytes(b"another node's")
    assert ckpt.remove_stale_temp_files(path) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.pt", "other.pt.y.tmp"]


def test_background_checkpoints_hold_the_submitted_state_the_newest_wins_and_failures_are_reported(tmp_path, monkeypatch):
    path = tmp_path / "n.safetensors"
    failures = []
    writer = CheckpointWriter(path, keep=1, on_error=lambda tag, exc: failures.append((tag, exc)))
    w = torch.zeros(2_000_000)
    for r in range(6):  # faster than the disk: waiting states are replaced by newer ones
        w.fill_(r)
        writer.submit(private_copy({"round": r, "w": w, "rng": (torch.tensor([r]), [r])}), tag=r)
    w.fill_(-1)  # training goes on: what was submitted is a copy
    writer.flush()
    state = ckpt.load_checkpoint(path)
    assert state["round"] == 5 and bool((state["w"] == 5).all()) and state["rng"][0].item() == 5
    assert writer.written + writer.replaced == 6 and writer.written >= 2 and not failures

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    writer.submit(private_copy({"round": 6, "w": w}), tag=6)
    writer.flush()
    monkeypatch.undo()
    assert [(tag, type(exc)) for tag, exc in failures] == [(6, OSError)]
    assert ckpt.load_checkpoint(path)["round"] == 5  # the previous checkpoint stays
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit({"round": 7})


_WRITER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from loco.node.checkpoint_writer import CheckpointWriter, private_copy
    writer = CheckpointWriter(Path(sys.argv[1]), keep=1, on_error=lambda tag, exc: None)
    w = torch.zeros(8_000_000)
    for r in range(10_000):
        w.fill_(r)
        writer.submit(private_copy({"round": r, "w": w}), tag=r)
        writer.flush()
""")


def test_a_process_killed_while_its_checkpoint_is_written_leaves_a_whole_previous_one(tmp_path):
    path = tmp_path / "n.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], start_new_session=True)
    try:
        # killed while a write is under way: a temp file beside two finished checkpoints
        wait_until(lambda: proc.poll() is not None or (path.with_name(path.name + ".1").exists()
                                                       and list(tmp_path.glob("*.tmp"))),
                   120, "a write under way after two finished ones", interval_s=0.01)
        assert proc.poll() is None, "the writer exited"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    state, used = ckpt.load_latest(path)
    assert used == path  # the newest was whole: the rename is the last step of a write
    r = state["round"]
    assert r >= 1 and bool((state["w"] == r).all())  # one round's tensors, none of another's


def test_checkpoint_cadence_by_rounds_and_by_time():
    every_two = Cadence(every=2, interval_s=600)
    assert [every_two.due(r) for r in range(1, 7)] == [False, True, False, True, False, True]
    hourly = Cadence(every=0, interval_s=3600)  # by time: nothing due within the first hour
    assert not any(hourly.due(r) for r in range(1, 50))
    always = Cadence(every=0, interval_s=1e-9)  # an interval shorter than a round: due once the clock moves
    wait_until(lambda: always.due(1), 5, "a checkpoint due")
