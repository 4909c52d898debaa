"""Checkpoints of a sharded node, one file per rank (node/shard_files.py): the shards of a
real FSDP2 model over two gloo processes written and read back, the whole model put
together from the rank files, and the choice of a complete set after a node was stopped
between its ranks' writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from loco.node.checkpoint import CheckpointError, checkpoint_file, load_checkpoint, previous, save_checkpoint
from loco.node.shard_files import assemble_model, complete_set, rank_file


class Tiny(torch.nn.Module):
    """Blocks in a ModuleList (sharded one by one) and a head of 5 rows: two ranks hold 3
    and 2 of them (torch.chunk's uneven split)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)])
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)


def _sharded(seed: int, group) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from loco.node.sharding import shard_model

    torch.manual_seed(seed)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    opt = shard_model(model, opt, group, torch.device("cpu"), lambda: torch.optim.AdamW(model.parameters(), lr=0.01))
    return model, opt


def _whole(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every parameter and AdamW moment, gathered (a collective)."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = p.full_tensor().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{name}.{key}"] = opt.state[p][key].full_tensor().clone()
    return out


def _rank_main(rank: int, folder: str) -> None:
    import torch.distributed as dist

    from loco.node.shard_files import load_local_state, local_state

    folder_path = Path(folder)
    dist.init_process_group("gloo", store=dist.FileStore(str(folder_path / "store"), 2), rank=rank, world_size=2)
    try:
        model, opt = _sharded(0, dist.group.WORLD)
        torch.manual_seed(100 + rank)  # each rank its own batches
        for _ in range(3):
            model(torch.randn(4, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        model(torch.randn(4, 8))  # a forward without a backward (an evaluation): the root stays unsharded
        main = checkpoint_file(folder_path / "checkpoints", "node0")
        save_checkpoint(rank_file(main, rank), local_state(model, opt, "t1", rank, 2))
        expected = _whole(model, opt)
        if rank == 0:
            save_checkpoint(main, {"trainer": {"shards": {"tag": "t1", "ranks": 2}, "step": 3}})
            torch.save({"model": {k: v for k, v in expected.items() if not k.endswith(("_avg", "_sq"))},
                        "all": expected}, folder_path / "expected.pt")
        fresh, fresh_opt = _sharded(1, dist.group.WORLD)  # other weights, no AdamW state
        load_local_state(fresh, fresh_opt, load_checkpoint(rank_file(main, rank)))
        got = _whole(fresh, fresh_opt)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got[key], value), key
        # and it trains on from there exactly as the original does
        torch.manual_seed(7 + rank)
        x = torch.randn(4, 8)
        for m, o in ((model, opt), (fresh, fresh_opt)):
            m(x).square().mean().backward()
            o.step()
        assert all(torch.equal(a, b) for a, b in zip(_whole(model, opt).values(), _whole(fresh, fresh_opt).values(),
                                                     strict=True))
        # neither rank tears gloo down while the other's last all-gather may still be
        # finishing on its sockets (seen once under load: SIGABRT in the rank still in it)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_ranks_shards_round_trip_and_the_rank_files_make_the_whole_model(tmp_path):
    mp.start_processes(_rank_main, args=(str(tmp_path),), nprocs=2, start_method="spawn")
    main = checkpoint_file(tmp_path / "checkpoints", "node0")
    expected = torch.load(tmp_path / "expected.pt")
    whole = assemble_model(main, load_checkpoint(main))
    assert whole.keys() == expected["model"].keys()
    assert all(torch.equal(whole[k], v) for k, v in expected["model"].items())
    assert whole["head.weight"].shape == (5, 8)
    # a model built whole loads it
    Tiny().load_state_dict(whole)


def _write(main: Path, tag: str, ranks: int, rank_tags: dict[int, str]) -> None:
    save_checkpoint(main, {"trainer": {"shards": {"tag": tag, "ranks": ranks}}}, keep=1)
    for r, t in rank_tags.items():
        save_checkpoint(rank_file(main, r), {"tag": t, "model": {"w": torch.full((2,), float(r))}}, keep=1)


def test_a_node_stopped_between_its_ranks_writes_resumes_from_the_previous_complete_set(tmp_path):
    main = checkpoint_file(tmp_path, "node0")
    _write(main, "a", 2, {0: "a", 1: "a"})
    _write(main, "b", 2, {0: "b"})  # rank 1 was killed before it wrote "b"
    state, used, files = complete_set(main, load_checkpoint(main), main, 2)
    assert used == previous(main, 1) and state["trainer"]["shards"]["tag"] == "a"
    assert files == [previous(rank_file(main, 0), 1), rank_file(main, 1)]
    # once rank 1 writes "b" too, "b" is complete
    save_checkpoint(rank_file(main, 1), {"tag": "b"}, keep=1)
    _, used, files = complete_set(main, load_checkpoint(main), main, 2)
    assert used == main and files == [rank_file(main, 0), rank_file(main, 1)]


def test_incomplete_or_other_rank_count_sets_are_one_line_errors(tmp_path):
    main = checkpoint_file(tmp_path, "node0")
    _write(main, "a", 2, {0: "a", 1: "a"})
    with pytest.raises(CheckpointError, match="written by a node of 2 ranks, this one has 3: start it with "
                                              "--nproc-per-node 2"):
        complete_set(main, load_checkpoint(main), main, 3)
    other = checkpoint_file(tmp_path, "node1")
    _write(other, "a", 2, {0: "a", 1: "x"})
    with pytest.raises(CheckpointError, match="no checkpoint of node1.safetensors has every rank's shards"):
        complete_set(other, load_checkpoint(other), other, 2)
