"""Config: defaults, files, --set overrides, and errors that name the key."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from loco.node.cli import main
from loco.node.config import ConfigError, load_config


def test_defaults_are_valid():
    cfg = load_config()
    assert cfg.optim.algorithm == "diloco"
    assert cfg.optim.outer_lr == 0.7 and cfg.optim.outer_momentum == 0.9 and cfg.optim.nesterov
    assert 20 <= cfg.optim.inner_steps <= 50


def test_file_and_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[optim]\ninner_steps = 40\n[swarm]\nrun_id = "exp"\n')
    cfg = load_config(f, ["optim.inner_steps=25", "swarm.initial_peers=['/ip4/1.2.3.4/tcp/5']",
                          "node.listen_host=0.0.0.0", "node.announce_host=10.0.0.2"])
    assert cfg.optim.inner_steps == 25
    assert cfg.swarm.run_id == "exp"
    assert cfg.swarm.initial_peers == ["/ip4/1.2.3.4/tcp/5"]
    assert cfg.node.announce_host == "10.0.0.2"


@pytest.mark.parametrize("override, message", [
    ("optim.inner_stepz=5", "optim.inner_stepz: unknown key"),
    ("bogus.x=1", "bogus: unknown key"),
    ("optim.inner_steps='many'", "optim.inner_steps"),
    ("optim.inner_steps=0", "optim.inner_steps"),
    ("optim.algorithm='sgd'", "optim.algorithm"),
    ("model.n_embd=130", "n_embd (130) must be divisible by n_head"),
    ("node.listen_host=0.0.0.0", "announce_host"),
    ("noequals", "expected section.key=value"),
    ("compression.codec='zip'", "compression.codec"),
    ("compression.density=0", "compression.density"),
    ("optim.noloco.group_size=1", "optim.noloco.group_size"),
    ("optim.co2.staleness='none'", "optim.co2.staleness"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


@pytest.mark.parametrize("overrides, message", [
    (["compression.lgreco.enabled=true"], "lgreco needs a codec with levels"),
    (["compression.lgreco.enabled=true", "compression.codec='int4'", "optim.algorithm='noloco'"],
     "lgreco works with optim.algorithm diloco or co2"),
    (["optim.algorithm='streaming_diloco'", "optim.inner_steps=10", "optim.streaming.fragments=2",
      "optim.streaming.overlap=5"], "streaming.overlap (5) must be below"),
    (["optim.algorithm='streaming_diloco'", "optim.inner_steps=2", "optim.streaming.fragments=3"],
     "must not exceed inner_steps"),
    (["node.rank_exchange='leader'", "optim.algorithm='noloco'"], "node.rank_exchange = 'leader' changes nothing"),
    (["node.rank_exchange='sideways'"], "node.rank_exchange"),
    # a pipeline would silently ignore these: each is named
    (["pipeline.stages=2", "compression.codec='int8'", "compression.lgreco.enabled=true", "optim.algorithm='noloco'",
      "train.precision='bf16'"], "pipeline.stages = 2 does not use optim.algorithm, train.precision, compression.lgreco:"),
    (["pipeline.stages=2", "train.max_tokens=1000", "optim.inner_steps=5", "train.log_every=3"],
     "does not use optim.inner_steps, train.max_tokens, train.log_every:"),
    (["pipeline.split='loco.hf:gpt2_parts'"], "split cuts a model into pipeline stages: it needs stages >= 2"),
    (["pipeline.wire_dtype='bfloat16'"], "wire_dtype is how activations travel between pipeline stages"),
    (["pipeline.stages=2", "pipeline.sync='diloco'", "pipeline.replica_exchange='collective'"],
     "replica_exchange is how replicas average every iteration's gradients: it needs sync = 'every_step'"),
    (["pipeline.stages=2", "model.factory='loco.hf:causal_lm'", "model.computes_loss=true"],
     "does not use model.computes_loss"),
])
def test_combinations_that_cannot_work_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_bad_file_is_reported(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[optim\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_swarm_key_from_environment(monkeypatch):
    monkeypatch.setenv("LOCO_SWARM_KEY", "s3cret")
    assert load_config().swarm.key == "s3cret"


def test_cli_help_and_version():
    runner = CliRunner()
    assert "loco" in runner.invoke(main, ["--version"]).output
    for args in (["--help"], ["node", "--help"], ["node", "start", "--help"], ["swarm", "--help"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0 and "Usage" in result.output


def test_cli_rejects_bad_config_before_starting_anything():
    result = CliRunner().invoke(main, ["node", "start", "--set", "optim.inner_stepz=3"])
    assert result.exit_code != 0
    assert "optim.inner_stepz: unknown key" in result.output


def test_cli_options_are_frozen():
    """Adding or removing a CLI option is a deliberate act: update this list and the README."""
    start = {p.name for p in main.commands["node"].commands["start"].params}
    assert start == {"config", "tokens", "initial_peers", "join_file", "out", "overrides", "node_id", "listen",
                     "announce", "port", "dht_port", "nproc_per_node", "print_join_token", "verbose"}
    assert {p.name for p in main.commands["swarm"].params} == {"nodes", "config", "out", "overrides"}


def test_operator_errors_are_one_line(tmp_path):
    """A damaged join token, a join without the key, a report of an empty folder."""
    result = CliRunner().invoke(main, ["node", "start", "--join", "loco1.bm90IGEgdG9rZW4", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "damaged" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["node", "start", "--initial-peer", "/ip4/127.0.0.1/tcp/9/p2p/X",
                                       "--out", str(tmp_path)], env={"LOCO_SWARM_KEY": ""})
    assert result.exit_code != 0 and "joining a swarm needs its key" in result.output
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code != 0 and "holds no experiment" in result.output


def _key_after_barrier(out: str, barrier, keys) -> None:
    from pathlib import Path

    from loco.node.runtime import with_swarm_key

    barrier.wait(timeout=120)
    keys.put(with_swarm_key(load_config(None), Path(out)).swarm.key)


def test_ranks_started_at_once_with_one_out_all_make_or_read_the_same_swarm_key(tmp_path):
    """torchrun starts every rank of a node with the same --out at the same moment: the first
    to write the node's swarm key wins and every other reads it (one raised FileExistsError)."""
    import multiprocessing as mp

    # forked from a fresh single-threaded server, not from this test process: a fork of a
    # process with threads (the test runner's, earlier tests') can inherit a lock another
    # thread held, and that child never reached the barrier (seen: the test hung for 300 s)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["loco.node.runtime"])
    barrier, found = ctx.Barrier(6), ctx.Queue()
    ranks = [ctx.Process(target=_key_after_barrier, args=(str(tmp_path), barrier, found)) for _ in range(6)]
    for r in ranks:
        r.start()
    try:
        keys = [found.get(timeout=180) for _ in ranks]
    finally:
        for r in ranks:
            r.join(timeout=30)
            if r.is_alive():
                r.kill()
                r.join()
    assert len(set(keys)) == 1 and keys[0]
    assert (tmp_path / "identity" / "swarm.key").read_text().strip() == keys[0]
    assert [p.name for p in (tmp_path / "identity").iterdir()] == ["swarm.key"]  # nothing left aside
