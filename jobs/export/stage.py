"""The export stage: the trained model as a Hugging Face directory with a model card.

Input: the train stage's consolidated model (STORAGE/model) and the evaluation report (markdown).
Output (a commit, like every stage): the model files, README.md (a model card: sources, objective,
steps, tokens seen, the evaluation table) and t5adapt_export.json, COMMITTED last.
"""

import json
import os
import shutil
from typing import Optional

from jobs.core import storage
from jobs.core.commits import commit, finish, local_staging, publish, reusable, staging_dir

INFO = "t5adapt_export.json"
CARD = "README.md"


def run_export(model_dir: str, out: str, key: str, card: dict, evaluation_md: Optional[str] = None,
               force: bool = False) -> dict:
    """Copy the model in `model_dir` to `out` (a directory or an s3:// prefix) with a model card made
    from `card` (title, sources, pairing, objective, steps, tokens_seen, run, stage_keys) and the
    evaluation report. Returns the info dict written as t5adapt_export.json."""
    done = reusable(out, INFO, key, force)
    if done is not None:
        return done
    local_model = storage.local_copy(model_dir)
    local_out = local_staging(out)
    try:
        for name in os.listdir(local_model):
            if name in ("COMMITTED", CARD) or not os.path.isfile(os.path.join(local_model, name)):
                continue
            shutil.copy(os.path.join(local_model, name), os.path.join(local_out, name))
        with open(os.path.join(local_out, CARD), "w") as f:
            f.write(model_card(card, evaluation_md))
        info = {"config_hash": key, "model": model_dir, "card": card}
        with open(os.path.join(local_out, INFO), "w") as f:
            json.dump(info, f, indent=1)
        finish(local_out, out)
        return info
    finally:
        if storage.is_s3(out):
            shutil.rmtree(local_out, ignore_errors=True)


def copy_export(export_dir: str, destination: str) -> None:
    """Publish a finished export to another location (export.out / --out) as a commit."""
    local = storage.local_copy(export_dir)
    if storage.is_s3(destination):
        publish(local, destination)
        return
    staging = staging_dir(destination)
    for name in os.listdir(local):
        if name != "COMMITTED" and os.path.isfile(os.path.join(local, name)):
            shutil.copy(os.path.join(local, name), os.path.join(staging, name))
    commit(staging, destination)


def model_card(card: dict, evaluation_md: Optional[str]) -> str:
    """The README.md of an exported model."""
    lines = [
        "---", "library_name: transformers", "tags: [t5adapt, encoder-decoder, t5gemma]", "---", "",
        f"# {card.get('title', 'Encoder-decoder model')} (t5adapt)", "",
        "An encoder-decoder model initialised from a decoder-only model and trained with t5adapt "
        "(T5Gemma-style adaptation).", "",
        "## Made from", *[f"- {s}" for s in card.get("sources", [])],
        f"- Pairing: {card.get('pairing', '?')}", "",
        "## Training",
        f"- Objective: {card.get('objective', '?')}",
        f"- Optimizer steps: {card.get('steps', '?')}; tokens seen (padded): {card.get('tokens_seen', '?')}",
        f"- Run: `{card.get('run', '?')}`; stage keys: `{json.dumps(card.get('stage_keys', {}))}`", "",
        "## Evaluation (held-out data)", evaluation_md or "Not evaluated (evaluate.enabled=false).", "",
        "## Load it", "```python", "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
        "model = AutoModelForSeq2SeqLM.from_pretrained(PATH)", "tokenizer = AutoTokenizer.from_pretrained(PATH)", "```", "",
    ]
    return "\n".join(lines)
