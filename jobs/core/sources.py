"""Opening a decoder-only source checkpoint: a local Hugging Face directory, an s3:// prefix,
a .gguf file, or a builtin name. Returns its config and a lazy tensor reader with canonical names.

Canonical tensor names drop the wrapper prefixes so both families map the same way:
`embed_tokens.weight`, `norm.weight`, `layers.{i}.self_attn.q_proj.weight`, ...
"""

import glob
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from jobs.core import builtin
from jobs.core.tensors import GGUFTensorReader, SafetensorsReader
from jobs.core import storage
from jobs.core.errors import UserError

# model_type -> family. Gemma 2 becomes T5Gemma, Gemma 3 becomes T5Gemma 2.
FAMILIES = {"gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
# Wrapper prefixes seen in Gemma checkpoints (CausalLM, multimodal ConditionalGeneration, old layouts).
_PREFIX = re.compile(r"^(model\.language_model\.|language_model\.model\.|model\.)")


@dataclass
class Source:
    spec: str  # as the user wrote it
    family: str  # "gemma2" | "gemma3"
    text_config: Any  # Gemma2Config | Gemma3TextConfig
    tensors: Any  # SafetensorsReader | GGUFTensorReader, keyed by canonical names
    load_tokenizer: Callable[[], Any]
    description: str  # one line for the model card
    generation_config: Optional[Any] = None


class _Renamed:
    """A reader whose names are the canonical ones (prefixes stripped, lm_head dropped if tied)."""

    def __init__(self, reader, spec: str):
        self._reader = reader
        self._raw: Dict[str, str] = {}
        for raw in reader.names():
            if raw.startswith(("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.")):
                continue  # a multimodal Gemma 3's vision side: the encoder-decoder export is text-only
            name = _PREFIX.sub("", raw)
            if name in self._raw:
                raise UserError(f"source {spec} has two tensors that both mean {name}: {self._raw[name]} and {raw}")
            self._raw[name] = raw

    def names(self):
        return list(self._raw)

    def shape(self, name):
        return self._reader.shape(self._raw[name])

    def group(self, name):
        return self._reader.group(self._raw[name])

    def get(self, name):
        return self._reader.get(self._raw[name])

    def raw_name(self, name):
        """The tensor's name as stored in the source checkpoint."""
        return self._raw[name]


def open_source(spec: str) -> Source:
    """Resolve a source spec to a Source. Raises UserError naming the spec when it cannot be used."""
    path = _local_path(spec)
    gguf = _find_gguf(path)
    if gguf:
        return _open_gguf(spec, gguf)
    return _open_hf_dir(spec, path)


def source_identity(spec: str) -> list:
    """What a source spec currently points at, for stage keys: a builtin's name (and the version of
    the package that ships it), or every file's name with its size and modification time (local) or
    ETag (s3://). A source edited in place gets a new identity, so its old outputs are not reused."""
    if spec.startswith("builtin:"):
        return [spec, builtin.version(spec)]
    if storage.is_s3(spec):
        return storage.object_identities(spec)
    return storage.file_identities(_existing_path(spec))


def load_tokenizer(spec: str):
    """The tokenizer of a source spec (same forms as open_source), without touching its weights."""
    from transformers import AutoTokenizer

    path = _local_path(spec)
    gguf = _find_gguf(path)
    folder = _gguf_metadata(spec, gguf) if gguf else path
    return _tokenizer_or_error(spec, lambda: AutoTokenizer.from_pretrained(folder))


def load_causal_lm(spec: str, dtype=None):
    """The source as a live decoder-only transformers model (eval mode, `dtype`, default float32),
    for comparisons with the encoder-decoder made from it. Same spec forms as open_source.

    Built from the source's text config and read through its tensor reader, so every form takes one
    path: a GGUF is dequantised tensor by tensor with its cached metadata (transformers' own GGUF
    loading re-parses the token tables first), and a multimodal Gemma 3 gives its text model.
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights

    source = open_source(spec)
    with no_init_weights():  # every weight is loaded next; a random init of 270M costs ~20 s on 2 cores
        model = AutoModelForCausalLM.from_config(source.text_config, dtype=dtype or torch.float32)
    # Canonical names drop the wrapper prefix; the text model of a *ForCausalLM lives under "model.".
    state = {name if name.startswith("lm_head.") else f"model.{name}": source.tensors.get(name)
             for name in source.tensors.names()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if name != "lm_head.weight" or not model.config.tie_word_embeddings]
    if missing or unexpected:
        raise UserError(f"source {spec} does not fit its own config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.eval()


def _local_path(spec: str) -> str:
    if spec.startswith("builtin:"):
        return builtin.materialise(spec)
    if storage.is_s3(spec):
        return storage.download_prefix(spec)
    return _existing_path(spec)


def _existing_path(spec: str) -> str:
    path = os.path.expanduser(spec)
    if not os.path.exists(path):
        raise UserError(f"source {spec} does not exist: give a Hugging Face directory, a .gguf file, "
                        f"an s3:// prefix or one of {', '.join(builtin.NAMES)}")
    return path


def _find_gguf(path: str) -> Optional[str]:
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return path
        raise UserError(f"source {path} is a file but not a .gguf: give a Hugging Face directory or a .gguf file")
    if os.path.isfile(os.path.join(path, "config.json")):
        return None
    found = sorted(glob.glob(os.path.join(path, "*.gguf")))
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise UserError(f"source {path} holds several .gguf files ({', '.join(map(os.path.basename, found))}): name one")
    raise UserError(f"source {path} has no config.json and no .gguf file: it is not a model checkpoint")


def _family(spec: str, model_type: str) -> str:
    if model_type not in FAMILIES:
        raise UserError(
            f"source {spec} is a {model_type!r} model; t5adapt adapts Gemma 2 (gemma2 -> T5Gemma) and "
            "Gemma 3 (gemma3_text / gemma3 -> T5Gemma 2) decoder-only models"
        )
    return FAMILIES[model_type]


def _open_hf_dir(spec: str, path: str) -> Source:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    with open(os.path.join(path, "config.json")) as f:
        model_type = json.load(f).get("model_type", "<none>")
    family = _family(spec, model_type)
    config = AutoConfig.from_pretrained(path)
    text_config = config.get_text_config() if model_type == "gemma3" else config
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    missing = [f for f in files if not os.path.isfile(f)]
    if not files or missing:
        raise UserError(f"source {spec} has no safetensors weights{' (missing: ' + ', '.join(missing) + ')' if missing else ''}: "
                        "t5adapt reads safetensors only (save the model with safe_serialization=True)")
    try:
        generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        generation_config = None
    return Source(
        spec=spec, family=family, text_config=text_config,
        tensors=_Renamed(SafetensorsReader(files), spec),
        load_tokenizer=lambda: _tokenizer_or_error(spec, lambda: AutoTokenizer.from_pretrained(path)),
        description=f"{model_type} checkpoint `{spec}` ({len(files)} safetensors file(s))",
        generation_config=generation_config,
    )


def _open_gguf(spec: str, gguf_path: str) -> Source:
    from transformers import AutoConfig, AutoTokenizer

    metadata = _gguf_metadata(spec, gguf_path)
    config = AutoConfig.from_pretrained(metadata)
    family = _family(spec, config.model_type)
    return Source(
        spec=spec, family=family, text_config=config,
        tensors=_Renamed(GGUFTensorReader(gguf_path, config), spec),
        load_tokenizer=lambda: AutoTokenizer.from_pretrained(metadata),
        description=f"GGUF file `{spec}` ({os.path.basename(gguf_path)}), dequantised to float32 tensor by tensor",
        generation_config=None,
    )


def _gguf_metadata(spec: str, gguf_path: str) -> str:
    """A directory with the GGUF's config and tokenizer in Hugging Face form.

    transformers parses every metadata field (262k-entry token tables for Gemma) to read a GGUF
    config: about a minute on 2 cores. Done once per file (keyed by path, size and mtime), then cached;
    concurrent callers (training ranks, actors) wait for the first.
    """
    stat = os.stat(gguf_path)
    key = hashlib.sha256(f"{os.path.abspath(gguf_path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    path = os.path.join(storage.cache_dir(), "gguf-metadata", key)
    with storage.cache_lock(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            _write_gguf_metadata(spec, gguf_path, path)
    return path


def _write_gguf_metadata(spec: str, gguf_path: str, path: str) -> None:
    from transformers import AutoConfig, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    print(f"reading GGUF metadata and tokenizer of {gguf_path} (once per file; about 1-2 min for Gemma 3 270M)", flush=True)
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"cannot read GGUF source {spec}: {e}") from None
    _family(spec, config.model_type)  # refuse other architectures before the slow tokenizer
    config.quantization_config = None
    tokenizer = _tokenizer_or_error(spec, lambda: AutoTokenizer.from_pretrained(folder, gguf_file=name))
    staging = path + ".part"
    shutil.rmtree(staging, ignore_errors=True)
    config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(staging, path)


def _tokenizer_or_error(spec: str, load):
    try:
        return load()
    except (OSError, ValueError) as e:
        raise UserError(f"source {spec} has no usable tokenizer ({e}); save one next to the weights") from None
