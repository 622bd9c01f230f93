"""Train the zoo's `hiereq-gpt2` model on hierarchical equality (Geiger et al., DAS, 2023).

A tiny GPT-2 (a plain HF GPT2LMHeadModel) reads "A A C D =" and answers " true" when (a == b)
is the same as (c == d), " false" otherwise, at the '=' position. The alignment experiments
(experiments/das_hiereq.cx and the tests) search it for the high-level model's variables
WX = (a == b) and YZ = (c == d). Its tokenizer is word-level: the ten shapes, '=', the two
answers and GPT-2's special token.

The script writes an ordinary HF checkpoint (config.json, model.safetensors, tokenizer files)
and training.json, the settings and held-out accuracy.

    python scripts/train_hiereq_toy.py --aux   # about 9 minutes on two CPU cores

Without --aux (the output alone) every recipe tried stayed at chance: the two equalities are
learned first when they are targets too, and then the output from them.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from causal.tasks.hiereq import ANSWERS, SHAPES, draw, output, prompt
from causal.zoo import save_zoo_model, zoo_path

SPECIAL = "<|endoftext|>"
HELDOUT_SEED = 1  # held-out inputs; training inputs come from TRAIN_SEED onwards
TRAIN_SEED = 1000


def hiereq_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    words = [SPECIAL, *SHAPES, "=", *(answer.strip() for answer in ANSWERS.values())]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=SPECIAL))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, unk_token=SPECIAL,
                                   pad_token=SPECIAL)


def batch(tokenizer, n: int, seed: int, aux: bool = False):
    """(n, 5) prompt ids and (n,) answer ids of n fresh inputs; with `aux`, (n, 3) answers: each equality at its
    second shape, then the output."""
    rng = random.Random(seed)
    inputs = [draw(rng) for _ in range(n)]
    ids = torch.tensor([tokenizer(prompt(shapes))["input_ids"] for shapes, _ in inputs])
    word = lambda truth: tokenizer.convert_tokens_to_ids(ANSWERS[truth].strip())
    answers = torch.tensor([word(output(values)) for _, values in inputs])
    if not aux:
        return ids, answers
    parts = torch.tensor([[word(values["wx"]), word(values["yz"])] for _, values in inputs])
    return ids, torch.cat([parts, answers[:, None]], 1)


def accuracy(model, tokenizer, n: int, seed: int) -> float:
    ids, answers = batch(tokenizer, n, seed)
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits[:, -1]
    return round((logits.argmax(-1) == answers).float().mean().item(), 4)


def train(steps: int, size: int, lr: float, seed: int, layers: int, width: int, heads: int, out: Path,
          aux: bool) -> dict:
    torch.manual_seed(seed)
    tokenizer = hiereq_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=8, n_embd=width, n_layer=layers, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                        pad_token_id=0, tie_word_embeddings=False)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    start, curve = time.time(), []
    for step in range(steps):
        ids, answers = batch(tokenizer, size, TRAIN_SEED + seed * steps + step, aux=aux)
        logits = model.train()(input_ids=ids).logits
        if aux:  # the equalities at b and d (positions 1 and 3) as well as the output at '='
            loss = torch.nn.functional.cross_entropy(logits[:, [1, 3, 4]].flatten(0, 1), answers.flatten())
        else:
            loss = torch.nn.functional.cross_entropy(logits[:, -1], answers)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            monitor = accuracy(model, tokenizer, 1000, HELDOUT_SEED + 1)
            curve.append((step, round(loss.item(), 4), monitor))
            print(f"step {step:5d}  loss {loss.item():.4f}  monitored accuracy {monitor:.3f}", flush=True)
    record = {
        "architecture": f"GPT2LMHeadModel, {layers} layers, d_model {width}, {heads} heads, context 8",
        "tokenizer": f"word-level: {len(tokenizer)} tokens (ten shapes A..J, '=', true, false, {SPECIAL})",
        "task": "hiereq inputs ('A A C D ='); cross-entropy of ' true' / ' false' at '='"
                + (" and of each equality at its second shape (positions 1 and 3)" if aux else " only"), "aux": aux,
        "training_data": f"fresh inputs each step from seed {TRAIN_SEED} + seed * steps + step",
        "steps": steps, "batch": size, "lr": lr, "optimizer": "AdamW (weight decay 0.01), one-cycle", "seed": seed,
        "by_step": {"columns": ["step", "loss", f"accuracy_seed_{HELDOUT_SEED + 1}"], "rows": curve},
        "heldout_accuracy": accuracy(model, tokenizer, 4000, HELDOUT_SEED),
        "train_seconds": round(time.time() - start, 1),
        "torch_threads": torch.get_num_threads(),
    }
    save_zoo_model(out, model, tokenizer, record)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--aux", action="store_true", help="also train each equality at its second shape")
    parser.add_argument("--out", type=Path, default=zoo_path("hiereq-gpt2"))
    args = parser.parse_args()
    record = train(args.steps, args.batch, args.lr, args.seed, args.layers, args.width, args.heads, args.out, args.aux)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
