"""The sweep configuration: which pairings and hyper-parameters a sweep tries, and how.

A sweep config names a run config (`run`, relative to the sweep file) that every trial starts from,
`overrides` applied to every trial, the encoder/decoder pairings (an explicit list and/or a grid over
encoder and decoder depth taken from one source), and hyper-parameters as Ray Tune search spaces:

    search:
      train.lr: {grid: [0.002, 0.0005]}         # every value (a grid multiplies the trial count)
      adapt.encoder_scale: {uniform: [0.0, 1.0]}  # sampled, num_samples times per grid point
      data.objective: {choice: [ul2, prefix_lm]}

Every trial's job config is built and checked before the sweep starts, so a wrong key fails at once,
naming it. Trial names derive from the sweep key and the trial's own values, never timestamps.
"""

import itertools
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import MISSING

from jobs.core.commits import stage_key
from jobs.core.errors import UserError
from orchestrator.submit import SubmitConfig

SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
SCHEDULERS = ("none", "asha")
# Fields that change how a sweep runs, not what its trials compute: left out of its key.
_NOT_KEYED = ("max_concurrent_trials", "storage", "submit")


@dataclass
class PairingConfig:
    """One encoder/decoder pairing; unset fields keep the run config's adapt.* value."""
    name: Optional[str] = None  # a short label (default: derived from the fields below)
    source: Optional[str] = None  # adapt.source: the encoder's source (and the decoder's, unless decoder_source)
    decoder_source: Optional[str] = None  # adapt.decoder_source: Gemma 2 unbalanced pairs (e.g. 9B-2B)
    encoder_layers: Optional[str] = None  # adapt.encoder_layers: all | first:N | every:N | last:N | 0,2,4
    decoder_layers: Optional[str] = None


@dataclass
class DepthGridConfig:
    """Every combination of encoder and decoder depth from the run config's source (layer selection,
    as adapt.encoder_layers / adapt.decoder_layers; T5Gemma 2 widths always match this way)."""
    encoder_layers: List[str] = field(default_factory=list)
    decoder_layers: List[str] = field(default_factory=list)


@dataclass
class SchedulerConfig:
    type: str = "none"  # none: every trial runs to the end | asha: stop trials whose held-out loss lags
    grace_period: int = 1  # training steps before ASHA may stop a trial (it decides at checkpoints)
    reduction_factor: float = 2.0  # ASHA keeps the best 1/reduction_factor of trials at each rung

    def __post_init__(self):
        if self.type not in SCHEDULERS:
            raise ValueError(f"scheduler.type={self.type!r} must be one of {', '.join(SCHEDULERS)}")
        if self.grace_period < 1 or self.reduction_factor <= 1:
            raise ValueError("scheduler.grace_period must be >= 1 and scheduler.reduction_factor > 1")


@dataclass
class SweepConfig:
    # Names the sweep (its directory ROOT/sweeps/NAME-KEY and its trials' run names).
    name: str = MISSING
    # The run config every trial starts from, relative to this file (e.g. tiny.yaml).
    run: str = MISSING
    overrides: Dict[str, Any] = field(default_factory=dict)  # run config keys set for every trial
    pairings: List[PairingConfig] = field(default_factory=list)
    depths: DepthGridConfig = field(default_factory=DepthGridConfig)
    search: Dict[str, Any] = field(default_factory=dict)  # run config key -> {grid|choice|uniform|loguniform|randint: ...}
    num_samples: int = 1  # samples of the random search spaces per grid point
    seed: int = 0  # for sampled search spaces (the same seed draws the same trials)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_concurrent_trials: int = 1
    # Ray Tune's experiment state (a directory or s3:// prefix): STORAGE/NAME-KEY. Default ROOT/sweeps.
    storage: Optional[str] = None
    reference: bool = True  # put the source decoder-only model(s) on the frontier
    # `t5adapt submit --sweep`: the cluster's address and the run root there (not in the sweep key).
    submit: SubmitConfig = field(default_factory=SubmitConfig)

    def __post_init__(self):
        from orchestrator.config import _NAME

        if not _NAME.match(self.name):
            raise ValueError(f"name={self.name!r} must be letters, digits, '.', '_' or '-' (it names directories)")
        if self.num_samples < 1 or self.max_concurrent_trials < 1:
            raise ValueError("num_samples and max_concurrent_trials must be at least 1")
        for key, space in flat(self.search).items():
            _check_space(key, space)
        for i, pairing in enumerate(self.pairings):
            if not any(v is not None for k, v in asdict(pairing).items() if k != "name"):
                raise ValueError(f"pairings[{i}] sets nothing: give source, decoder_source, encoder_layers or decoder_layers")
        if bool(self.depths.encoder_layers) != bool(self.depths.decoder_layers):
            raise ValueError("depths.encoder_layers and depths.decoder_layers go together: give both lists")


def _check_space(key: str, space: Any) -> None:
    if not isinstance(space, dict):
        return  # a constant
    if len(space) != 1 or next(iter(space)) not in SEARCH_KINDS:
        raise ValueError(f"search.{key} must be a constant or one of {{{': ..., '.join(SEARCH_KINDS)}: ...}}, "
                         f"got {space}")
    kind, values = next(iter(space.items()))
    if not isinstance(values, list) or not values:
        raise ValueError(f"search.{key}.{kind} must be a non-empty list")
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not values[0] < values[1]:
            raise ValueError(f"search.{key}.{kind} must be [low, high] with low < high, got {values}")
        if kind == "loguniform" and values[0] <= 0:
            raise ValueError(f"search.{key}.loguniform needs low > 0, got {values}")


def load_sweep(path: str, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read a sweep YAML, apply key=value overrides, validate; `run` becomes an absolute path."""
    from orchestrator.config import _build, read_yaml

    values = read_yaml(path, "sweep config", "try configs/sweep_tiny.yaml or configs/sweep_quickstart.yaml")
    sweep = _build(values, list(overrides), origin=path, cls=SweepConfig)
    sweep.run = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(path)), sweep.run))
    if not os.path.isfile(sweep.run):
        raise UserError(f"run: {sweep.run} (the run config the sweep's trials start from) does not exist")
    return sweep


def flat(mapping: dict) -> Dict[str, Any]:
    """{'train': {'lr': 1}} and {'train.lr': 1} both -> {'train.lr': 1}: a section's mapping (a key
    without a dot) is opened one level; anything deeper is a value (a search space, a dict field)."""
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and "." not in str(key) and not set(value) & set(SEARCH_KINDS):
            out.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            out[str(key)] = value
    return out


def pairings(sweep: SweepConfig) -> List[dict]:
    """Every pairing as {"label": str, "adapt": {adapt key: value}}: the explicit ones, then the
    depth grid; the run config's own pairing when the sweep names none."""
    found = []
    for pairing in sweep.pairings:
        values = {k: v for k, v in asdict(pairing).items() if k != "name" and v is not None}
        found.append({"label": pairing.name or _label(values), "adapt": values})
    for encoder, decoder in itertools.product(sweep.depths.encoder_layers, sweep.depths.decoder_layers):
        values = {"encoder_layers": str(encoder), "decoder_layers": str(decoder)}
        found.append({"label": _label(values), "adapt": values})
    labels = [p["label"] for p in found]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise UserError(f"pairings repeat: {', '.join(duplicates)} (give each a distinct name)")
    return found or [{"label": "run-config", "adapt": {}}]


def _label(values: dict) -> str:
    parts = []
    for key, short in (("source", ""), ("decoder_source", "dec-"), ("encoder_layers", "e"), ("decoder_layers", "d")):
        if key in values:
            parts.append(short + re.sub(r"[^A-Za-z0-9.]+", "", str(values[key]).split("/")[-1].replace("builtin:", "")))
    return "-".join(parts) or "run-config"


def overrides_for(sweep: SweepConfig, pairing: dict, params: Dict[str, Any]) -> List[str]:
    """A trial's key=value overrides of the run config: the sweep's, its pairing's, its parameters'."""
    values = dict(flat(sweep.overrides))
    values.update({f"adapt.{k}": v for k, v in pairing["adapt"].items()})
    values.update(params)
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def trial_name(sweep: SweepConfig, key: str, pairing: dict, params: Dict[str, Any]) -> str:
    """Deterministic: the sweep's name, the pairing's label and a digest of the sweep key and the
    trial's values (resume finds the same trial, run directory and MLflow run by it)."""
    digest = stage_key("trial", {"sweep": key, "pairing": pairing, "params": params})[:8]
    return f"{sweep.name}-{pairing['label']}-{digest}"


def trial_job(sweep: SweepConfig, key: str, pairing: dict, params: Dict[str, Any]) -> Tuple[str, Any]:
    """(name, JobConfig) of one trial; UserError naming the key when its config is invalid."""
    from orchestrator.config import load_config

    name = trial_name(sweep, key, pairing, params)
    overrides = overrides_for(sweep, pairing, params) + [f"name={name}"]
    try:
        job = load_config(sweep.run, overrides)
    except UserError as e:
        raise UserError(f"sweep trial {pairing['label']} {params or ''}: {e}") from None
    if job.train.heldout_examples == 0:
        # The held-out curve is what ASHA compares; it scores the examples evaluation scores first.
        job = load_config(sweep.run, overrides + [f"train.heldout_examples={job.evaluate.max_examples}"])
    return name, job


def corner_params(sweep: SweepConfig) -> List[Dict[str, Any]]:
    """Parameter sets that cover every grid value and both ends of every range: the ones checked
    before the sweep starts (a sampled value lies between checked ones)."""
    axes = []
    for key, space in flat(sweep.search).items():
        if not isinstance(space, dict):
            axes.append([(key, space)])
            continue
        kind, values = next(iter(space.items()))
        axes.append([(key, v) for v in values])
    return [dict(combo) for combo in itertools.product(*axes)]


def sweep_key(sweep: SweepConfig, run_yaml: str) -> str:
    """What the sweep computes: its fields but the ones that only change how it runs, and the run
    config the trials start from (resolved)."""
    fields = {k: v for k, v in asdict(sweep).items() if k not in _NOT_KEYED and k != "run"}
    return stage_key("sweep", {"sweep": fields, "run_config": run_yaml})


def tune_space(sweep: SweepConfig, pairing_list: List[dict]) -> dict:
    """Ray Tune's param_space: the pairings' labels as a grid, each search key as its Tune domain."""
    from ray import tune

    space = {"pairing": tune.grid_search([p["label"] for p in pairing_list])}
    for key, value in flat(sweep.search).items():
        if not isinstance(value, dict):
            space[key] = value
            continue
        kind, values = next(iter(value.items()))
        space[key] = {"grid": lambda v: tune.grid_search(v), "choice": tune.choice,
                      "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
                      "randint": lambda v: tune.randint(*v)}[kind](values)
    return space
