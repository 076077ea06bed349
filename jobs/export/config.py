"""Configuration of the export stage (trained model + evaluation -> a Hugging Face directory)."""

from dataclasses import dataclass
from typing import Optional


@dataclass
class ExportConfig:
    # A copy of the export also goes here (a directory or an s3:// prefix); the export itself always
    # lives in the stage store. Not part of the stage key: another destination reuses the export.
    out: Optional[str] = None
