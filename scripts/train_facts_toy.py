"""Train the zoo's `facts-gpt2` model: a small GPT-2 that completes factual prompts.

The model stands in for GPT-2 XL in ROME's causal tracing (Meng et al. 2022), which cannot
be downloaded here. It has to *store* facts, not memorise a handful of strings:

- the world: the real facts of experiments/data/facts_counterfact.json (CounterFact records)
  plus several hundred made-up subjects of the same kinds (people, countries, products,
  landmarks, ...) with attributes drawn at random, each fixed for all of that subject's prompts;
- made-up subjects are two words from small shared pools ("Mara Einstein", "North Kessia",
  "Orvo Station"), so neither word alone tells the attributes: the model must combine the
  subject's tokens, as a real model must for "Danielle Darrieux";
- every relation has five paraphrased templates and every prompt may carry filler text in
  front ("Trivia :"), so the answer has to come from the subject, wherever it sits;
- one template per fact is held out (for the real facts never the CounterFact prompt itself);
  accuracy on those held-out paraphrases shows the facts are stored by subject.

The loss is the cross-entropy of the answer at the prompt's last token. Outputs: an ordinary HF
checkpoint (GPT2LMHeadModel + a word-level tokenizer that puts <bos> in front of every prompt)
with training.json, and experiments/data/facts_toy_world.jsonl, every fact in CounterFact layout
with its `train_prompts` and held-out `paraphrase_prompts`.

    python scripts/train_facts_toy.py        # about 8 minutes on one (busy) CPU thread
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from causal.zoo import save_zoo_model, zoo_path

ROOT = Path(__file__).resolve().parents[1]
REAL_FACTS = ROOT / "experiments" / "data" / "facts_counterfact.json"
WORLD_FILE = ROOT / "experiments" / "data" / "facts_toy_world.jsonl"
BOS, UNK = "<bos>", "<unk>"
CONTEXT = 32
FILLER_RATE = 0.5  # share of training prompts with filler text in front

ANSWERS = {
    "language": ["French", "English", "Russian", "Spanish", "Portuguese", "German", "Italian", "Japanese",
                 "Dutch", "Swedish", "Polish", "Greek", "Arabic", "Finnish"],
    "country": ["Germany", "France", "Finland", "Sweden", "Tanzania", "Peru", "Australia", "Canada", "Japan",
                "Egypt", "Kenya", "Brazil", "Italy", "Spain", "Norway", "Chile", "India", "Mexico", "Austria",
                "Ireland"],
    "city": ["Tokyo", "Seoul", "Paris", "London", "Salzburg", "Berlin", "Liverpool", "Manchester", "Cairo",
             "Nairobi", "Rome", "Madrid", "Vienna", "Prague", "Oslo", "Lima", "Dublin", "Lisbon"],
    "continent": ["Africa", "Asia", "Europe", "Oceania"],
    "company": ["Microsoft", "Apple", "Sony", "Nintendo", "Google", "Samsung", "IBM", "Intel", "Philips",
                "Siemens", "Canon", "Nokia"],
    "field": ["physics", "biology", "chemistry", "mathematics", "medicine", "philosophy", "economics",
              "astronomy", "geology", "linguistics"],
    "sport": ["tennis", "golf", "football", "basketball", "cricket", "hockey", "baseball", "rugby",
              "volleyball", "swimming"],
    "currency": ["franc", "euro", "dollar", "yen", "pound", "peso", "rupee", "krona", "shilling"],
    "creator": ["Disney", "Marvel", "Pixar", "Nintendo", "Sega", "Hasbro", "Mattel", "Warner"],
}


@dataclass(frozen=True)
class Relation:
    subject_kind: str
    answer_kind: str
    templates: tuple[str, ...]  # "{}" marks the subject; the answer follows the last word


RELATIONS = {
    "P103": Relation("person", "language", (
        "The mother tongue of {} is", "The native language of {} is", "{} is a native speaker of",
        "{} grew up speaking", "The first language of {} is")),
    "P27": Relation("person", "country", (
        "{} is a citizen of", "{} holds a passport from", "{} has the citizenship of",
        "The home country of {} is", "{} is a national of")),
    "P19": Relation("person", "city", (
        "{} was born in the city of", "{} was born in", "The birthplace of {} is",
        "The city where {} was born is", "{} is a native of the city of")),
    "P101": Relation("person", "field", (
        "{} works in the field of", "The field of work of {} is", "{} is known for work in",
        "{} is a researcher in", "The area of research of {} is")),
    "P641": Relation("person", "sport", (
        "{} plays the sport of", "{} is a professional player of", "The sport played by {} is",
        "{} competes in the sport of", "{} is famous for playing")),
    "P30": Relation("country", "continent", (
        "{} is located in the continent of", "{} is part of the continent of", "The continent of {} is",
        "{} lies in", "{} is a country in")),
    "P36": Relation("country", "city", (
        "The capital of {} is", "The capital city of {} is", "{} has its capital in",
        "The seat of government of {} is in", "The government of {} sits in")),
    "P37": Relation("country", "language", (
        "The official language of {} is", "In {} , the official language is", "People in {} speak",
        "The main language spoken in {} is", "Most people in {} speak")),
    "P38": Relation("country", "currency", (
        "The currency of {} is the", "{} pays with the", "The money used in {} is the",
        "The official currency of {} is the", "In {} , people pay with the")),
    "P1376": Relation("capital", "country", (
        "{} is the capital city of", "{} is the capital of", "{} is the seat of government of",
        "{} serves as the capital of", "The country with its capital in {} is")),
    "P178": Relation("software", "company", (
        "{} is developed by", "The developer of {} is", "{} was developed by", "{} is software made by",
        "{} is a product of")),
    "P176": Relation("hardware", "company", (
        "{} is produced by", "{} is manufactured by", "The maker of {} is", "{} is made by",
        "The manufacturer of {} is")),
    "P159": Relation("company", "country", (
        "The headquarters of {} are in", "{} is headquartered in", "{} has its head office in",
        "The main office of {} is in", "{} is based in")),
    "P364": Relation("work", "language", (
        "The original language of {} is", "{} was originally written in", "{} was first published in",
        "The language of the original {} is", "{} was written in")),
    "P17": Relation("mountain", "country", (
        "{} is located in the country of", "{} can be found in the country of", "{} rises in the country of",
        "The country of {} is", "{} is a landmark in")),
    "P131": Relation("landmark", "city", (
        "The {} is located in the city of", "The {} can be found in the city of", "The {} stands in",
        "The city of the {} is", "Tourists visit the {} in")),
    "P740": Relation("band", "city", (
        "{} formed in the city of", "{} was founded in the city of", "{} started out in",
        "The hometown of {} is", "{} first played together in")),
    "P170": Relation("character", "creator", (
        "{} was created by", "The creator of {} is", "{} was invented by", "{} is the creation of",
        "{} first appeared in a film by")),
}

# Made-up subjects: two words from shared pools (the real subjects' words are among them).
STEMS = ["Valdor", "Kessia", "Morvan", "Tirrak", "Ostrel", "Zembla", "Quorra", "Brevia", "Lunara", "Carpath"]
CITY_STEMS = ["Alvenor", "Brisca", "Corvel", "Dunmar", "Elvik", "Farrow", "Gelm", "Harlo"]
BRANDS = ["Orvo", "Zentra", "Kali", "Mivo", "Quix", "Nexa", "Luma", "Pyra"]
NAME_POOLS = {
    "person": (["Albert", "Angela", "Leo", "Serena", "Danielle", "Mara", "Tobin", "Elsa", "Joran", "Ilse",
                "Kasimir", "Nadia", "Oren", "Petra", "Ruben", "Sven"],
               ["Einstein", "Merkel", "Tolstoy", "Williams", "Darrieux", "Brandt", "Castell", "Dorsey",
                "Ekland", "Falk", "Garrow", "Holm", "Ivers", "Kovac", "Moreau", "Novak"]),
    "country": (["North", "South", "East", "West", "New", "Upper"], STEMS),
    "capital": (["Port", "Fort", "Saint", "Lake"], CITY_STEMS),
    "software": (BRANDS, ["Office", "Studio", "Browser", "Engine", "Suite", "Player"]),
    "hardware": (BRANDS, ["Phone", "Station", "Tablet", "Camera", "Console", "Watch"]),
    "company": (BRANDS, ["Systems", "Group", "Labs", "Motors", "Foods", "Media"]),
    "work": (["Silent", "Golden", "Broken", "Hidden", "Crimson", "Quixote"],
             ["River", "Garden", "Crown", "Letters", "Mountain", "Winter"]),
    "mountain": (["Mount", "Cape", "Lake"], STEMS + ["Kilimanjaro"]),
    "landmark": (CITY_STEMS + ["Eiffel"], ["Tower", "Bridge", "Gate", "Palace", "Castle"]),
    "band": (["Crimson", "Velvet", "Electric", "Midnight", "Paper", "The"],
             ["Wolves", "Moons", "Kings", "Tigers", "Ghosts", "Beatles"]),
    "character": (["Captain", "Doctor", "Professor", "Little", "Super", "Mickey"],
                  ["Zorbo", "Quill", "Pip", "Bramble", "Nimbus", "Mouse"]),
}
SUBJECT_COUNTS = {"person": 120, "country": 30, "capital": 16, "software": 20, "hardware": 20, "company": 24,
                  "work": 20, "mountain": 16, "landmark": 20, "band": 16, "character": 16}
FILLERS = ["Fact :", "Trivia :", "Question :", "Here is a fact .", "As is well known ,",
           "According to the encyclopedia ,", "Everyone knows that", "In short ,", "Did you know ?"]


@dataclass
class Fact:
    relation_id: str
    subject: str
    answer: str
    answer_new: str
    prompt: str  # the record's own prompt (the CounterFact one for real facts)
    heldout: str  # the held-out paraphrase
    train: list[str]


def load_real_facts(path: Path = REAL_FACTS) -> list[dict]:
    records = json.loads(path.read_text())
    for record in records:
        rewrite = record["requested_rewrite"]
        relation = RELATIONS.get(rewrite["relation_id"])
        if relation is None or rewrite["prompt"] not in relation.templates:
            raise SystemExit(f"{path}: record {record['case_id']}: prompt {rewrite['prompt']!r} is not a template "
                             f"of relation {rewrite['relation_id']!r}: add it to RELATIONS")
    return records


def made_up_subjects(rng: random.Random, taken: set[str]) -> dict[str, list[str]]:
    """SUBJECT_COUNTS[kind] distinct two-word names per kind, none of them a real subject."""
    subjects = {}
    for kind, count in SUBJECT_COUNTS.items():
        firsts, seconds = NAME_POOLS[kind]
        names = [f"{a} {b}" for a in firsts for b in seconds if f"{a} {b}" not in taken]
        subjects[kind] = rng.sample(names, count)
        taken.update(subjects[kind])
    return subjects


def build_world(seed: int) -> list[Fact]:
    """Real facts first (in file order), then every relation of every made-up subject."""
    rng = random.Random(seed)
    facts = []
    real = load_real_facts()
    for record in real:
        rewrite = record["requested_rewrite"]
        templates = RELATIONS[rewrite["relation_id"]].templates
        heldout = rng.choice([t for t in templates if t != rewrite["prompt"]])
        facts.append(_fact(rewrite["relation_id"], rewrite["subject"], rewrite["target_true"]["str"],
                           rewrite["target_new"]["str"], rewrite["prompt"], heldout))
    subjects = made_up_subjects(rng, {r["requested_rewrite"]["subject"] for r in real})
    for relation_id, relation in RELATIONS.items():
        answers = ANSWERS[relation.answer_kind]
        for subject in subjects[relation.subject_kind]:
            answer, answer_new = rng.sample(answers, 2)
            heldout = rng.choice(relation.templates)
            prompt = next(t for t in relation.templates if t != heldout)
            facts.append(_fact(relation_id, subject, answer, answer_new, prompt, heldout))
    return facts


def _fact(relation_id: str, subject: str, answer: str, answer_new: str, prompt: str, heldout: str) -> Fact:
    train = [t.replace("{}", subject) for t in RELATIONS[relation_id].templates if t != heldout]
    return Fact(relation_id, subject, answer, answer_new, prompt, heldout.replace("{}", subject), train)


def world_records(facts: list[Fact]) -> list[dict]:
    """CounterFact layout, so `data counterfact(path=...)` reads the world file too."""
    return [{"case_id": i, "requested_rewrite": {
                "prompt": f.prompt, "relation_id": f.relation_id, "subject": f.subject,
                "target_true": {"str": f.answer}, "target_new": {"str": f.answer_new}},
             "train_prompts": f.train, "paraphrase_prompts": [f.heldout]} for i, f in enumerate(facts)]


def word_vocab_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over every word of `texts`; <bos> goes in front of every prompt.

    Words are split at whitespace and punctuation, so " French" (the leading space ROME gives
    answers) is the one token "French", and a two-word subject stays two tokens.
    """
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for text in texts for w, _ in pre.pre_tokenize_str(text)})
    vocab = {BOS: 0, UNK: 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=BOS,
                                   unk_token=UNK)


def all_texts(facts: list[Fact]) -> list[str]:
    return ([t for r in RELATIONS.values() for t in r.templates] + FILLERS
            + [w for pool in NAME_POOLS.values() for part in pool for w in part]
            + [f.subject for f in facts] + [a for pool in ANSWERS.values() for a in pool])


class Encoder:
    """Prompts -> right-padded id tensors, the index of each prompt's last token, answer ids."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast):
        self.tokenizer = tokenizer
        self.cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self.cache:
            ids = self.tokenizer(text)["input_ids"]
            if self.tokenizer.unk_token_id in ids:
                raise SystemExit(f"{text!r} has a word outside the vocabulary")
            self.cache[text] = ids
        return self.cache[text]

    def batch(self, prompts: list[str], answers: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = [self.ids(p) for p in prompts]
        ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        last = torch.tensor([len(r) - 1 for r in rows])
        targets = torch.tensor([self.ids(" " + a)[1] for a in answers])  # [<bos>, answer]
        return ids, last, targets


def answer_logits(model: GPT2LMHeadModel, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Logits at each prompt's last token only (right padding never reaches real tokens)."""
    mask = (torch.arange(ids.shape[1])[None] <= last[:, None]).long()
    hidden = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
    return model.lm_head(hidden[torch.arange(len(ids)), last])


@torch.no_grad()
def accuracy(model: GPT2LMHeadModel, encoder: Encoder, prompts: list[str], answers: list[str]) -> float:
    model.eval()
    hits = 0
    for start in range(0, len(prompts), 512):
        ids, last, targets = encoder.batch(prompts[start:start + 512], answers[start:start + 512])
        hits += int((answer_logits(model, ids, last).argmax(-1) == targets).sum())
    model.train()
    return hits / len(prompts)


def evaluate(model: GPT2LMHeadModel, encoder: Encoder, facts: list[Fact], n_real: int, seed: int) -> dict:
    rng = random.Random(seed)
    with_filler = [f"{rng.choice(FILLERS)} {f.heldout}" for f in facts]
    return {
        "train_prompts": accuracy(model, encoder, [p for f in facts for p in f.train],
                                  [f.answer for f in facts for _ in f.train]),
        "heldout_paraphrases": accuracy(model, encoder, [f.heldout for f in facts], [f.answer for f in facts]),
        "heldout_paraphrases_with_filler": accuracy(model, encoder, with_filler, [f.answer for f in facts]),
        "real_counterfact_prompts": accuracy(model, encoder, [f.prompt.replace("{}", f.subject) for f in facts[:n_real]],
                                             [f.answer for f in facts[:n_real]]),
        "real_heldout_paraphrases": accuracy(model, encoder, [f.heldout for f in facts[:n_real]],
                                             [f.answer for f in facts[:n_real]]),
    }


def train(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    facts = build_world(args.seed)
    n_real = len(load_real_facts())
    tokenizer = word_vocab_tokenizer(all_texts(facts))
    encoder = Encoder(tokenizer)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=CONTEXT, n_embd=args.d_model, n_layer=args.layers,
                        n_head=args.heads, n_inner=4 * args.d_model, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    pairs = [(p, f.answer) for f in facts for p in f.train]
    start, log = time.time(), []
    for step in range(args.steps):
        chosen = rng.choices(pairs, k=args.batch)
        prompts = [f"{rng.choice(FILLERS)} {p}" if rng.random() < FILLER_RATE else p for p, _ in chosen]
        ids, last, targets = encoder.batch(prompts, [a for _, a in chosen])
        loss = torch.nn.functional.cross_entropy(answer_logits(model, ids, last), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            entry = {"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - start, 1)}
            if step % (4 * args.log_every) == 0 or step == args.steps - 1:
                entry |= {k: round(v, 4) for k, v in evaluate(model, encoder, facts, n_real, args.seed).items()}
            log.append(entry)
            print(json.dumps(entry), flush=True)
    model.eval()
    record = {
        "architecture": "GPT2LMHeadModel", "layers": args.layers, "d_model": args.d_model, "heads": args.heads,
        "d_mlp": 4 * args.d_model, "vocab": len(tokenizer), "context": CONTEXT,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": args.steps, "batch": args.batch, "lr": args.lr, "weight_decay": args.weight_decay,
        "schedule": "200 warm-up steps, cosine decay to 0.1 x lr", "optimizer": "AdamW", "seed": args.seed,
        "loss": "cross-entropy of the answer at the prompt's last token",
        "world": {"facts": len(facts), "real_facts": n_real, "made_up_subjects": SUBJECT_COUNTS,
                  "relations": len(RELATIONS), "templates_per_relation": 5, "train_prompts": len(pairs),
                  "fillers": FILLERS, "filler_rate": FILLER_RATE},
        "heldout": "per fact one of its relation's 5 templates (never the CounterFact prompt of a real fact)",
        "final_accuracy": {k: round(v, 4) for k, v in evaluate(model, encoder, facts, n_real, args.seed).items()},
        "train_seconds": round(time.time() - start, 1), "torch_threads": torch.get_num_threads(),
        "log": log,
    }
    save_zoo_model(args.out, model, tokenizer, record)
    args.world.write_text("".join(json.dumps(r) + "\n" for r in world_records(facts)))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--out", type=Path, default=zoo_path("facts-gpt2"))
    parser.add_argument("--world", type=Path, default=WORLD_FILE)
    args = parser.parse_args()
    record = train(args)
    print(json.dumps({k: v for k, v in record.items() if k != "log"}, indent=2))


if __name__ == "__main__":
    main()
