"""What a checkpoint's model card says about its use: the YAML front matter of its README.md.

Hugging Face model cards keep metadata in front matter; two keys matter to the page: ``domain`` (what
the model knows, shown next to its name) and ``conversation`` ("single-turn" or "multi-turn": whether
the page sends earlier turns with each question by default). A card without them, or no card, says
nothing: the page then defaults to multi-turn, as chat models are trained.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

MAX_CARD_BYTES = 1 << 20


def read_card(model_dir: str | Path | None) -> dict:
    """{"domain": str, "conversation": "single-turn" | "multi-turn"} as far as the card says, else {}."""
    if not model_dir:
        return {}
    path = Path(model_dir) / "README.md"
    try:
        if not path.is_file() or path.stat().st_size > MAX_CARD_BYTES:
            return {}
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    import yaml  # transformers' own dependency (PyYAML)

    try:
        meta = yaml.safe_load(text[3:end]) or {}
    except yaml.YAMLError:
        log.warning("the model card's front matter in %s is not valid YAML: ignored", path)
        return {}
    if not isinstance(meta, dict):
        return {}
    out = {}
    if isinstance(meta.get("domain"), str) and meta["domain"].strip():
        out["domain"] = " ".join(meta["domain"].split())
    if meta.get("conversation") in ("single-turn", "multi-turn"):
        out["conversation"] = meta["conversation"]
    return out
