"""The typed, validated job configuration: dataclass schema + YAML values + key=value overrides.

Only the orchestrator sees the whole JobConfig; each stage receives its own slice.
Everything wrong with a config (unknown key, wrong type, missing value, failed cross-check) becomes
a UserError naming the dotted key, before any work starts. A loaded config is never mutated.
"""

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from jobs.adapt.config import AdaptConfig
from jobs.data.config import DataConfig
from jobs.evaluate.config import EvaluateConfig
from jobs.export.config import ExportConfig
from jobs.train.config import TrainConfig
from jobs.core.errors import UserError
from jobs.core.tracking import TrackingConfig
from orchestrator.submit import SubmitConfig

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class JobConfig:
    # Names the run directory under the root; letters, digits, '.', '_' and '-'.
    name: str = MISSING
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # Where stage outputs live (a directory or an s3:// prefix), each at STORE/<stage>-<key>.
    # Default: ROOT/stages. Runs and sweep trials with equal stage keys share one output.
    store: Optional[str] = None
    # `t5adapt submit`: the cluster's address and the run root there (not part of any stage key).
    submit: SubmitConfig = field(default_factory=SubmitConfig)

    def __post_init__(self):
        if not _NAME.match(self.name):
            raise ValueError(f"name={self.name!r} must be letters, digits, '.', '_' or '-' (it names a directory)")
        if (self.train.distill.enabled and self.data.objective == "ul2"
                and not any(d.name == "S" for d in self.data.denoisers)):
            raise ValueError("train.distill.enabled=true needs PrefixLM (S) examples, but data.denoisers holds only "
                             f"R/X ({', '.join(d.name for d in self.data.denoisers)}): R/X targets have no teacher. "
                             "Add an S entry to data.denoisers, set data.objective=prefix_lm, or set "
                             "train.distill.enabled=false")


def default_root() -> str:
    """The run root: $T5ADAPT_ROOT or ./runs."""
    return os.environ.get("T5ADAPT_ROOT", "runs")


def load_config(path: str, overrides: Sequence[str] = ()) -> JobConfig:
    """Read a YAML config, apply `key=value` overrides, validate, and return a frozen JobConfig."""
    values = read_yaml(path, "config file", "try configs/quickstart.yaml or configs/tiny.yaml")
    return _build(values, list(overrides), origin=path)


def read_yaml(path: str, what: str, hint: str) -> dict:
    """A YAML file holding a mapping, or a UserError naming the file."""
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path} ({hint})")
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} must hold a mapping of config keys, not a {type(values).__name__}")
    return values


def _build(values: dict, overrides: List[str], origin: str, cls=JobConfig):
    """`values` + `overrides` checked against the dataclass `cls` (JobConfig, or the sweep's schema)."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise UserError(f"override {item!r} must look like key=value, e.g. adapt.encoder_layers=every:3")
    schema = OmegaConf.structured(cls)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(values), OmegaConf.from_dotlist(overrides))
        job = OmegaConf.to_object(merged)
    except MissingMandatoryValue as e:
        raise UserError(f"{e.full_key} is required but {origin} does not set it (add it, or pass {e.full_key}=...)") from None
    except ConfigKeyError as e:
        raise UserError(_unknown_key_message(e.full_key or str(e.key), origin, cls)) from None
    except OmegaConfBaseException as e:
        # Type errors: OmegaConf's first line already says what value did not fit which type.
        reason = str(e).splitlines()[0]
        raise UserError(f"{e.full_key}: {reason}") from None
    except ValueError as e:
        # Cross-field checks in __post_init__ name the key, the value and the fix themselves.
        raise UserError(str(e)) from None
    return job


def _unknown_key_message(full_key: str, origin: str, cls=JobConfig) -> str:
    parts = full_key.split(".")
    known = _fields_at(cls, parts[:-1])
    hint = difflib.get_close_matches(parts[-1], known, n=1)
    prefix = ".".join(parts[:-1])
    suggestion = f"; did you mean {'.'.join(filter(None, [prefix, hint[0]]))}?" if hint else ""
    return f"unknown config key {full_key} (from {origin} or an override){suggestion} Known keys here: {', '.join(known)}"


def _fields_at(cls, path: List[str]) -> List[str]:
    for name in path:
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        if name not in types or not dataclasses.is_dataclass(types[name]):
            return []
        cls = types[name]
    return [f.name for f in dataclasses.fields(cls)]


def to_yaml(job: JobConfig) -> str:
    """The resolved config as YAML (what `t5adapt config show` prints and runs record)."""
    return OmegaConf.to_yaml(OmegaConf.structured(job))
