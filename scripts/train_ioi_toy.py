"""Train the zoo's `ioi-2l` model on indirect object identification (Wang et al. 2022).

GPT-2 cannot be downloaded here, so the IOI experiments run offline on this toy: the
zoo's 2-layer attention-only GPT-NeoX (a plain HF subclass, loaded through the GPT-NeoX
adapter like any Pythia checkpoint) trained on prompts of the `ioi` generator to name
the indirect object at the last position. Its tokenizer is word-level over every word,
punctuation mark and name the IOI templates produce, split the way GPT-2 splits them
(" Mary" is one token, written "ĠMary"), so prompts, answers and named positions behave
as they do on GPT-2.

The script writes an ordinary HF checkpoint (config.json, model.safetensors, tokenizer
files) and training.json, the settings and held-out results.

    python scripts/train_ioi_toy.py         # 3 to 8 minutes on one CPU core

What the model learns, with these defaults (seed 0): layer-0 heads at the last position
attend to S2, the repeated name (S-inhibition), and at " and" to the name before it;
layer-1 heads (name movers) attend to IO (or to " and" when it follows IO) and carry about
80% of the direct logit difference from step 500 on. The split depends on the run: a
2000-step schedule, weight decay 1.0 or seed 1 lean more on a layer-0 head that attends to
S2 and writes -S straight to the logits, or have the movers read IO from the token after
it. tests/test_ioi.py checks the shipped weights.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from causal.tasks import ioi
from causal.tasks.ioi import NAMES, OBJECTS, PLACES, TEMPLATES
from causal.zoo import save_zoo_model, zoo_path
from causal.zoo.attn_only import AttnOnlyConfig, AttnOnlyForCausalLM

SPECIAL = "<|endoftext|>"  # GPT-2's one special token: BOS, EOS, padding, and the unknown word
HELDOUT_SEED = 1  # the seed the shipped experiments use; training seeds start at TRAIN_SEED_BASE
MONITOR_SEED = 2  # held-out prompts whose accuracy is logged during training
TRAIN_SEED_BASE = 1000
CONTEXT = 32  # the longest IOI prompt is 20 tokens


def ioi_words() -> list[str]:
    """Every token the IOI prompts and answers produce, as text: "Then", ",", " and", " Mary", ..."""
    from tokenizers import pre_tokenizers
    split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pieces = set()
    for template in TEMPLATES["ABBA"] + TEMPLATES["BABA"]:
        text = re.sub(r"\[(A|B|PLACE|OBJECT)\]", "X", template)
        pieces |= {piece for piece, _ in split.pre_tokenize_str(text)}
    pieces -= {"ĠX", "X"}
    words = sorted(piece.replace("Ġ", " ") for piece in pieces)
    return words + [" " + word for word in PLACES + OBJECTS + NAMES]


def ioi_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's pre-tokenization (byte-level, leading space kept) over a word-level IOI vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    to_bytes = {" ": "Ġ"}  # the only non-printable character in the vocabulary
    vocab = {SPECIAL: 0}
    for word in ioi_words():
        vocab.setdefault("".join(to_bytes.get(c, c) for c in word), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL,
                                   unk_token=SPECIAL, pad_token=SPECIAL)


def ioi_batch(tokenizer, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Right-padded clean prompts of `ioi(n, seed)` with their last positions and IO / S token ids."""
    columns = ioi(tokenizer, n=n, seed=seed).columns
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in columns["clean"]]
    lengths = torch.tensor([len(row) for row in rows])
    ids = torch.zeros(n, int(lengths.max()), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)

    def answers(column: str) -> torch.Tensor:
        return torch.tensor([tokenizer.convert_tokens_to_ids(name.replace(" ", "Ġ")) for name in columns[column]])
    return {"ids": ids, "last": lengths - 1, "io": answers("io"), "s": answers("s")}


def answer_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token logits at each prompt's last position (padding is to the right, so never seen)."""
    logits = model(input_ids=batch["ids"]).logits
    return logits[torch.arange(len(batch["ids"])), batch["last"]]


def evaluate(model, tokenizer, n: int, seed: int) -> dict:
    """Held-out accuracy (IO is the top token) and logit difference IO - S, overall and per family."""
    batch = ioi_batch(tokenizer, n, seed)
    with torch.no_grad():
        logits = answer_logits(model.eval(), batch)
    rows = torch.arange(n)
    diff = logits[rows, batch["io"]] - logits[rows, batch["s"]]
    correct = (logits.argmax(-1) == batch["io"]).float()
    families = ioi(tokenizer, n=n, seed=seed).columns["template"]
    record = {"n": n, "seed": seed, "accuracy": round(correct.mean().item(), 4),
              "logit_diff_mean": round(diff.mean().item(), 3), "logit_diff_min": round(diff.min().item(), 3),
              "io_beats_s": round((diff > 0).float().mean().item(), 4),
              "io_prob_mean": round(logits.softmax(-1)[rows, batch["io"]].mean().item(), 4)}
    for family in ("ABBA", "BABA"):
        mask = torch.tensor([f == family for f in families])
        record[f"accuracy_{family}"] = round(correct[mask].mean().item(), 4)
    return record


def train(steps: int, batch: int, lr: float, weight_decay: float, seed: int, layers: int, width: int,
          heads: int, out: Path) -> dict:
    torch.manual_seed(seed)
    tokenizer = ioi_tokenizer()
    config = AttnOnlyConfig(
        vocab_size=len(tokenizer), max_position_embeddings=CONTEXT, hidden_size=width, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=width, rotary_pct=1.0, use_parallel_residual=False,
        hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = AttnOnlyForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    start, losses = time.time(), []
    for step in range(steps):
        data = ioi_batch(tokenizer, batch, TRAIN_SEED_BASE + seed * steps + step)
        loss = torch.nn.functional.cross_entropy(answer_logits(model.train(), data), data["io"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            monitor = evaluate(model, tokenizer, 500, MONITOR_SEED)
            losses.append((step, round(loss.item(), 4), monitor["accuracy"], monitor["logit_diff_mean"]))
            print(f"step {step:5d}  answer loss {loss.item():.4f}  held-out accuracy {monitor['accuracy']:.3f}  "
                  f"logit diff {monitor['logit_diff_mean']:.2f}", flush=True)
    heldout = evaluate(model, tokenizer, 2000, HELDOUT_SEED)
    record = {
        "architecture": f"AttnOnlyForCausalLM (GPT-NeoX without MLPs, rotary positions), {layers} layers, "
                        f"d_model {width}, {heads} heads, context {CONTEXT}",
        "tokenizer": f"word-level over the IOI vocabulary ({len(tokenizer)} tokens), GPT-2 byte-level splitting",
        "task": "ioi(templates=mixed) clean prompts; cross-entropy of the IO name at the last position only",
        "training_data": f"ioi(n={batch}, seed={TRAIN_SEED_BASE} + seed * steps + step) at each step: never the "
                         f"held-out seed {HELDOUT_SEED} nor the monitoring seed {MONITOR_SEED}",
        "steps": steps, "batch": batch, "lr": lr, "schedule": "one-cycle (5% warm-up, cosine decay)",
        "optimizer": "AdamW", "weight_decay": weight_decay, "seed": seed,
        "by_step": {"columns": ["step", "answer_loss", f"accuracy_seed_{MONITOR_SEED}",
                                f"logit_diff_seed_{MONITOR_SEED}"], "rows": losses},
        "heldout": heldout,
        "train_seconds": round(time.time() - start, 1),
        "torch_threads": torch.get_num_threads(),
    }
    save_zoo_model(out, model, tokenizer, record)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=zoo_path("ioi-2l"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    record = train(args.steps, args.batch, args.lr, args.weight_decay, args.seed, args.layers, args.width,
                   args.heads, args.out)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
