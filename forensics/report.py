"""``forensics report``: one diagnosed episode as a figure, for a human.

One row per Stage-1 calibration (the paper's band, ours):

* left, the per-agent score timelines: z_i^t of that calibration (``scores.npz``,
  symlog axis), each agent's threshold (dashed) and watch level (dotted), its confirmed flag
  t_det,i (circle), the Patient-0 candidate (star) and, from the store's **ground truth**, the
  attack window [start, start + window) and its victim. The report reads ground truth;
  ``diagnose`` never does, and nothing drawn here feeds back into a verdict.
* right, the contagion graph (``graphs/<episode_id>.json``): an arrow i → j per edge, width
  ∝ its weight C_ij, solid where the edge's window evidence exceeds its clean threshold, the
  deployable chain in red; the deployable Patient-0 red, the candidate orange, the other
  agents the graph calls infected pink; the victim ringed in black.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from configs.schema import ConfigError
from forensics.diagnose import CALIBRATIONS, GRAPHS_DIR
from forensics.evaluate import Diagnosis, _store_of
from forensics.store import StoreError, atomic_write

FORMATS = ("png", "pdf", "svg")
TITLES = {
    "paper": "paper's band |x − μ| > Kσ (K = {k:g})",
    "budget": "ours: per-episode false-alarm budget α = {alpha:g}",
}
NODE_COLOURS = {"head": "crimson", "candidate": "orange", "infected": "pink", "other": "0.85"}


def episode_row(diag: Diagnosis, episode_id: int) -> int:
    """Row of ``episode_id`` in the diagnosis (one-line ConfigError if it is not there)."""
    ids = diag.scores["episode_id"]
    rows = np.flatnonzero(ids == episode_id)
    if rows.size == 0:
        raise ConfigError(
            f"--episode {episode_id}: not in {diag.path} ({ids.size} episodes, ids "
            f"{ids.min()}..{ids.max()})"
        )
    return int(rows[0])


def ground_truth(diag: Diagnosis, episode_id: int) -> tuple[dict[str, Any] | None, str]:
    """The episode's ground truth from the diagnosed store, with a caption; ``None`` and the
    reason when the store cannot be read (a diagnosis copied away from its store)."""
    try:
        gt = _store_of(diag).ground_truth()
    except (StoreError, FileNotFoundError) as err:
        return None, f"ground truth unavailable ({err})"
    rows = gt[gt["episode_id"] == episode_id]
    if rows.empty:
        return None, f"ground truth unavailable (episode not in {diag.summary['store']['path']})"
    row = rows.iloc[0].to_dict()
    if row["clean"]:
        return row, "ground truth: clean episode (no attack)"
    return row, (
        f"ground truth: {row['attack']} on agent {row['victim']} (observed agent "
        f"{row['observed']}, {row['influence']}-influence onset) at steps "
        f"{row['start']}..{row['start'] + row['window'] - 1}"
    )


def _timeline(ax, z: np.ndarray, threshold: np.ndarray, watch: np.ndarray,
              agent_t_det: np.ndarray, candidate: int, t_det: int,
              gt: dict[str, Any] | None) -> None:  # fmt: skip
    """z [T, N] with thresholds and watch levels [N], per-agent flags [N] and the candidate."""
    steps = np.arange(z.shape[0])
    if gt is not None and not gt["clean"]:
        lo = gt["start"] - 0.5
        ax.axvspan(lo, lo + gt["window"], color="red", alpha=0.12,
                   label=f"attack window (victim {gt['victim']})")  # fmt: skip
    for i in range(z.shape[1]):
        colour = f"C{i}"
        ax.plot(steps, z[:, i], color=colour, lw=1.6, label=f"agent {i}")
        ax.axhline(threshold[i], color=colour, ls="--", lw=0.9)
        ax.axhline(watch[i], color=colour, ls=":", lw=0.9)
        if agent_t_det[i] >= 0:
            ax.plot(agent_t_det[i], z[agent_t_det[i], i], "o", ms=8, mfc="white", mec=colour,
                    mew=2)  # fmt: skip
    if candidate >= 0:
        ax.plot(t_det, z[t_det, candidate], "*", ms=18, color=f"C{candidate}", mec="black",
                label=f"candidate: agent {candidate}, t = {t_det}")  # fmt: skip
    ax.plot([], [], "k--", lw=0.9, label="threshold")
    ax.plot([], [], "k:", lw=0.9, label="watch level")
    ax.plot([], [], "o", mfc="white", mec="k", label="agent's flag t_det")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlim(-0.5, z.shape[0] - 0.5)
    ax.set_xlabel("step t")
    ax.set_ylabel("normalised score z")
    ax.legend(fontsize=7, loc="best", ncol=2)


def _graph(ax, graph: dict[str, Any] | None, victim: int | None) -> str:
    """Draw one calibration's contagion graph; returns the panel's title."""
    import networkx as nx

    if graph is None:
        ax.text(0.5, 0.5, "no graph file (diagnosed with forensics.graphs=false)",
                ha="center", va="center", transform=ax.transAxes)  # fmt: skip
        ax.axis("off")
        return "contagion graph"
    g = nx.DiGraph()
    g.add_nodes_from(n["agent"] for n in graph["nodes"])
    g.add_edges_from((e["source"], e["target"], e) for e in graph["edges"])
    pos = nx.circular_layout(sorted(g.nodes))
    chain = graph["deployable_chain"]  # [candidate, ..., head]: a hop c → u is the edge u → c
    on_chain = set(zip(chain[1:], chain[:-1], strict=True))
    edges = list(g.edges(data=True))
    top = max((d["weight"] for *_, d in edges), default=0.0) or 1.0
    nx.draw_networkx_edges(
        g, pos, ax=ax, edgelist=[(u, v) for u, v, _ in edges],
        width=[0.4 + 6.0 * d["weight"] / top for *_, d in edges],
        edge_color=["crimson" if (u, v) in on_chain else "0.3" if d["above_threshold"]
                    else "0.7" for u, v, d in edges],
        style=["solid" if (u, v) in on_chain or d["above_threshold"] else "dashed"
               for u, v, d in edges],
        arrows=True, arrowsize=16, node_size=1100, connectionstyle="arc3,rad=0.18",
    )  # fmt: skip
    role = {n["agent"]: "infected" if n["infected"] else "other" for n in graph["nodes"]}
    if chain:  # [candidate, ..., head], empty when nobody was flagged
        role[chain[0]], role[chain[-1]] = "candidate", "head"
    nodes = sorted(g.nodes)
    nx.draw_networkx_nodes(
        g, pos, ax=ax, nodelist=nodes, node_size=1100,
        node_color=[NODE_COLOURS[role[n]] for n in nodes],
        edgecolors=["black" if n == victim else "0.5" for n in nodes],
        linewidths=[3.0 if n == victim else 1.0 for n in nodes],
    )  # fmt: skip
    nx.draw_networkx_labels(g, pos, ax=ax, labels={n: str(n) for n in nodes})
    for name, colour in (("deployable Patient-0", "head"), ("candidate", "candidate"),
                         ("infected", "infected")):  # fmt: skip
        ax.scatter([], [], s=80, color=NODE_COLOURS[colour], label=name)
    if victim is not None:
        ax.scatter([], [], s=80, facecolor="white", edgecolor="black", lw=2.5, label="victim")
    ax.legend(fontsize=7, loc="lower right", frameon=False)
    ax.axis("off")
    path = " ← ".join(map(str, chain)) if chain else "none (no flag)"
    return f"contagion graph, width ∝ C_ij; deployable chain {path}"


def figure(diag: Diagnosis, episode_id: int) -> Figure:
    """The report figure of one episode of a loaded diagnosis (``evaluate.load_diagnosis``)."""
    import json

    r = episode_row(diag, episode_id)
    verdict = diag.verdicts.set_index("episode_id").loc[episode_id]
    gt, caption = ground_truth(diag, episode_id)
    victim = None if gt is None or gt["clean"] else int(gt["victim"])
    graph_file = diag.path / GRAPHS_DIR / f"{episode_id}.json"
    graphs = json.loads(graph_file.read_text())["calibrations"] if graph_file.is_file() else {}
    s, cfg = diag.scores, diag.summary
    fig = Figure(figsize=(15, 4.6 * len(CALIBRATIONS)), layout="constrained")
    axes = fig.subplots(len(CALIBRATIONS), 2, width_ratios=[1.7, 1], squeeze=False)
    for (left, right), cal in zip(axes, CALIBRATIONS, strict=True):
        _timeline(left, s[f"z_{cal}"][r], s[f"{cal}_threshold"], s[f"{cal}_watch"],
                  s[f"{cal}_agent_t_det"][r], int(verdict[f"{cal}_candidate"]),
                  int(verdict[f"{cal}_t_det"]), gt)  # fmt: skip
        left.set_title(TITLES[cal].format(k=cfg["paper_k"], alpha=cfg["config"]["alpha"]))
        right.set_title(_graph(right, graphs.get(cal), victim), fontsize=9)
    status = "" if verdict["status"] == "ok" else f" — {verdict['status']}, no verdict"
    fig.suptitle(
        f"episode {episode_id} (seed {verdict['seed']}) of {cfg['store']['path']}{status}\n"
        f"{caption}",
        fontsize=10,
    )
    return fig


def save(fig: Figure, out: str | Path) -> Path:
    """Write ``fig`` to ``out`` (.png, .pdf or .svg, from the suffix) atomically."""
    out = Path(out)
    fmt = out.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ConfigError(f"--out {out}: expected a .png, .pdf or .svg file name")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=110)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, buf.getvalue())
    return out


def verdict_line(diag: Diagnosis, episode_id: int) -> str:
    """The episode's verdicts under each calibration, in one line."""
    row = diag.verdicts.set_index("episode_id").loc[episode_id]
    parts = []
    for cal in CALIBRATIONS:
        cand, head = int(row[f"{cal}_candidate"]), int(row[f"{cal}_deployable"])
        parts.append(
            f"{cal}: no flag" if cand < 0 else
            f"{cal}: candidate {cand} at t = {int(row[f'{cal}_t_det'])}, deployable "
            f"Patient-0 {head} (chain {' ← '.join(map(str, row[f'{cal}_deployable_chain']))})"
        )  # fmt: skip
    return "; ".join(parts)
