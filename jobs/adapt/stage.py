"""The adapt stage: decoder-only source(s) -> a Hugging Face encoder-decoder directory.

Output (written to `<out>.partial`, renamed to `<out>` once complete, marker last):
  config.json, generation_config.json, model*.safetensors (+ index), tokenizer files,
  README.md (model card), adapt_manifest.json (one entry per target tensor: rule, source tensor,
  shape, sha256), t5adapt_adapt.json (what later stages need: warm-up, layers, config hash), COMMITTED.
"""

import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import asdict
from typing import Callable, Dict, List, Optional, Tuple

import torch

from jobs.adapt.config import AdaptConfig
from jobs.adapt.families import DESIGNS, Design
from jobs.adapt.rules import name_seed
from jobs.core.sources import Source, open_source
from jobs.core.tensors import StreamingWriter, tensor_sha256
from jobs.core import storage
from jobs.core.commits import commit, publish, reusable, staging_dir
from jobs.core.errors import UserError
from jobs.core.progress import progress as progress_bar

log = logging.getLogger("t5adapt.adapt")
MANIFEST = "adapt_manifest.json"
STAGE_INFO = "t5adapt_adapt.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def open_sources(cfg: AdaptConfig, opened: Optional[Dict[str, Source]] = None) -> Dict[str, Source]:
    """{"encoder": Source, "decoder": Source}; one object for both when there is one source.

    `opened` (spec -> Source) keeps sources between calls: opening a GGUF parses its whole token
    table, so checking several pairings of one source opens it once."""
    opened = {} if opened is None else opened

    def source(spec: str) -> Source:
        if spec not in opened:
            opened[spec] = open_source(spec)
        return opened[spec]

    encoder = source(cfg.source)
    if cfg.decoder_source in (None, cfg.source):
        return {"encoder": encoder, "decoder": encoder}
    decoder = source(cfg.decoder_source)
    if decoder.family != encoder.family:
        raise UserError(f"adapt.source is {encoder.family} but adapt.decoder_source is {decoder.family}: "
                        "a pair must come from one family")
    return {"encoder": encoder, "decoder": decoder}


def check_pairing(cfg: AdaptConfig, opened: Optional[Dict[str, Source]] = None) -> None:
    """What adapting `cfg` would refuse, found without reading weights: the sources open and form a
    pair of one family, and the layer selections fit them (UserError naming the key). `opened` as
    in open_sources."""
    design(cfg, open_sources(cfg, opened))


def design(cfg: AdaptConfig, sources: Dict[str, Source]) -> Design:
    return DESIGNS[sources["encoder"].family](cfg, sources["encoder"], sources["decoder"])


def materialise(cfg: AdaptConfig, sources: Dict[str, Source], plan, sink: Callable[[str, torch.Tensor], None],
                progress: bool = True) -> List[dict]:
    """Build every target tensor in plan order, hand it to `sink`, return manifest entries.

    One tensor is alive at a time (plus whatever `sink` keeps).
    """
    dtype = _DTYPES[cfg.dtype]
    read = lambda role, name: sources[role].tensors.get(name)  # noqa: E731
    _check_source_shapes(sources, plan)
    entries = []
    for target in progress_bar(plan, desc="adapt: building tensors", unit="tensor", disable=not progress):
        rule = target.rule
        tensor = rule.build(read, target.shape, name_seed(cfg.seed, target.name)).to(dtype)
        if tuple(tensor.shape) != tuple(target.shape):
            raise UserError(f"{target.name}: rule {rule.describe()} gave shape {tuple(tensor.shape)}, "
                            f"expected {target.shape}; the source config and weights disagree")
        entry = {"target": target.name, "shape": list(target.shape), "dtype": cfg.dtype, "rule": rule.describe(),
                 "sha256": tensor_sha256(tensor)}
        if rule.role:
            source = sources[rule.role]
            entry.update(source=source.spec, source_tensor=source.tensors.raw_name(rule.source_name),
                         source_shape=list(source.tensors.shape(rule.source_name)))
        log.debug("%s <- %s %s", target.name, entry.get("source_tensor", "-"), entry["rule"])
        sink(target.name, tensor)
        entries.append(entry)
        del tensor
    return entries


def _check_source_shapes(sources: Dict[str, Source], plan) -> None:
    """Fail before writing anything when a source tensor is missing or has the wrong shape."""
    for target in plan:
        rule = target.rule
        if not rule.role:
            continue
        source = sources[rule.role]
        if rule.source_name not in source.tensors.names():
            raise UserError(f"source {source.spec} has no tensor {rule.source_name} (needed for {target.name}): "
                            "the checkpoint is incomplete or its config does not match its weights")
        if rule.same_shape and tuple(source.tensors.shape(rule.source_name)) != tuple(target.shape):
            raise UserError(f"source {source.spec} tensor {rule.source_name} has shape "
                            f"{tuple(source.tensors.shape(rule.source_name))} but {target.name} needs {target.shape}: "
                            "the source config does not match its weights")


def build_in_memory(cfg: AdaptConfig, progress: bool = False) -> Tuple[torch.nn.Module, Design, Dict[str, Source]]:
    """The adapted model as a live transformers module (tests, benchmarks); nothing is written."""
    sources = open_sources(cfg)
    target = design(cfg, sources)
    state: Dict[str, torch.Tensor] = {}
    materialise(cfg, sources, target.plan, state.__setitem__, progress=progress)
    model = target.model_class(target.config).to(_DTYPES[cfg.dtype])
    # The state holds each parameter once; tied aliases (decoder embedding, LM head) are the only
    # keys it lacks, and load_state_dict leaves those pointing at the shared tensor.
    _, unexpected = model.load_state_dict(state, strict=False)
    unset = {name for name, _ in model.named_parameters()} - set(state)
    if unset or unexpected:
        raise RuntimeError(f"adapted state does not fit the model: unset={sorted(unset)[:5]} unexpected={unexpected[:5]}")
    model.tie_weights()
    return model.eval(), target, sources


def run_adapt(cfg: AdaptConfig, out: str, key: str, denoising: Optional[dict] = None, force: bool = False) -> str:
    """Write the adapted checkpoint to `out` (a local directory or an s3:// prefix). Returns `out`.

    `denoising` (the sentinel and mode tokens preprocessing uses, jobs/data/plan.denoising_tokens,
    computed by the controller) is recorded in the exported tokenizer_config.json under
    "t5adapt_denoising", so the model and its tokenizer travel with the denoising vocabulary they
    are trained on. `key` is the stage key (it covers the config, the sources and `denoising`).

    A committed output of the same key is reused, an uncommitted one redone; committed output of
    another key is replaced only with force=True (jobs/core/commits.py).
    """
    digest = key
    if reusable(out, STAGE_INFO, digest, force) is not None:
        return out
    if storage.is_s3(out):
        # Shards stream into local files; the finished directory is then published as a commit.
        local = os.path.join(storage.cache_dir(), "adapt-staging", digest)
        run_adapt(cfg, local, key, denoising, force=True)
        publish(local, out)
        shutil.rmtree(local, ignore_errors=True)
        return out
    sources = open_sources(cfg)
    target = design(cfg, sources)
    staging = staging_dir(out)
    writer = StreamingWriter(staging, [(t.name, t.shape, _DTYPES[cfg.dtype]) for t in target.plan],
                             cfg.max_shard_mb * 2**20)
    entries = materialise(cfg, sources, target.plan, writer.write)
    files = writer.close()
    _write_metadata(cfg, staging, sources, target, entries, files, digest, denoising)
    commit(staging, out)
    counts = Counter(e["rule"].split("(")[0].split(":")[0] for e in entries)
    log.info("adapted %d tensors (%s) -> %s", len(entries), ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())), out)
    return out


def _write_metadata(cfg, staging, sources, target: Design, entries, files, digest, denoising) -> None:
    from transformers import GenerationConfig

    target.config.architectures = [target.model_class.__name__]
    target.config.dtype = cfg.dtype
    target.config.save_pretrained(staging)
    text = sources["decoder"].text_config
    generation = GenerationConfig(decoder_start_token_id=text.bos_token_id, bos_token_id=text.bos_token_id,
                                  eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id)
    source_generation = sources["decoder"].generation_config
    if source_generation is not None and source_generation.eos_token_id is not None:
        generation.eos_token_id = source_generation.eos_token_id
    generation.save_pretrained(staging)
    print("adapt: writing tokenizer", flush=True)
    tokenizer = sources["encoder"].load_tokenizer()
    tokenizer.save_pretrained(staging)
    if denoising is not None:
        _record_denoising_tokens(staging, denoising)
    with open(os.path.join(staging, MANIFEST), "w") as f:
        json.dump({"files": files, "tensors": entries}, f, indent=1)
    info = {
        "config_hash": digest,
        "adapt": asdict(cfg),
        "family": sources["encoder"].family,
        "model_class": target.model_class.__name__,
        "cross_attn_warmup": {"required": target.cross_attn_warmup, "steps": cfg.cross_attn_warmup_steps,
                              "trainable_patterns": ["cross_attn.", "cross_attn_layernorm."]},
    }
    with open(os.path.join(staging, STAGE_INFO), "w") as f:
        json.dump(info, f, indent=2)
    with open(os.path.join(staging, "README.md"), "w") as f:
        f.write(_model_card(cfg, sources, target, entries))


def _record_denoising_tokens(staging: str, denoising: dict) -> None:
    path = os.path.join(staging, "tokenizer_config.json")
    with open(path) as f:
        tokenizer_config = json.load(f)
    tokenizer_config["t5adapt_denoising"] = denoising
    with open(path, "w") as f:
        json.dump(tokenizer_config, f, indent=2)


def _model_card(cfg: AdaptConfig, sources, target: Design, entries) -> str:
    counts = Counter(e["rule"] for e in entries)
    made_from = sorted({s.description for s in sources.values()})
    lines = [
        "---", "library_name: transformers", "tags: [t5adapt, encoder-decoder, t5gemma]", "---", "",
        f"# {target.model_class.__name__.replace('ForConditionalGeneration', '')} adapted by t5adapt", "",
        "An encoder-decoder model initialised from a decoder-only model, as in T5Gemma / T5Gemma 2. "
        "**Not trained yet**: it is the starting point for UL2 or PrefixLM adaptation training.", "",
        "## Made from", *[f"- {d}" for d in made_from], "",
        "## How it was initialised", *[f"- {n}" for n in target.notes],
        f"- Tensors by rule: {', '.join(f'{rule}: {n}' for rule, n in counts.most_common())}. "
        f"Every tensor's source and checksum is in `{MANIFEST}`.", "",
        "## Load it", "```python", "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
        "model = AutoModelForSeq2SeqLM.from_pretrained(PATH)", "tokenizer = AutoTokenizer.from_pretrained(PATH)", "```", "",
        f"Adapt config: `{json.dumps(asdict(cfg))}`", "",
    ]
    return "\n".join(lines)
