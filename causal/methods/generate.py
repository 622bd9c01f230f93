"""generate N [on BASE] [under NAME, ...] [prompt only] [sample [temperature T] seed S] [as NAME]: text.

N new tokens per example, greedy or sampled, with the KV cache: once with no intervention, and once
per point of each statement named after `under`. Those statements' own writes (`JobMethod.writes`, as
the engine's hooks) act in every forward of the generation: at the prompt's positions as their
selectors say and, where a site's selector leaves out `pos` (every position), at each generated
position too, unless `prompt only`. A statement whose writes have no value past the prompt (a patch's
source activations, per-position means) is refused there, as is one whose forward is not writes
alone (trace, path, attribute).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from causal.errors import Span, did_you_mean
from causal.methods.base import JobMethod, SelfDriven, Variable, hooks, method
from causal.methods.edits import Edit
from causal.methods.kinds import ResultKind, result_kind
from causal.models.adapter import PATTERN
from causal.values import Job, Resume, Sweep

NOTHING_SWEPT = Sweep((), {}, [()])
GENERATION = result_kind(ResultKind("generation", text=True))  # texts, and their token ids beside them


@dataclass(frozen=True)
class Decoding:
    """Greedy (temperature None), or sampling at a temperature with a seed."""

    temperature: float | None = None
    seed: int | None = None

    def __str__(self) -> str:
        return "greedy" if self.temperature is None else f"sample temperature {self.temperature:g} seed {self.seed}"


@dataclass
class Under:
    """A statement generation runs under, and the variables its texts and token ids go to."""

    label: str
    span: Span
    text_name: str
    tokens_name: str
    method: JobMethod | None = None
    index: int = -1  # its place among the experiment's interventions (its jobs' `intervention`)


@dataclass
class GenerateState:
    """Token ids generated so far, per variable: (points, examples, new tokens), -1 where not yet generated."""

    tokenizer: Any
    tokens: dict[str, torch.Tensor]


@method("generate")
@dataclass
class Generate(SelfDriven):
    new_tokens: int
    decoding: Decoding
    prompt_only: bool
    tokens_name: str
    under: list[Under] = field(default_factory=list)

    @classmethod
    def resolve(cls, node, resolution):
        base = node.get("on") or resolution.default_base(node.span)
        prompts = resolution.run_prompt(base, node.span_of("on") or node.span)
        n = node.get("new_tokens")
        if n < 1:
            raise resolution.error(f"generate needs at least 1 new token, got {n}", node.span_of("new_tokens"))
        check_context(resolution, int(prompts.lengths.max()), n, node.span_of("new_tokens"))
        decoding = cls.decoding_of(node, resolution)
        name = resolution.name_for(node, "") if node.label else resolution.unique_name("generate")
        under, seen = [], set()
        for label, span in node.get("under_each") or ():
            if label in seen:
                raise resolution.error(f"{label!r} is named twice after 'under'", span)
            seen.add(label)
            under.append(Under(label, span, resolution.unique_name(f"{name}_{label}"),
                               resolution.unique_name(f"{name}_{label}_tokens")))
        return cls(name, resolution.statement(node.span), base, NOTHING_SWEPT, n, decoding,
                   node.clause("prompt_only") is not None, resolution.unique_name(f"{name}_tokens"), under)

    @staticmethod
    def decoding_of(node, resolution) -> Decoding:
        if node.clause("sample") is None:
            return Decoding()
        temperature = node.get("sample")
        temperature = 1.0 if temperature is None else float(temperature)
        if temperature <= 0:
            raise resolution.error(f"the temperature must be positive, got {temperature:g}; leave out 'sample' "
                                   "for greedy decoding", node.span_of("sample"))
        seed = node.get("seed")
        if seed is None:
            raise resolution.error("sampling needs a seed, so the texts can be drawn again", node.span_of("sample"),
                                   hint=f"{resolution.statement(node.span_of('sample'))} seed 0")
        if seed < 0:
            raise resolution.error(f"the seed must be a whole number >= 0, got {seed}", node.span_of("seed"))
        return Decoding(temperature, seed)

    def link(self, interventions, resolution):
        names = {m.name: i for i, m in enumerate(interventions) if m is not self}
        for under in self.under:
            if under.label not in names:
                raise resolution.error(f"no statement named {under.label!r} to generate under; statements: "
                                       f"{', '.join(names) or 'none'}", under.span, did_you_mean(under.label, names))
            under.index = names[under.label]
            under.method = interventions[under.index]
            self.check_usable(under.method, resolution, under.span)

    def check_usable(self, other, resolution, span: Span) -> None:
        """Its forward must be writes alone, on these prompts, with values wherever generation asks for them."""
        if not isinstance(other, JobMethod) or not other.is_plain_writes:
            raise resolution.error(f"`{other.statement}` is not one set of writes in a forward pass, so it cannot act "
                                   "during generation; generate under patch, ablate or steer statements", span)
        if other.base != self.base:
            raise resolution.error(f"`{other.statement}` runs on the {other.base!r} prompts, this generation on "
                                   f"{self.base!r}", span, hint=f"generate ... on {other.base}")
        targets = {t for point in other.sweep.points for t in point}
        if any(resolution.adapter.site_info(t.site).role == PATTERN for t in targets):
            raise resolution.error(f"`{other.statement}` writes attention patterns, whose key positions grow with "
                                   "every generated token; generation cannot apply it", span)
        if not self.prompt_only and not other.writes_past_prompt and any(t.pos is None for t in targets):
            raise resolution.error(
                f"`{other.statement}` leaves out pos (every position), which during generation includes each new "
                "token, but its values (another run's activations, or per-position means) exist at the prompt's "
                "positions only", span, hint="add 'prompt only' to the generate statement, or select pos=...")

    def attrs(self) -> dict:
        return {"kind": GENERATION.kind, "method": self.keyword, "statement": self.statement, "prompts": self.base,
                "decoding": str(self.decoding), "new_tokens": self.new_tokens}

    def describe_runs(self, plan, index):
        points = 1 + sum(len(u.method.sweep.points) for u in self.under)
        return (f"{self.new_tokens} new tokens ({self.decoding}) x {points} generation(s) per example "
                f"(no intervention{''.join(', ' + u.label for u in self.under)}): {self.new_tokens} forward passes "
                f"per batch of up to {plan.batch_size} rows, with the KV cache")

    # --- execution ----------------------------------------------------------------------------
    def new_state(self, experiment) -> GenerateState:
        n = experiment.n_examples
        points = {self.tokens_name: 1, **{u.tokens_name: len(u.method.sweep.points) for u in self.under}}
        return GenerateState(experiment.model.tokenizer, {
            name: torch.full((count, n, self.new_tokens), -1, dtype=torch.long) for name, count in points.items()})

    def chunk_pass(self, run, chunk, state):
        prompts = run.experiment.prompts[self.base]
        lengths = prompts.lengths[chunk.examples]
        for length in lengths.unique().tolist():  # rows of one prompt length: no padding inside a generation
            examples = chunk.examples[lengths == length]
            self.run_rows(run, state, None, examples, torch.zeros_like(examples), length)
            for under in self.under:
                points = torch.arange(len(under.method.sweep.points)).repeat_interleave(len(examples))
                self.run_rows(run, state, under, examples.repeat(len(under.method.sweep.points)), points, length)
        return {key: tokens[:, chunk.examples].contiguous() for key, tokens in state.tokens.items()}

    def restore_chunk(self, chunk, saved, state):
        for key, tokens in state.tokens.items():
            tokens[:, chunk.examples] = saved[key]

    def run_rows(self, run, state, under: Under | None, examples, points, length: int) -> None:
        """Generate for (point, example) rows whose prompts are `length` tokens long, in batches."""
        ids = run.experiment.prompts[self.base].ids
        size = run.batch_size
        for start in range(0, len(examples), size):
            rows, at = examples[start:start + size], points[start:start + size]
            edits = {} if under is None else self.hooks(run, under, rows, at, length)
            new = generate_tokens(run, ids[rows, :length], edits, self.new_tokens, self.decoding, rows)
            key = self.tokens_name if under is None else under.tokens_name
            state.tokens[key][at, rows] = new.cpu()

    def hooks(self, run, under: Under, examples, points, length: int) -> dict:
        """The statement's own writes for these rows, widened from the prompt to the generated positions."""
        other = under.method
        job = Job(under.index, examples, points, torch.zeros_like(examples), 0, 0)
        writes = other.writes(job, run, run.state(other.name))
        new = {} if self.prompt_only else new_position_masks(run, other, job, length)
        return hooks({key: [widened(w, length, self.new_tokens, new.get(key), other) for w in ws]
                          for key, ws in writes.items()})

    # --- results ------------------------------------------------------------------------------
    def variables(self, effects, state):
        tokenizer = state.tokenizer
        out = self.pair(self.name, self.tokens_name, state.tokens[self.tokens_name], NOTHING_SWEPT, tokenizer,
                        {"under": "", "under_statement": ""})
        for under in self.under:
            out += self.pair(under.text_name, under.tokens_name, state.tokens[under.tokens_name], under.method.sweep,
                             tokenizer, {"under": under.label, "under_statement": under.method.statement,
                                         "writes_new_tokens": int(self.writes_new_tokens(under.method))})
        return out

    def writes_new_tokens(self, other: JobMethod) -> bool:
        return not self.prompt_only and any(t.pos is None for point in other.sweep.points for t in point)

    def pair(self, text_name, tokens_name, ids: torch.Tensor, sweep, tokenizer, extra: dict) -> list[Variable]:
        """The texts (points, examples) and the token ids (points, examples, new_token) of one generation."""
        texts = np.array([[tokenizer.decode(row.tolist()) if (row >= 0).all() else "" for row in point]
                          for point in ids], dtype=str)
        under = f" under `{extra['under_statement']}`" if extra["under"] else ", no intervention"
        attrs = {**self.attrs(), **extra}
        return [Variable(text_name, texts, sweep, {**attrs, "long_name": f"text generated ({self.decoding}) on the "
                                                  f"{self.base} prompts{under}"}, dims=("example",)),
                Variable(tokens_name, ids, sweep, {**attrs, "long_name": f"token ids generated on the {self.base} "
                                                   f"prompts{under}"}, dims=("example", "new_token"),
                         coords={"new_token": list(range(self.new_tokens))})]


def check_context(resolution, longest: int, n: int, span: Span) -> None:
    """Prompt and new tokens must fit the positions the model was built for."""
    config = resolution.model.model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if context and longest + n > context:
        raise resolution.error(f"generating {n} tokens after prompts of up to {longest} tokens needs {longest + n} "
                               f"positions, more than the {context} the model was built for", span,
                               hint=f"generate at most {max(context - longest, 0)} tokens, or use shorter prompts")


def new_position_masks(run, other: JobMethod, job: Job, length: int) -> dict:
    """(site, layer) -> (rows, *extra) bool: where each row writes at a generated position, i.e. what its
    point's targets without pos (every position) write at the prompt's last one."""
    masks: dict = {}
    for point in job.points.unique().tolist():
        rows = (job.points == point).nonzero()[:, 0]
        for target in other.sweep.points[point]:
            if target.pos is not None:
                continue
            where = run.masks.target(target, job.examples[rows], other.base)[:, length - 1]
            for layer in target.layers:
                key = (target.site, layer)
                if key not in masks:
                    masks[key] = torch.zeros((len(job.examples), *where.shape[1:]), dtype=torch.bool)
                masks[key][rows] |= where
    return masks


def widened(write: Edit, length: int, n: int, new: torch.Tensor | None, other: JobMethod) -> Edit:
    """A write over the prompt's `length` positions and the `n` generated ones after it (`new` where it writes)."""
    rows, extra = write.where.shape[0], write.where.shape[2:]
    later = torch.zeros((rows, n, *extra), dtype=torch.bool) if new is None else new[:, None].expand(rows, n, *extra)
    where = torch.cat([write.where[:, :length], later], 1)
    value = write.value
    if value is not None and value.shape[1] != 1:  # one value per position: the prompt's only
        if later.any():
            raise AssertionError(f"`{other.statement}` has no value at generated positions")  # refused in link
        value = torch.cat([value[:, :length], value.new_zeros((value.shape[0], n, *value.shape[2:]))], 1)
    return write.moved_to(where, value)


def generate_tokens(run, ids: torch.Tensor, hooks: dict, n: int, decoding: Decoding,
                    examples: torch.Tensor) -> torch.Tensor:
    """(rows, n) new token ids: the prompt in one forward, then one position per forward from the KV cache.

    Sampling draws each row from its own generator, seeded by (seed, example): a row's text does not depend
    on the batch it ran in, and every intervention draws from the same random numbers as the baseline.
    """
    rows, length = ids.shape
    generators = None
    if decoding.temperature is not None:
        generators = [torch.Generator().manual_seed(int(np.random.SeedSequence([decoding.seed, int(e)])
                                                        .generate_state(1)[0])) for e in examples]
    sequence, keys_values, resume = ids, None, None
    out = []
    for step in range(n):
        position = length + step - 1  # the last position so far: its logits choose the next token
        read = torch.full((rows, 1), position)
        if step:
            resume = Resume(pos=position, keys_values=keys_values)
        output = run.forward(sequence, torch.ones_like(sequence), hooks, resume=resume, read=read, record_kv=True,
                             what=f"{rows} rows generating")
        keys_values = output.keys_values
        token = choose(output.logits[:, -1], decoding, generators)
        out.append(token)
        sequence = torch.cat([sequence, token[:, None].to(sequence.device)], 1)
    return torch.stack(out, 1)


def choose(logits: torch.Tensor, decoding: Decoding, generators) -> torch.Tensor:
    if generators is None:
        return logits.argmax(-1).cpu()
    probs = (logits.float().cpu().double() / decoding.temperature).softmax(-1)  # on the CPU: MPS has no float64
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])
