"""Toy models shipped with the package, addressed as `zoo:<name>` in experiment files."""
from __future__ import annotations

from pathlib import Path

from . import attn_only  # noqa: F401  (registers the attn-only architecture with transformers)

ZOO_DIR = Path(__file__).parent


def zoo_names() -> list[str]:
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / "config.json").exists())


def sae_names() -> list[str]:
    """Sparse autoencoders shipped here (SAELens' folder format), addressed as `zoo:<name>` in sae(...) sites."""
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / "cfg.json").exists())


def zoo_path(name: str) -> Path:
    return ZOO_DIR / name


def save_zoo_model(folder: Path, model, tokenizer, record: dict) -> None:
    """A zoo entry: an ordinary HF checkpoint (so it loads like any model) plus how it was trained."""
    import json
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def word_tokenizer(vocab_size: int):
    """Word-level tokenizer over `t0 .. t{n-1}` (t0 doubles as BOS), so toy prompts are readable text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", unk_token="t0", pad_token="t0")
