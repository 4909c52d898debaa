"""Where config values come from besides the file: environment variables (with their
precedence against the file and --set), "did you mean", `loco config show`, and the
README's table made from the field docstrings."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from loco.node.cli import main
from loco.node.config import Config, ConfigError, config_to_dict, load_config
from loco.node.config_docs import config_table, with_table
from loco.node.config_layers import env_overrides, suggest, without_env_overrides
from loco.node.experiment import load_experiment, node_config

README = Path(__file__).resolve().parent.parent / "README.md"


def test_precedence_is_defaults_file_env_set(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[optim]\ninner_steps = 10\nouter_lr = 0.5\n[train]\nrounds = 3\n")
    env = {"LOCO_OPTIM__INNER_STEPS": "20", "LOCO_TRAIN__ROUNDS": "4", "HOME": "/x"}
    assert load_config(f).optim.inner_steps == 10
    cfg = load_config(f, env=env)
    assert (cfg.optim.inner_steps, cfg.train.rounds, cfg.optim.outer_lr) == (20, 4, 0.5)
    cfg = load_config(f, ["optim.inner_steps=30"], env=env)
    assert (cfg.optim.inner_steps, cfg.train.rounds) == (30, 4)
    assert load_config(env={"LOCO_OPTIM__INNER_STEPS": "20"}).optim.inner_steps == 20  # env over defaults


def test_env_values_are_toml_literals_at_any_depth():
    env = {"LOCO_OPTIM__NOLOCO__GROUP_SIZE": "4", "LOCO_OPTIM__BETAS": "[0.8, 0.9]",
           "LOCO_SWARM__INITIAL_PEERS": "['/ip4/1.2.3.4/tcp/5']", "LOCO_SWARM__RUN_ID": "exp-1",
           "LOCO_NETWORK__LINKS__NODE1__LATENCY_MS": "40"}
    cfg = load_config(env=env)
    assert cfg.optim.noloco.group_size == 4 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.swarm.initial_peers == ["/ip4/1.2.3.4/tcp/5"] and cfg.swarm.run_id == "exp-1"
    assert cfg.network.links["node1"].latency_ms == 40


def test_only_double_underscore_variables_are_config_keys():
    assert env_overrides({"LOCO_SWARM_KEY": "k", "LOCO_X": "1", "PATH": "/bin", "LOCO_TRAIN__SEED": "3"}) == \
        [("LOCO_TRAIN__SEED", "train.seed=3")]
    assert without_env_overrides({"LOCO_SWARM_KEY": "k", "LOCO_TRAIN__SEED": "3"}) == {"LOCO_SWARM_KEY": "k"}
    with pytest.raises(ConfigError, match="LOCO_OPTIM____X: empty key"):
        load_config(env={"LOCO_OPTIM____X": "1"})


@pytest.mark.parametrize("env, message", [
    ({"LOCO_OPTIM__INNER_STEP": "5"},
     r"optim.inner_step: unknown key \(from LOCO_OPTIM__INNER_STEP\) \(did you mean optim.inner_steps\?\)"),
    ({"LOCO_OPTIM__INNER_STEPS": "many"}, r"optim.inner_steps: .*\(from LOCO_OPTIM__INNER_STEPS\)"),
    ({"LOCO_OPTIM__INNER_STEPS__X": "1"}, r"optim.inner_steps: .*\(from LOCO_OPTIM__INNER_STEPS__X\)"),
])
def test_env_errors_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        load_config(env=env)


@pytest.mark.parametrize("override, near", [
    ("optim.inner_step=5", "optim.inner_steps"),
    ("optim.noloco.grup_size=2", "optim.noloco.group_size"),
    ("train.inner_steps=5", "optim.inner_steps"),  # the same name in another section
    ("netwrk.bandwidth='1gbit'", "network"),
    ("network.links.node1.latncy_ms=3", "network.links.node1.latency_ms"),
])
def test_unknown_keys_suggest_the_nearest(override, near):
    with pytest.raises(ConfigError, match=rf"unknown key \(did you mean {near}\?\)"):
        load_config(overrides=[override])


def test_no_suggestion_for_a_key_like_nothing():
    assert suggest(Config, ("optim", "zzzzqqq")) is None
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["optim.zzzzqqq=1"])
    assert "did you mean" not in str(err.value)


def test_config_show_prints_the_resolved_config_which_loads_back(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[optim]\nalgorithm = "noloco"\n[network.links.node1]\nlatency_ms = 5\n')
    result = CliRunner().invoke(main, ["config", "show", "--config", str(f), "--set", "train.rounds=2"],
                                env={"LOCO_OPTIM__INNER_STEPS": "17"})
    assert result.exit_code == 0, result.output
    shown = tomllib.loads(result.output)
    assert shown["optim"]["algorithm"] == "noloco" and shown["optim"]["inner_steps"] == 17
    assert shown["train"]["rounds"] == 2 and "id" not in shown["node"]  # unset keys left out
    again = tmp_path / "shown.toml"
    again.write_text(result.output)
    expected = load_config(f, ["train.rounds=2"], env={"LOCO_OPTIM__INNER_STEPS": "17"})
    assert load_config(again) == expected


def test_config_show_reports_a_bad_variable_in_one_line():
    result = CliRunner().invoke(main, ["config", "show"], env={"LOCO_TRAIN__ROUNDZ": "2"})
    assert result.exit_code != 0
    assert "train.roundz: unknown key (from LOCO_TRAIN__ROUNDZ) (did you mean train.rounds?)" in result.output


EXPERIMENT = """
[experiment]
nodes = 2

[base]
optim = { inner_steps = 10 }

[[variant]]
name = "plain"

[[variant]]
name = "short"
set = { "optim.inner_steps" = 3 }
"""


def test_experiment_env_goes_to_base_and_variants_still_win(tmp_path):
    f = tmp_path / "e.toml"
    f.write_text(EXPERIMENT)
    exp = load_experiment(f, env={"LOCO_OPTIM__INNER_STEPS": "7", "LOCO_TRAIN__ROUNDS": "5"})
    plain, short = exp.variant
    assert node_config(exp, plain, 0, 0.0).optim.inner_steps == 7
    assert node_config(exp, short, 1, 0.0).optim.inner_steps == 3
    assert node_config(exp, short, 1, 0.0).train.rounds == 5


def test_run_set_of_a_node_key_says_it_goes_under_base(tmp_path):
    f = tmp_path / "e.toml"
    f.write_text(EXPERIMENT)
    with pytest.raises(ConfigError, match=r"optim: unknown key of an experiment: node config overrides go under "
                                          r"base\. \(--set base\.optim"):
        load_experiment(f, ["optim.inner_steps=5"])
    assert load_experiment(f, ["base.optim.inner_steps=5"]).base["optim"]["inner_steps"] == 5


def test_readme_table_is_the_one_made_from_the_docstrings():
    text = README.read_text()
    assert with_table(text) == text, "README.md's config table is stale: run python scripts/config_table.py"
    table = config_table()
    for key in ("`node.parallel`", "`optim.noloco.group_size`", "`network.links.<id>`", "`pipeline.eval_every`"):
        assert key in table
    rows = [line for line in table.splitlines()[2:]]
    assert len(rows) == len(set(rows)) > 100


def test_every_config_key_is_documented():
    from loco.node.config_docs import rows

    undocumented = [key for key, _, meaning in rows() if not meaning]
    assert not undocumented


def test_resolved_config_dict_round_trips_through_toml(tmp_path):
    from loco.node.config_layers import to_toml

    cfg = load_config(overrides=["network.cuts=[{peer='node1', start_s=1.0, end_s=2.0}]", "pipeline.stages=0"])
    path = tmp_path / "r.toml"
    path.write_text(to_toml(config_to_dict(cfg)))
    assert load_config(path) == cfg
