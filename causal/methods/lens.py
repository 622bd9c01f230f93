"""lens SITE [on BASE] [under LABEL] [top K] [as NAME]: the logit lens (nostalgebraist 2020).

Each chosen layer's residual stream, at each chosen position, is read as the model reads its last
block's output: final norm, unembedding (ModelAdapter.unembed). Reported per layer x position x
example: the log-prob and rank of the metrics' answer tokens (`next`: the prompt's own next token)
and the top K tokens with their log-probs. At the last layer's resid_post this is the model's own
output. One forward per batch of examples reads every layer, as `record` does; `under LABEL` reads
the model under a one-point patch, ablate or steer statement.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from causal.data import answer_ids
from causal.errors import CausalError, Span
from causal.methods.base import SelfDriven, Variable, method
from causal.methods.kinds import ResultKind, result_kind
from causal.methods.record import Selection, check_under, forward_keeping, selection_for, under_clause
from causal.models.adapter import RESIDUAL

DEFAULT_TOP = 5
NEXT = "next"


@dataclass
class LensState:
    logprob: torch.Tensor  # (points, examples, answers)
    rank: torch.Tensor  # (points, examples, answers)
    top_ids: torch.Tensor  # (points, examples, k), -1 where the position is absent
    top_logprob: torch.Tensor  # (points, examples, k)


LENS = result_kind(ResultKind("logit_lens", figure="lens_grid"))


@method("lens")
@dataclass
class Lens(SelfDriven):
    selection: Selection
    under: str | None
    span: Span
    top: int
    answer_names: tuple[str, ...]
    answers: torch.Tensor  # (examples, width, answers) token id per position, -1 where none (next past the end)
    tokenizer: Any = field(repr=False)
    under_index: int | None = None

    @classmethod
    def resolve(cls, node, resolution):
        if len(node.sites) != 1:
            raise resolution.error("lens reads one site; write one lens statement per site", node.sites[1].span)
        if resolution.model.head != "lm":
            raise resolution.error("the logit lens reads residual streams as next-token logits; this model has no "
                                   "language-model head", node.span)
        adapter = resolution.adapter
        residual = tuple(s for s in adapter.site_names if adapter.site_info(s).role == RESIDUAL)
        under, base = under_clause(resolution, node, "lens")
        sweep, selection = selection_for(resolution, node.sites[0], base, residual, "lens")
        top = node.get("top", DEFAULT_TOP)
        vocab = resolution.model.model.get_output_embeddings().weight.shape[0]
        if not 1 <= top <= vocab:
            raise resolution.error(f"top {top}: choose 1..{vocab} tokens (the model's vocabulary)", node.span_of("top"))
        names, answers = cls.answer_tokens(resolution, base)
        name = resolution.name_for(node, node.sites[0].name)
        for suffix in ("rank", "top", "top_logprob"):
            resolution.unique_name(f"{name}_{suffix}")
        return cls(name, resolution.statement(node.span), base, sweep, selection, under, node.span, top, names,
                   answers, resolution.model.tokenizer)

    @staticmethod
    def answer_tokens(resolution, base: str) -> tuple[tuple[str, ...], torch.Tensor]:
        """The answer columns of the metrics (and `next`), as a token id per example and position."""
        prompts = resolution.prompts[base]
        n, width = prompts.ids.shape
        names: list[str] = []
        columns: list[torch.Tensor] = []
        for metric in resolution.file.metrics:
            if resolution.metric_kind(metric).compares:
                continue  # kl(clean): a reference run, not an answer
            for column, span in metric.args:
                if column in names:
                    continue
                if column == NEXT:
                    following = torch.full((n, width), -1, dtype=torch.long)
                    following[:, :-1] = prompts.ids[:, 1:]
                    following[torch.arange(width)[None] >= (prompts.lengths - 1)[:, None]] = -1
                    columns.append(following)
                else:
                    ids = answer_ids(resolution.column(column, span), resolution.model.tokenizer, column, span)
                    columns.append(ids[:, None].expand(n, width))
                names.append(column)
        stacked = torch.stack(columns, -1) if columns else torch.zeros((n, width, 0), dtype=torch.long)
        return tuple(names), stacked

    def check_run(self, experiment, config) -> None:
        check_under(self, experiment)

    def describe_runs(self, plan, index):
        batches = sum(-(-len(chunk.examples) // plan.batch_size) for chunk in plan.chunks)
        answers = ", ".join(self.answer_names) or "no answer columns"
        return (f"one forward per batch{' under ' + self.under if self.under else ''} ({batches} batches); reads "
                f"{answers} and the top {self.top} tokens")

    def new_state(self, experiment) -> LensState:
        shape = (len(self.sweep.points), experiment.n_examples)
        nan = float("nan")
        return LensState(torch.full((*shape, len(self.answer_names)), nan), torch.full((*shape, len(self.answer_names)), nan),
                         torch.full((*shape, self.top), -1, dtype=torch.long), torch.full((*shape, self.top), nan))

    def chunk_pass(self, run, chunk, state):
        for start in range(0, len(chunk.examples), run.batch_size):
            batch = chunk.examples[start:start + run.batch_size]
            kept = forward_keeping(self, run, batch, self.selection)
            hidden = torch.stack([kept[layer] for layer in self.selection.layers]).flatten(0, 1)  # (points, rows, d)
            self.read(run, hidden, batch, state)
        picked = {k: getattr(state, k)[:, chunk.examples].contiguous() for k in ("logprob", "rank", "top_ids",
                                                                                  "top_logprob")}
        return picked

    def read(self, run, hidden: torch.Tensor, batch: torch.Tensor, state: LensState) -> None:
        """Logits of each point's residual: answers' log-prob and rank, the top tokens."""
        adapter = run.experiment.model.adapter
        model = run.experiment.model
        absent = hidden.isnan().any(-1)  # (points, rows): the position is past the prompt
        with torch.inference_mode():
            logits = adapter.unembed(hidden.nan_to_num(0.0).to(model.device, model.dtype)).float()
        logprobs = logits.log_softmax(-1)
        top = logprobs.topk(self.top, -1)
        top_ids = top.indices.cpu().masked_fill(absent[..., None], -1)
        state.top_ids[:, batch] = top_ids
        state.top_logprob[:, batch] = top.values.cpu().masked_fill(absent[..., None], float("nan"))
        if not self.answer_names:
            return
        positions = self.selection.positions[:, batch].repeat(len(self.selection.layers), 1)  # (points, rows)
        rows = torch.arange(len(batch))[None].expand_as(positions)
        answers = self.answers[batch][rows, positions.clamp(min=0)]  # (points, rows, answers)
        missing = (answers < 0) | absent[..., None]
        chosen = logits.gather(-1, answers.clamp(min=0).to(logits.device))
        rank = (logits[..., None, :] > chosen[..., None]).sum(-1).float().cpu()
        state.logprob[:, batch] = logprobs.gather(-1, answers.clamp(min=0).to(logits.device)).cpu().masked_fill(
            missing, float("nan"))
        state.rank[:, batch] = rank.masked_fill(missing, float("nan"))

    def restore_chunk(self, chunk, saved, state):
        for key, values in saved.items():
            getattr(state, key)[:, chunk.examples] = values

    def variables(self, effects, state):
        attrs = {**self.attrs(), "kind": LENS.kind, "under": self.under or "", "top": self.top}
        answers = {"answer": list(self.answer_names)}
        ranks = {"top": list(range(self.top))}
        words = self.words(state.top_ids)
        what = f"the logit lens at {self.selection.site}" + (f" under {self.under}" if self.under else "")
        return [
            Variable(self.name, state.logprob, self.sweep, {**attrs, "long_name": f"log-prob of each answer by {what}",
                                                            "units": "nat"}, ("example", "answer"), answers),
            Variable(f"{self.name}_rank", state.rank, self.sweep, {
                **attrs, "long_name": f"rank of each answer by {what} (0: the top token)", "units": "1"},
                ("example", "answer"), answers),
            Variable(f"{self.name}_top", words, self.sweep, {**attrs, "long_name": f"top tokens by {what}",
                                                             "units": "1"}, ("example", "top"), ranks),
            Variable(f"{self.name}_top_logprob", state.top_logprob, self.sweep, {
                **attrs, "long_name": f"log-prob of the top tokens by {what}", "units": "nat"}, ("example", "top"),
                ranks)]

    def words(self, ids: torch.Tensor) -> np.ndarray:
        """Token ids -> their text ('' where absent), decoded once per distinct id."""
        flat = ids.reshape(-1).tolist()
        text = {i: self.tokenizer.decode([i]) for i in set(flat) if i >= 0}
        return np.array([text.get(i, "") for i in flat], dtype=object).reshape(tuple(ids.shape))


__all__ = ["Lens", "CausalError"]
