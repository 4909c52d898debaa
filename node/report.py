"""Experiment reports, rebuilt from the metrics alone (`loco report DIR`).

OUT/report.md has one row per variant; OUT/val_vs_step.png, val_vs_time.png and
val_vs_bytes.png have one line per variant. Curves are averaged over the nodes that
reported each round; bytes are the swarm's total sent, as counted at the sockets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .metrics import read_metrics


@dataclass
class VariantSummary:
    name: str
    algorithm: str = "?"
    final_val: float = float("nan")
    wall_s: float = 0.0
    tokens: int = 0
    bytes_sent: int = 0
    compute_util: float = 0.0
    peak_sync_bytes: int = 0  # most bytes one node sent in one sync (all-reduce, fragment, exchange)
    codec_s_per_round: float = 0.0  # encode + decode time per node and round
    rounds: int = 0
    faults: int = 0
    curve: list[tuple[float, float, float, float]] = field(default_factory=list)  # step, time, bytes, val

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_sent / self.tokens if self.tokens else 0.0

    def time_to(self, target: float) -> float | None:
        return next((t for _, t, _, v in self.curve if v <= target), None)


def summarize_variant(folder: Path) -> VariantSummary:
    s = VariantSummary(folder.name)
    per_node: dict[str, list[dict]] = {}
    for path in sorted((folder / "metrics").glob("node*.jsonl")):
        records = read_metrics(path)
        per_node[path.stem] = [r for r in records if r.get("event") == "outer"]
        start = next((r for r in records if r.get("event") == "start"), None)
        if start:
            s.algorithm = start.get("algorithm", s.algorithm)
    faults_path = folder / "metrics" / "faults.jsonl"
    if faults_path.exists():
        s.faults = sum(1 for r in read_metrics(faults_path) if r.get("action") != "resume" and r.get("fired", True))
    lasts = [recs[-1] for recs in per_node.values() if recs]
    if not lasts:
        return s
    s.rounds = max(r["round"] for r in lasts) + 1
    finishers = [r for r in lasts if r["round"] == s.rounds - 1]  # not a node killed early
    s.final_val = sum(r["val_loss"] for r in finishers) / len(finishers)
    s.wall_s = max(r.get("elapsed_s", 0.0) for r in lasts)
    s.tokens = sum(r.get("tokens", 0) for r in lasts)
    s.bytes_sent = sum(r["bytes_sent"] for r in lasts)
    # compute time / (compute + time blocked on communication), over every node's rounds:
    # evaluation and start-up are left out, so it shows what communication costs
    compute = sum(r["compute_s"] for recs in per_node.values() for r in recs)
    blocked = sum(r["comm_s"] for recs in per_node.values() for r in recs)
    s.compute_util = compute / (compute + blocked) if compute + blocked else 0.0
    codec = [r.get("encode_s", 0.0) + r.get("decode_s", 0.0) for recs in per_node.values() for r in recs]
    s.codec_s_per_round = sum(codec) / len(codec) if codec else 0.0
    s.peak_sync_bytes = max((b for recs in per_node.values() for r in recs for b in r.get("sync_bytes", [])),
                            default=0)
    by_round: dict[int, dict[str, dict]] = {}
    for node, recs in per_node.items():
        for r in recs:
            by_round.setdefault(r["round"], {})[node] = r
    sent_so_far: dict[str, int] = {}
    for rnd in sorted(by_round):
        rows = by_round[rnd]
        for node, r in rows.items():
            sent_so_far[node] = r["bytes_sent"]
        k = len(rows)
        s.curve.append((sum(r["step"] for r in rows.values()) / k,
                        sum(r.get("elapsed_s", 0.0) for r in rows.values()) / k,
                        float(sum(sent_so_far.values())),
                        sum(r["val_loss"] for r in rows.values()) / k))
    return s


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _plot(summaries: list[VariantSummary], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for idx, (fname, xlabel) in enumerate((("val_vs_step.png", "inner step"),
                                           ("val_vs_time.png", "wall time (s)"),
                                           ("val_vs_bytes.png", "bytes sent by the swarm"))):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for s in summaries:
            if s.curve:
                ax.plot([c[idx] for c in s.curve], [c[3] for c in s.curve], marker="o", markersize=3, label=s.name)
        if idx == 2:
            ax.set_xscale("symlog")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)
        files.append(fname)
    return files


def write_report(out: Path) -> Path:
    meta_path = out / "experiment.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    names = [v["name"] for v in meta.get("variant", [])] or sorted(
        p.name for p in out.iterdir() if (p / "metrics").is_dir())
    summaries = [summarize_variant(out / n) for n in names if (out / n).exists()]
    baseline = next((s for s in summaries if s.algorithm == "ddp"), None)
    lines = [f"# {meta.get('experiment', {}).get('name', out.name)}", ""]
    if meta.get("source"):
        lines += [f"Experiment file: `{meta['source']}`; rebuild this report with `loco report {out}`.", ""]
    head = ("| variant | algorithm | final val loss | tokens/s | wall time | bytes sent | bytes/token "
            "| peak sync | codec s/round | compute util | rounds | faults |")
    sep = "|---|---|---|---|---|---|---|---|---|---|---|---|"
    if baseline:
        head += f" time to {baseline.name}'s final loss |"
        sep += "---|"
    lines += [head, sep]
    for s in summaries:
        row = (f"| {s.name} | {s.algorithm} | {s.final_val:.4f} | {s.tokens_per_s:.0f} | {s.wall_s:.1f} s "
               f"| {_fmt_bytes(s.bytes_sent)} | {s.bytes_per_token:.1f} "
               f"| {_fmt_bytes(s.peak_sync_bytes) if s.peak_sync_bytes else '—'} | {s.codec_s_per_round:.3f} "
               f"| {s.compute_util:.0%} | {s.rounds} "
               f"| {s.faults} |")
        if baseline:
            t = s.time_to(baseline.final_val)
            row += f" {'—' if t is None else f'{t:.1f} s'} |"
        lines.append(row)
    lines.append("")
    for fname in _plot(summaries, out):
        lines += [f"![{fname}]({fname})", ""]
    for s in summaries:
        fpath = out / s.name / "metrics" / "faults.jsonl"
        if fpath.exists():
            lines.append(f"Faults in {s.name}:")
            for r in read_metrics(fpath):
                lines.append(f"- {r.get('elapsed_s', 0):.0f} s: {r['action']} {r['target']}"
                             + (f" ({r['note']})" if r.get("note") else ""))
            lines.append("")
    (out / "report.md").write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps([
        {"variant": s.name, "algorithm": s.algorithm, "final_val_loss": s.final_val, "tokens_per_s": s.tokens_per_s,
         "wall_s": s.wall_s, "bytes_sent": s.bytes_sent, "bytes_per_token": s.bytes_per_token,
         "compute_util": s.compute_util, "peak_sync_bytes": s.peak_sync_bytes,
         "codec_s_per_round": s.codec_s_per_round, "rounds": s.rounds, "faults": s.faults,
         "time_to_baseline_s": s.time_to(baseline.final_val) if baseline else None,
         "curve": [{"step": c[0], "time_s": c[1], "bytes": c[2], "val_loss": c[3]} for c in s.curve]}
        for s in summaries], indent=2))
    return out / "report.md"
