"""The `loco` command line. Thin: parse, load config, hand over to node.daemon / node.swarm."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import click

from loco.token import parse_token

from .config import ConfigError, load_config


def _version() -> str:
    try:
        return version("loco")
    except PackageNotFoundError:
        return "0.0.0+unknown"


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr,
    )
    for noisy in ("hivemind", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(config: str | None, overrides: tuple[str, ...]):
    try:
        return load_config(config, list(overrides), env=os.environ)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


config_option = click.option("--config", "-c", "config", type=click.Path(dir_okay=False),
                             help="TOML config file (defaults are used for anything it leaves out).")
set_option = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                          help="Override one config value; repeatable. Values are TOML literals.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), prog_name="loco")
def main() -> None:
    """loco: low-communication decentralized training (DiLoCo family) over ZeroMQ and a hivemind DHT."""
    # model.factory = "mymodels:build" names a module beside the user, as `python -m` would
    # find it (a console script's path does not hold the working directory)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


@main.group()
def node() -> None:
    """Run one node daemon."""


@node.command("start")
@config_option
@click.option("--join", "tokens", multiple=True, metavar="TOKEN",
              help="Join the swarm with the token a member printed ('join: ...'): its key and address.")
@click.option("--initial-peer", "initial_peers", multiple=True, metavar="MULTIADDR",
              help="DHT multiaddress of a live node (with swarm.key set, or an insecure swarm); repeatable. "
                   "No --join and no --initial-peer: start a new swarm.")
@click.option("--join-file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Join through the node whose info file this is (OUT/nodes/<id>.json), waiting until it "
                   "exists: a script can start every node at once. Its join token (key and address) is used.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/node", show_default=True,
              help="Output folder: metrics, checkpoints, resolved config. Reusing it resumes the node.")
@set_option
@click.option("--node-id", help="Node id (default: derived from host and --out). Same as --set node.id=...")
@click.option("--listen", help="Address to bind (node.listen_host), e.g. 0.0.0.0.")
@click.option("--announce", help="Address other nodes use to reach this one (node.announce_host): an IP, or a "
              "host name resolved once at start (a container's service name).")
@click.option("--port", type=int, help="ZeroMQ port (node.port; 0 = OS picks).")
@click.option("--dht-port", type=int, help="DHT port (node.dht_port; 0 = OS picks).")
@click.option("--nproc-per-node", type=click.IntRange(1, 64),
              help="Processes of this node, one per GPU (node.nproc_per_node): one swarm member whose ranks "
                   "train together (node.parallel). Under torchrun, torchrun's process count is used instead.")
@click.option("--print-join-token", is_flag=True,
              help="Print the token others join this node with, and exit without starting: its address is "
                   "--announce (or --listen) and --dht-port, its DHT identity the one kept under --out (made now "
                   "if new), so the token holds for every later start with the same command.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def node_start(config, tokens, initial_peers, join_file, out, overrides, node_id, listen, announce, port, dht_port,
               nproc_per_node, print_join_token, verbose):
    """Start a node: join (or start) a swarm, train for the configured budget, exit 0.

    With no --join it starts a new swarm (with a new random key, kept under --out) and
    prints the token other nodes join with. SIGINT/SIGTERM stop it cleanly: the current round is finished or
    abandoned, a checkpoint is written and the node leaves the DHT.
    """
    extra = list(overrides)
    for key, value in (("node.id", node_id), ("node.listen_host", listen), ("node.announce_host", announce),
                       ("node.port", port), ("node.dht_port", dht_port), ("node.nproc_per_node", nproc_per_node)):
        if value is not None:
            extra.append(f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}")
    def joined(tokens: list[str], more_peers: list[str]) -> tuple[str, ...]:
        """The overrides, with the key and the addresses of the tokens and --initial-peer."""
        peers, keyed = [*initial_peers, *more_peers], []
        for token in tokens:
            try:
                key, found = parse_token(token)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--join/--join-file") from None
            keyed.append(f"swarm.key={key!r}")
            peers += found
        return (*extra, *keyed, *(["swarm.initial_peers=[" + ",".join(repr(p) for p in peers) + "]"] if peers else []))

    from .runtime import with_announce_address, with_swarm_key

    cfg = _load(config, joined(list(tokens), []))
    try:
        if not join_file:
            cfg = with_swarm_key(cfg, Path(out))
        cfg = with_announce_address(cfg)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if print_join_token:
        from .runtime import join_token_before_start

        try:
            click.echo(join_token_before_start(cfg, Path(out)))
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        return
    setup_logging(verbose)
    from .checkpoint import CheckpointError
    from .daemon import Node  # torch/hivemind imports: after argument errors are reported

    stop = threading.Event()

    def on_signal(signum, _frame):
        if stop.is_set():  # second signal: stop waiting for a clean shutdown
            raise KeyboardInterrupt
        logging.getLogger("loco").warning("got %s: finishing the round, checkpointing, leaving",
                                          signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    def through_join_file(cfg):
        """The config that joins through --join-file's node, once its file is there."""
        found = _wait_for_join_file(Path(join_file), stop, cfg.swarm.join_timeout_s)
        if found is None:
            raise ConnectionError(f"stopped while waiting for --join-file {join_file}")
        return with_announce_address(with_swarm_key(_load(config, joined([*tokens, *found[0]], found[1])), Path(out)))

    from .rank_launch import launch_ranks, run_rank, under_torchrun

    torchrun = under_torchrun()
    try:
        if torchrun is not None:  # this process is one rank; torchrun started the others
            rank, world = torchrun
            if cfg.node.nproc_per_node not in (1, world):
                raise ConfigError(f"node.nproc_per_node = {cfg.node.nproc_per_node}, but torchrun started "
                                  f"{world} processes: leave it out under torchrun")
            code = run_rank(rank, world, through_join_file(cfg) if join_file else cfg, Path(out))
        elif cfg.node.nproc_per_node > 1:  # the node's ranks start here
            code = launch_ranks(through_join_file(cfg) if join_file else cfg, Path(out), verbose)
        elif cfg.node.parallel != "ddp":
            raise ConfigError(f"node.parallel = {cfg.node.parallel!r} shards the model over a node's processes: "
                              "start it with --nproc-per-node N (node.nproc_per_node) or under torchrun")
        elif cfg.pipeline.stages >= 2:
            from .pipeline import PipelineNode

            code = PipelineNode(through_join_file(cfg) if join_file else cfg, Path(out), stop).run()
        else:  # its model, data and checkpoint load while the node it joins through starts
            code = Node(cfg, Path(out), stop, before_join=through_join_file if join_file else None).run()
    except (ConfigError, ConnectionError, CheckpointError) as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


def _wait_for_join_file(path: Path, stop: threading.Event, timeout_s: float) -> tuple[list[str], list[str]] | None:
    """([join token], []) from a node's info file once the file exists, or ([], its DHT
    addresses) for a node of an insecure swarm (None: stopped meanwhile). A node writes it
    when its DHT and socket are up; there is no event to wait on across processes: polled."""
    deadline = time.monotonic() + timeout_s
    while not stop.wait(0.1):
        if path.exists():
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise click.ClickException(f"--join-file {path}: not a node's info file ({exc})") from None
            if isinstance(info, dict) and isinstance(info.get("join"), str):
                return [info["join"]], []
            maddrs = info.get("maddrs") if isinstance(info, dict) else None
            if isinstance(maddrs, list) and maddrs and all(isinstance(m, str) for m in maddrs):
                return [], maddrs
            raise click.ClickException(f"--join-file {path}: it has neither a join token nor DHT addresses")
        if time.monotonic() > deadline:
            raise click.ClickException(f"--join-file {path} did not appear within swarm.join_timeout_s="
                                       f"{timeout_s:.0f}s (did the node that writes it start?)")
    return None


@main.command()
@click.option("--nodes", "-n", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Number of node processes.")
@config_option
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: runs/swarm-<time>).")
@set_option
def swarm(nodes, config, out, overrides):
    """Run N nodes as separate processes on this machine, show progress, print a summary.

    The first node starts the swarm; the others join it through the DHT. Ctrl-C stops them
    all cleanly; no process is left behind.
    """
    cfg = _load(config, overrides)  # validate before starting anything
    from .swarm import run_swarm

    out_dir = Path(out) if out else Path("runs") / time.strftime("swarm-%Y%m%d-%H%M%S")
    sys.exit(run_swarm(cfg, nodes, out_dir, config, list(overrides)))


@main.command()
@click.argument("experiment", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Report folder (default: runs/<experiment name>-<time>).")
@set_option
def run(experiment, out, overrides):
    """Run every variant of an EXPERIMENT file as a local swarm and write a report.

    Each variant gets the same seeds, data and budget; the network profile and the fault
    schedule are applied to all of them. The report (report.md, PNG plots) lands in --out.
    """
    from .experiment import load_experiment

    try:
        exp = load_experiment(experiment, list(overrides), env=os.environ)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    from .runner import run_experiment

    out_dir = Path(out) if out else Path("runs") / f"{exp.experiment.name}-{time.strftime('%Y%m%d-%H%M%S')}"

    def on_signal(_signum, _frame):  # SIGINT (even if inherited ignored) and SIGTERM: stop the nodes
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    sys.exit(run_experiment(exp, out_dir, experiment))


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
def report(folder):
    """Rebuild FOLDER/report.md and its plots from the metrics alone."""
    from .report import write_report

    folder = Path(folder)
    if not (folder / "experiment.json").exists() and not any(folder.glob("*/metrics/*.jsonl")):
        raise click.ClickException(f"{folder} holds no experiment: no experiment.json and no */metrics/*.jsonl")
    click.echo(write_report(folder))


@main.command("eval-skips")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
def eval_skips(folder):
    """Validation loss of a pipeline run's model with stages left out (FOLDER: its --out).

    One row per set of skipped stages (stage 0 is never skipped), the whole model first;
    also written to FOLDER/skip_eval.json.
    """
    from rich.console import Console
    from rich.table import Table

    from .stages import skip_evaluation

    try:
        rows = skip_evaluation(Path(folder))
    except (ValueError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from None
    (Path(folder) / "skip_eval.json").write_text(json.dumps(rows, indent=2))
    table = Table(title=f"validation loss with stages skipped: {folder}")
    for col in ("skipped stages", "blocks kept", "val loss"):
        table.add_column(col)
    for r in rows:
        table.add_row(",".join(map(str, r["skipped_stages"])) or "-", f"{r['kept_share']:.0%}", f"{r['val_loss']:.4f}")
    Console().print(table)


@main.command()
@click.argument("corpus", required=False, type=click.Path(exists=True))
@click.option("--out", type=click.Path(file_okay=False), default="data/tokens", show_default=True,
              help="Folder for tokens.bin, its sidecar tokens.json and tokenizer.json.")
@click.option("--vocab-size", type=click.IntRange(257, 1 << 24), default=8192, show_default=True,
              help="Vocabulary of the byte-level BPE tokenizer trained on CORPUS.")
@click.option("--max-bytes", type=click.IntRange(1), default=8_000_000, show_default=True,
              help="Text read from CORPUS (files in sorted order).")
def tokenize(corpus, out, vocab_size, max_bytes):
    """Train a byte-level BPE tokenizer on CORPUS (a text file or folder; default: the Python
    standard library's source) and write it tokenized, for data.path = OUT/tokens.bin."""
    from .tokenize import tokenize_corpus

    try:
        made = tokenize_corpus(Path(corpus) if corpus else None, Path(out), vocab_size, max_bytes)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{made.documents} documents -> {made.token_count:,} tokens (vocabulary {made.vocab_size}): "
               f"{made.tokens}, tokenizer {made.tokenizer}")
    click.echo(f"train on it: --set data.path={made.tokens} --set model.vocab_size={made.vocab_size}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Folder for the model (config.json, model.safetensors, loco_export.json).")
def export(run_dir, out):
    """Write RUN_DIR's trained weights (its furthest checkpoint) as a model folder that loads
    without loco: the built-in GPT as a HuggingFace GPT-2 model, a HuggingFace model with
    save_pretrained, any other model as model.safetensors."""
    from .export import export_run

    try:
        made = export_run(Path(run_dir), Path(out))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"exported {made.node}'s weights at round {made.round} ({made.kind}) to {made.out}")


@main.command()
@click.option("--initial-peer", "initial_peers", multiple=True, metavar="MULTIADDR",
              help="DHT multiaddress of any live node of the swarm; repeatable.")
@click.option("--join", "join", default=None, metavar="TOKEN", help="A join token (the swarm's key and addresses).")
@click.option("--run-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="A node's or a swarm's --out folder: its nodes' addresses, key and run id.")
@click.option("--run-id", default=None, help="The swarm's swarm.run_id (default: --run-dir's, else loco).")
@click.option("--once", is_flag=True, help="Print the table once and exit.")
@click.option("--json", "as_json", is_flag=True, help="With --once: one JSON list, a row per node.")
@click.option("--interval", type=click.FloatRange(0.2), default=2.0, show_default=True,
              help="Seconds between refreshes.")
def status(initial_peers, join, run_dir, run_id, once, as_json, interval):
    """Show the swarm's nodes live, as its DHT shows them: rounds, losses, step rates, bytes,
    identities, restarts, stale and departed nodes. Joins the DHT as a client only (it never
    trains and stores nothing); refreshes until Ctrl-C, or --once. The key comes from --join,
    --run-dir or LOCO_SWARM_KEY."""
    from .status import StatusClient, table, target_of

    try:
        target = target_of(list(initial_peers), join, Path(run_dir) if run_dir else None, run_id,
                           os.environ.get("LOCO_SWARM_KEY"))
        client = StatusClient(target)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    except ConnectionError as exc:
        raise click.ClickException(f"cannot reach the swarm's DHT: {exc}") from None
    from rich.console import Console

    title = f"loco swarm {target.run_id!r}"
    console = Console(width=None if sys.stdout.isatty() else 200)  # (a pipe or a log: no wrapping)
    with client:
        if once:
            rows = client.rows()
            if as_json:
                click.echo(json.dumps(rows))
            else:
                console.print(table(rows, title))
            return
        from rich.live import Live

        try:
            with Live(table(client.rows(), title), console=console, auto_refresh=False) as live:
                while True:
                    time.sleep(interval)
                    live.update(table(client.rows(), f"{title} at {time.strftime('%H:%M:%S')}"), refresh=True)
        except KeyboardInterrupt:
            pass


@main.group("config")
def config_group() -> None:
    """The resolved configuration and its keys."""


@config_group.command("show")
@config_option
@set_option
def config_show(config, overrides):
    """Print the configuration a node would run with, as TOML: defaults < --config file <
    LOCO_SECTION__KEY environment variables < --set. Loads back unchanged with --config."""
    from .config import config_to_dict
    from .config_layers import to_toml

    click.echo(to_toml(config_to_dict(_load(config, overrides), redact=True)), nl=False)


@config_group.command("docs")
def config_docs():
    """Print the table of every configuration key (Markdown, as in the README)."""
    from .config_docs import config_table

    click.echo(config_table(), nl=False)


if __name__ == "__main__":
    main()
