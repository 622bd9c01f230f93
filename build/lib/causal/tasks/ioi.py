"""Indirect object identification (Wang et al. 2022, "Interpretability in the wild").

"When Mary and John went to the store, John gave a drink to" -> " Mary". The subject S
(John) is mentioned twice, the indirect object IO (Mary) once; the model should name IO.
Templates, places and objects are those of the paper's dataset code; a BABA template
mentions S first ("Then, John and Mary ..."), its ABBA twin mentions IO first.
"""
from __future__ import annotations

import random
import re
from typing import Literal

from causal.data.examples import Examples
from causal.data.load import register_generator
from causal.data.params import Count, Seed
from causal.errors import CausalError

# The paper's templates end with " [A]", the answer; the prompt is everything before it.
BABA_TEMPLATES = [
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
]


def _abba(template: str) -> str:
    """The ABBA twin, as the paper builds it: swap the first [B] and the first [A] (the first clause)."""
    first_b, first_a = template.index("[B]"), template.index("[A]")
    assert first_b < first_a
    return template[:first_b] + "[A]" + template[first_b + 3: first_a] + "[B]" + template[first_a + 3:]


TEMPLATES = {"BABA": BABA_TEMPLATES, "ABBA": [_abba(t) for t in BABA_TEMPLATES]}

PLACES = ["store", "garden", "restaurant", "school", "hospital", "office", "house", "station"]
OBJECTS = ["ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack"]

# Common US first names (the paper's list); only those the tokenizer encodes as one token are used.
NAMES = [
    "Michael", "Christopher", "Jessica", "Matthew", "Ashley", "Jennifer", "Joshua", "Amanda", "Daniel", "David",
    "James", "Robert", "John", "Joseph", "Andrew", "Ryan", "Brandon", "Jason", "Justin", "Sarah", "William",
    "Jonathan", "Stephanie", "Brian", "Nicole", "Nicholas", "Anthony", "Heather", "Eric", "Elizabeth", "Adam",
    "Megan", "Melissa", "Kevin", "Steven", "Thomas", "Timothy", "Christina", "Kyle", "Rachel", "Laura", "Lauren",
    "Amber", "Brittany", "Danielle", "Richard", "Kimberly", "Jeffrey", "Amy", "Crystal", "Michelle", "Tiffany",
    "Jeremy", "Benjamin", "Mark", "Emily", "Aaron", "Charles", "Rebecca", "Jacob", "Stephen", "Patrick", "Sean",
    "Erin", "Jamie", "Kelly", "Samantha", "Nathan", "Sara", "Dustin", "Paul", "Angela", "Tyler", "Scott",
    "Katherine", "Andrea", "Gregory", "Erica", "Mary", "Travis", "Lisa", "Kenneth", "Bryan", "Lindsey", "Kristen",
    "Jose", "Alexander", "Jesse", "Katie", "Lindsay", "Shannon", "Vanessa", "Courtney", "Christine", "Alicia",
    "Cody", "Allison", "Bradley", "Samuel",
]

NAMES_NEEDED = 5  # IO and S for the clean prompt, three other names for the ABC corruption
_SLOT = re.compile(r"\[(A|B|PLACE|OBJECT)\]")


@register_generator
def ioi(tokenizer, n: Count = 64, seed: Seed = 0, templates: Literal["mixed", "ABBA", "BABA"] = "mixed",
        corruption: Literal["ABC"] = "ABC") -> Examples:
    """IOI prompts with their ABC corruption.

    Columns: `clean` (the prompt, ending before the answer), `corrupt` (the same template,
    place and object with its three name slots filled by three further distinct names, so
    no name repeats and none is IO or S), `io` (" Mary", the correct answer), `s` (the
    subject, the wrong answer), `template` ("ABBA" or "BABA"). `templates="mixed"`
    alternates ABBA and BABA, starting with ABBA, so any prefix is balanced.
    """
    names = single_token_names(tokenizer)
    rng = random.Random(seed)
    families = ["ABBA", "BABA"] if templates == "mixed" else [templates]
    columns: dict[str, list] = {"clean": [], "corrupt": [], "io": [], "s": [], "template": []}
    for i in range(n):
        family = families[i % len(families)]
        template = rng.choice(TEMPLATES[family])
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        io, s = rng.sample(names, 2)
        others = rng.sample([name for name in names if name not in (io, s)], 3)
        clean = fill(template, place, obj, [io if slot == "A" else s for slot in name_slots(template)])
        corrupt = fill(template, place, obj, others)
        check_aligned(tokenizer, clean, corrupt)
        for key, value in zip(columns, (clean, corrupt, " " + io, " " + s, family)):
            columns[key].append(value)
    return Examples(columns)


def name_slots(template: str) -> list[str]:
    """The name slots of the prompt (the template without its answer), in order: e.g. B, A, B."""
    return [m.group(1) for m in _SLOT.finditer(_prompt_part(template)) if m.group(1) in "AB"]


def fill(template: str, place: str, obj: str, names: list[str]) -> str:
    """The prompt with its name slots filled in order by `names`."""
    queue = iter(names)

    def replace(match: re.Match) -> str:
        slot = match.group(1)
        return place if slot == "PLACE" else obj if slot == "OBJECT" else next(queue)

    return _SLOT.sub(replace, _prompt_part(template))


def _prompt_part(template: str) -> str:
    assert template.endswith(" [A]")
    return template[: -len(" [A]")]


def single_token_names(tokenizer) -> list[str]:
    """NAMES whose leading-space form (" Mary") is one known token, enough of them for IOI."""
    usable = [name for name in NAMES if _is_single_token(tokenizer, " " + name)]
    if len(usable) < NAMES_NEEDED:
        example = tokenizer.convert_ids_to_tokens(tokenizer(" " + NAMES[0], add_special_tokens=False)["input_ids"])
        raise CausalError(
            f"this tokenizer encodes {len(usable)} of the {len(NAMES)} IOI first names as a single token with a "
            f"leading space (' {NAMES[0]}' -> {example}); IOI needs at least {NAMES_NEEDED}: the io and s "
            f"answers are scored as single tokens, the ABC corruption needs three more names, and clean and "
            f"corrupt prompts must have the same token length to be patched position by position",
            hint="use a model whose tokenizer knows common English first names (GPT-2, Pythia, Llama, ...)")
    return usable


def _is_single_token(tokenizer, text: str) -> bool:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id


def check_aligned(tokenizer, clean: str, corrupt: str):
    """Clean and corrupt must match token for token, and no word may fall back to the unknown token."""
    clean_ids = tokenizer(clean, add_special_tokens=False)["input_ids"]
    corrupt_ids = tokenizer(corrupt, add_special_tokens=False)["input_ids"]
    if len(clean_ids) != len(corrupt_ids):
        raise CausalError(f"the clean prompt {clean!r} is {len(clean_ids)} tokens but its ABC corruption "
                          f"{corrupt!r} is {len(corrupt_ids)}; patching needs equal lengths")
    unknown = tokenizer.unk_token_id
    if unknown is not None and unknown in clean_ids:
        tokens = tokenizer.convert_ids_to_tokens(clean_ids)
        raise CausalError(f"the tokenizer has no token for part of the IOI prompt {clean!r}: it encodes it as "
                          f"{tokens}, with the unknown token {tokenizer.unk_token!r}")
