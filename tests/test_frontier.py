"""The quality-vs-cost frontier: Pareto flags checked against hand-computed cases, and the table, CSV
and PNG it is reported in."""

import copy
import csv
import json
import re

import pytest
from PIL import Image  # matplotlib's own PNG writer needs Pillow, so it is always there with it

from orchestrator.frontier import frontier_rows, frontier_table, pareto_flags, plot, write_csv

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def point(name, quality, latency_s, parameters=None, kind="trial", params=None, **extra):
    return dict(name=name, kind=kind, pairing=extra.pop("pairing", "270m-270m"), params=params or {},
                quality=quality, heldout_loss=extra.pop("heldout_loss", None),
                encoder_masked=extra.pop("encoder_masked", None), latency_s=latency_s, parameters=parameters,
                state=extra.pop("state", "done"))


# (name, quality, latency_s, on the latency frontier), worked out by hand.
LATENCY_CASE = [
    ("twin-a", 1.0, 0.010, True),               # exact duplicates do not dominate each other
    ("twin-b", 1.0, 0.010, True),
    ("same-latency-worse", 1.5, 0.010, False),  # the twins are as fast and better
    ("same-quality-slower", 1.0, 0.012, False),  # the twins are as good and faster
    ("fastest", 2.0, 0.005, True),
    ("fast-but-worse", 2.5, 0.008, False),      # fastest is both faster and better
    ("slow-best", 0.8, 0.020, True),
    ("beaten-by-source", 0.95, 0.015, False),   # only the source reference beats it
    ("no-quality", None, 0.001, False),         # would dominate everything if None counted as 0
    ("nan-latency", 0.1, float("nan"), False),  # nothing compares with NaN, so it would look optimal
    ("nan-quality", float("nan"), 0.002, False),
]
SOURCE = ("source: builtin:gemma3-270m", 0.9, 0.011, True)


def latency_case():
    points = [point(name, quality, latency) for name, quality, latency, _ in LATENCY_CASE]
    return points + [point(SOURCE[0], SOURCE[1], SOURCE[2], kind="source", pairing="decoder-only")]


def test_pareto_flags_match_the_hand_computed_case():
    expected = [optimal for *_, optimal in LATENCY_CASE] + [SOURCE[3]]
    assert pareto_flags(latency_case()) == expected


def test_source_reference_dominates_a_trial():
    points = latency_case()
    without_source = [p for p in points if p["kind"] != "source"]
    flags = dict(zip([p["name"] for p in without_source], pareto_flags(without_source)))
    assert flags["beaten-by-source"] is True
    assert dict(zip([p["name"] for p in points], pareto_flags(points)))["beaten-by-source"] is False


def test_pareto_flags_take_other_axes():
    points = [point("a", 1.0, None, heldout_loss=3.0), point("b", 2.0, None, heldout_loss=2.0)]
    assert pareto_flags(points) == [False, False]
    assert pareto_flags(points, quality="heldout_loss", cost="quality") == [True, True]
    points[1]["heldout_loss"] = 4.0
    assert pareto_flags(points, quality="heldout_loss", cost="quality") == [True, False]
    assert pareto_flags([]) == []


def params_case():
    # latency frontier: fast, mid, slow-small; parameters frontier: fast, smallest-good (no latency).
    return [point("mid", 1.0, 0.010, 270_312_345, params={"train.lr": 0.002}),
            point("slow-small", 0.9, 0.020, 200_000_000, params={"train.lr": 0.001, "adapt.init": "tied"}),
            point("fast", 1.2, 0.005, 100_000_000, encoder_masked=3.5, heldout_loss=2.25),
            point("no-latency", 0.9, None, 150_000_000, state="stopped"),
            point("worst", 2.0, 0.030, 400_000_000, state="failed"),
            point("no-quality", None, 0.001, 50_000_000, state="failed")]


def test_rows_sorted_by_latency_with_both_frontiers():
    points = params_case()
    before = copy.deepcopy(points)
    rows = frontier_rows(points)
    assert points == before, "frontier_rows must not change its input"
    assert [r["name"] for r in rows] == ["no-quality", "fast", "mid", "slow-small", "worst", "no-latency"]
    flags = {r["name"]: (r["pareto"], r["pareto_params"]) for r in rows}
    assert flags == {"fast": (True, True), "mid": (True, False), "slow-small": (True, False),
                     "no-latency": (False, True), "worst": (False, False), "no-quality": (False, False)}


def table_cells(table):
    lines = table.splitlines()
    header = re.split(r"\s{2,}", lines[0])
    return header, {cells[0]: dict(zip(header, cells)) for cells in (re.split(r"\s{2,}", line) for line in lines[1:-1])}


def test_table_lists_every_row_with_marks_and_dashes():
    rows = frontier_rows(params_case() + latency_case()[-1:])
    table = frontier_table(rows)
    lines = table.splitlines()
    assert len(lines) == len(rows) + 2
    assert "lower is better" in lines[-1] and "* " in lines[-1] and "p " in lines[-1]
    header, cells = table_cells(table)
    assert all(len(row) == len(header) for row in cells.values())
    assert set(cells) == {r["name"] for r in rows}
    # The source (CE 0.9 at 11 ms) takes slow-small (CE 0.9 at 20 ms) off the latency frontier.
    assert {name: row["frontier"] for name, row in cells.items()} == {
        "fast": "*p", "mid": "*", "slow-small": "-", "no-latency": "p", "worst": "-", "no-quality": "-",
        "source: builtin:gemma3-270m": "*"}
    assert cells["mid"]["parameters"] == "270.3M" and cells["mid"]["params"] == "train.lr=0.002"
    assert cells["slow-small"]["params"] == "train.lr=0.001,adapt.init=tied"
    assert cells["fast"] | {"name": None} == {
        "name": None, "kind": "trial", "pairing": "270m-270m", "params": "-", "probe_ce": "1.2000",
        "masked": "3.5000", "heldout_loss": "2.2500", "latency_ms": "5.0", "parameters": "100.0M",
        "frontier": "*p", "state": "done"}
    assert cells["no-latency"]["latency_ms"] == "-" and cells["no-quality"]["probe_ce"] == "-"
    assert cells["source: builtin:gemma3-270m"]["kind"] == "source"


def test_csv_round_trips(tmp_path):
    rows = frontier_rows(params_case())
    path = tmp_path / "frontier.csv"
    write_csv(rows, str(path))
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        read = list(reader)
    assert reader.fieldnames == ["name", "kind", "pairing", "params.train.lr", "params.adapt.init", "quality",
                                 "encoder_masked", "heldout_loss", "latency_s", "parameters", "pareto",
                                 "pareto_params", "state"]
    assert [r["name"] for r in read] == [r["name"] for r in rows]
    by_name = {r["name"]: r for r in read}
    assert by_name["slow-small"]["params.train.lr"] == "0.001" and by_name["slow-small"]["params.adapt.init"] == "tied"
    assert by_name["fast"]["params.train.lr"] == "" and by_name["no-latency"]["latency_s"] == ""
    assert (by_name["fast"]["pareto"], by_name["fast"]["pareto_params"]) == ("true", "true")
    assert (by_name["no-latency"]["pareto"], by_name["no-latency"]["pareto_params"]) == ("false", "true")
    for row in rows:
        if row["quality"] is not None:
            assert float(by_name[row["name"]]["quality"]) == row["quality"]
        if row["latency_s"] is not None:
            assert float(by_name[row["name"]]["latency_s"]) == row["latency_s"]
        assert int(by_name[row["name"]]["parameters"]) == row["parameters"]


def read_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    with Image.open(path) as image:
        return json.loads(image.info["t5adapt.points"])


def test_plot_writes_a_png_listing_the_plotted_points(tmp_path):
    rows = frontier_rows(params_case() + latency_case())
    path = tmp_path / "frontier.png"
    plot(rows, str(path), title="test sweep")
    plotted = read_png(str(path))
    # no-quality, nan-quality (no quality), no-latency and nan-latency (no latency) are left out;
    # ties on latency (fast and fastest; mid and the twins) keep their input order.
    assert plotted == ["fast", "fastest", "fast-but-worse", "mid", "twin-a", "twin-b", "same-latency-worse",
                       "source: builtin:gemma3-270m", "same-quality-slower", "beaten-by-source", "slow-small",
                       "slow-best", "worst"]


def test_empty_sweep_still_reports(tmp_path):
    assert frontier_table([]).splitlines()[0].startswith("name")
    assert len(frontier_table([]).splitlines()) == 2
    plot([], str(tmp_path / "empty.png"))
    assert read_png(str(tmp_path / "empty.png")) == []


@pytest.mark.parametrize("bad", [None, float("nan")])
def test_missing_cost_never_optimal(bad):
    assert pareto_flags([point("alone", 1.0, bad)]) == [False]
    assert pareto_flags([point("alone", 1.0, 0.01)]) == [True]
