"""Train the zoo's `attn-only-2l` model on random token sequences repeated once.

A 2-layer attention-only transformer trained on this task forms a previous-token
head in layer 0 and induction heads in layer 1 (Olsson et al., 2022). The script
writes an ordinary HF checkpoint (config.json, model.safetensors, tokenizer.json)
so the model loads through the same path as any HF model.

    python scripts/train_toy.py            # about 2 minutes on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from causal.zoo import save_zoo_model, word_tokenizer, zoo_path
from causal.zoo.attn_only import AttnOnlyConfig, AttnOnlyForCausalLM

VOCAB = 64
BOS = 0
CONTEXT = 48


def repeated_batch(gen: torch.Generator, batch: int, min_len: int, max_len: int,
                   filler: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of BOS + random tokens in which a random segment is repeated once, at a random place.

    Each row draws its own segment length and offset, so position alone never tells where
    the earlier copy is: the model has to find it by content, which is what previous-token
    and induction heads do. BOS (t0, never drawn elsewhere) gives heads a place to rest.
    Returns the ids and a mask of the positions whose next token is a predictable repeat.
    """
    width = CONTEXT if filler else 1 + 2 * max_len
    ids = torch.randint(1, VOCAB, (batch, width), generator=gen)
    ids[:, 0] = BOS
    predictable = torch.zeros(batch, width, dtype=torch.bool)
    for row in range(batch):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        start = 1 + (int(torch.randint(0, width - 2 * length, (1,), generator=gen)) if filler else 0)
        ids[row, start + length:start + 2 * length] = ids[row, start:start + length]
        predictable[row, start + length:start + 2 * length - 1] = True
    return ids, predictable


def repeated_half_loss(logits: torch.Tensor, ids: torch.Tensor, predictable: torch.Tensor) -> torch.Tensor:
    """Next-token loss on the positions whose target is predictable by induction."""
    logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    return -logp[predictable[:, :-1]].mean()


def train(steps: int, batch: int, lr: float, seed: int, out: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    config = AttnOnlyConfig(
        vocab_size=VOCAB, max_position_embeddings=CONTEXT, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, rotary_pct=1.0, use_parallel_residual=False,
        hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=BOS, eos_token_id=BOS, tie_word_embeddings=False,
    )
    model = AttnOnlyForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    start, first_loss = time.time(), None
    for step in range(steps):
        ids, predictable = repeated_batch(gen, batch, 6, 20)
        out_ = model(input_ids=ids, labels=ids)
        opt.zero_grad()
        out_.loss.backward()
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            rep = repeated_half_loss(out_.logits.detach(), ids, predictable).item()
            first_loss = rep if first_loss is None else first_loss
            print(f"step {step:5d}  loss {out_.loss.item():.3f}  repeated-half loss {rep:.3f}", flush=True)
    model.eval()
    with torch.no_grad():
        ids, predictable = repeated_batch(torch.Generator().manual_seed(seed + 1), 512, 10, 10, filler=False)
        final = repeated_half_loss(model(input_ids=ids).logits, ids, predictable).item()
    record = {
        "steps": steps, "batch": batch, "lr": lr, "optimizer": "AdamW", "seed": seed,
        "task": "48 tokens: BOS + random tokens with a random segment (length 6..20, random place) repeated once",
        "heldout": "512 sequences: BOS + 10 random tokens repeated once",
        "repeated_half_loss_start": round(first_loss, 3),
        "repeated_half_loss_final_heldout": round(final, 3),
        "train_seconds": round(time.time() - start, 1),
        "torch_threads": torch.get_num_threads(),
    }
    save_zoo_model(out, model, word_tokenizer(VOCAB), record)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=zoo_path("attn-only-2l"))
    args = parser.parse_args()
    print(json.dumps(train(args.steps, args.batch, args.lr, args.seed, args.out), indent=2))


if __name__ == "__main__":
    main()
