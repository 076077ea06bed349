"""The quality-vs-inference-cost frontier of a sweep: which encoder/decoder pairing is best for its cost.

Each point is a trial (or the source decoder-only model, as a reference) with a quality, the probe
cross-entropy of the target in nats/token, and a cost: end-to-end generate latency in seconds, or
total parameters. Both axes are minimised, so better models lie toward the lower left; a point is on
the frontier (Pareto-optimal) when no other point is at least as good on both axes and strictly
better on one.

A point is a plain dict: name, kind ("trial" or "source"), pairing, params (hyper-parameters to
show), quality, heldout_loss, encoder_masked, latency_s, parameters, state. Values may be None.
"""

import csv
import json
import math
import numbers
from typing import List, Optional, Sequence

COLUMNS = ["name", "kind", "pairing", "quality", "encoder_masked", "heldout_loss", "latency_s", "parameters",
           "pareto", "pareto_params", "state"]
LEGEND = ("probe CE: cross-entropy of the target in nats/token, lower is better (trial: prefix in the encoder; "
          "source: prefix+target in its context); masked: the same probe with the encoder masked; "
          "frontier: * best for its latency, p best for its parameters, - neither")


def _missing(value) -> bool:
    # numbers.Real covers numpy floats too, which a metrics reader may hand over.
    return value is None or (isinstance(value, numbers.Real) and math.isnan(value))


def _dominates(a: tuple, b: tuple) -> bool:
    # No worse on both axes and not identical, hence strictly better on one: duplicates both stay optimal.
    return a[0] <= b[0] and a[1] <= b[1] and a != b


def pareto_flags(points: Sequence[dict], quality: str = "quality", cost: str = "latency_s") -> List[bool]:
    """One bool per point: True when no other point dominates it with both `quality` and `cost` minimised.

    Exact duplicates do not dominate each other; a point missing either value is never optimal and
    dominates nothing."""
    pairs = [None if _missing(p.get(quality)) or _missing(p.get(cost)) else (p[quality], p[cost]) for p in points]
    valid = [pair for pair in pairs if pair is not None]
    return [pair is not None and not any(_dominates(other, pair) for other in valid) for pair in pairs]


def frontier_rows(points: Sequence[dict]) -> List[dict]:
    """Copies of `points` sorted by latency (missing last), each with `pareto` (quality vs latency)
    and `pareto_params` (quality vs total parameters) added."""
    rows = [dict(p, pareto=on_latency, pareto_params=on_params) for p, on_latency, on_params
            in zip(points, pareto_flags(points), pareto_flags(points, cost="parameters"))]
    return sorted(rows, key=_latency_order)


def _latency_order(row: dict) -> tuple:
    latency = row.get("latency_s")
    return (True, 0.0) if _missing(latency) else (False, latency)


def _count(value: Optional[int]) -> str:
    if _missing(value):
        return "-"
    for suffix, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{suffix}"
    return str(value)


def _number(value: Optional[float], fmt: str, scale: float = 1.0) -> str:
    return "-" if _missing(value) else format(value * scale, fmt)


def _params(params: dict) -> str:
    text = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in (params or {}).items())
    return text or "-"


def _marks(row: dict) -> str:
    return ("*" if row.get("pareto") else "") + ("p" if row.get("pareto_params") else "") or "-"


def frontier_table(rows: Sequence[dict]) -> str:
    """Fixed-width text: a header, one line per row (columns two spaces apart, missing values as "-"),
    then a one-line legend."""
    table = [["name", "kind", "pairing", "params", "probe_ce", "masked", "heldout_loss", "latency_ms", "parameters",
              "frontier", "state"]]
    for row in rows:
        table.append([row.get("name") or "-", row.get("kind") or "-", row.get("pairing") or "-",
                      _params(row.get("params")), _number(row.get("quality"), ".4f"),
                      _number(row.get("encoder_masked"), ".4f"), _number(row.get("heldout_loss"), ".4f"),
                      _number(row.get("latency_s"), ".1f", scale=1000.0), _count(row.get("parameters")),
                      _marks(row), row.get("state") or "-"])
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table]
    return "\n".join(lines + [LEGEND])


def _csv_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if _missing(value) else str(value)


def write_csv(rows: Sequence[dict], path: str) -> None:
    """One line per row under a header of COLUMNS plus one `params.<key>` column per hyper-parameter
    seen in any row; booleans as true/false, missing values empty."""
    param_keys = list(dict.fromkeys(key for row in rows for key in (row.get("params") or {})))
    header = COLUMNS[:3] + [f"params.{key}" for key in param_keys] + COLUMNS[3:]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        for row in rows:
            flat = {column: row.get(column) for column in COLUMNS}
            flat.update({f"params.{key}": value for key, value in (row.get("params") or {}).items()})
            writer.writerow({column: _csv_value(flat.get(column)) for column in header})


def _label(row: dict, limit: int = 40) -> str:
    """What tells the points apart: a trial's pairing and hyper-parameters (its full name carries the
    sweep's name and a digest, which every point shares or nobody reads); a source's name."""
    if row.get("kind") == "trial" and row.get("pairing"):
        params = " ".join(f"{key.rsplit('.', 1)[-1]}={value:g}" if isinstance(value, (int, float)) and
                          not isinstance(value, bool) else f"{key.rsplit('.', 1)[-1]}={value}"
                          for key, value in (row.get("params") or {}).items())
        text = f"{row['pairing']} {params}".strip()
    else:
        text = row["name"]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _panel(ax, rows: Sequence[dict], cost: str, flag: str, scale: float, colours: dict) -> List[str]:
    """Draw the rows that have both quality and `cost` on `ax`; return their names in drawing order."""
    drawn = [row for row in rows if not _missing(row.get("quality")) and not _missing(row.get(cost))]
    labels = {}
    for row in drawn:
        colour = colours[row.get("pairing")]
        x, y = row[cost] * scale, row["quality"]
        source = row.get("kind") == "source"
        ax.scatter([x], [y], marker="*" if source else "o", s=140 if source else 50, edgecolors=colour,
                   facecolors=colour if row.get(flag) else "none", zorder=3)
        labels.setdefault((x, y), []).append(_label(row))
    # Points at the same spot (repeated trials) share one label instead of printing over each other.
    for xy, names in labels.items():
        ax.annotate(", ".join(names), xy, xytext=(4, 4), textcoords="offset points", fontsize=7)
    front = sorted((row[cost] * scale, row["quality"]) for row in drawn if row.get(flag))
    if front:
        # "post": each frontier point's quality holds until a costlier point improves on it.
        ax.step([x for x, _ in front], [y for _, y in front], where="post", color="0.5", linewidth=1, zorder=2)
    return [row["name"] for row in drawn]


def plot(rows: Sequence[dict], path: str, title: str = "") -> None:
    """A PNG at `path`: probe CE against latency (ms) and against total parameters (log scale), one
    colour per pairing, frontier points filled and joined by a step line, sources as stars. The names
    drawn in the latency panel are stored in the PNG's "t5adapt.points" text chunk (a JSON list)."""
    # A bare Figure on an Agg canvas rather than pyplot: no global backend switch and no figure
    # registry, so there is nothing to close once it is saved.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(13, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    latency_ax, params_ax = fig.subplots(1, 2, sharey=True)
    pairings = list(dict.fromkeys(row.get("pairing") for row in rows))
    colours = {pairing: f"C{i % 10}" for i, pairing in enumerate(pairings)}
    names = _panel(latency_ax, rows, "latency_s", "pareto", 1000.0, colours)
    _panel(params_ax, rows, "parameters", "pareto_params", 1.0, colours)
    latency_ax.set(xlabel="generate latency (ms)", ylabel="probe CE (nats/token, lower is better)")
    params_ax.set(xlabel="total parameters", xscale="log")
    for ax in (latency_ax, params_ax):
        ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], marker="o", linestyle="", color=colours[p], label=str(p)) for p in pairings]
    if handles:
        params_ax.legend(handles=handles, title="pairing", fontsize=7, loc="best")
    fig.suptitle(title or "quality vs inference cost (filled: on the frontier; star: source model)")
    fig.savefig(path, metadata={"t5adapt.points": json.dumps(names)})
