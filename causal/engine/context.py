"""The context a method runs in: the members of `causal.methods.base.Context`, served by the Executor.

A separate object rather than the Executor itself, so what a method can reach is written down and
checked (tests/test_context.py): the runner, the checkpoint store and the chunk's caches stay the engine's.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from causal.methods.edits import Masks
from causal.metrics import metric_values
from causal.values import CacheKey, Experiment, Job, Output, Resume

if TYPE_CHECKING:
    from causal.methods.base import JobMethod


class RunContext:
    __slots__ = ("_run",)

    def __init__(self, run: Any):
        self._run = run  # the causal.engine.execute.Executor serving it (not imported: it imports this module)

    @property
    def experiment(self) -> Experiment:
        return self._run.experiment

    @property
    def masks(self) -> Masks:
        return self._run.masks

    @property
    def batch_size(self) -> int:
        return self._run.plan.batch_size

    @property
    def cache_bytes(self) -> int | None:
        return self._run.plan.cache_bytes

    @property
    def optimize(self) -> bool:
        return self._run.plan.optimize

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, hooks: dict, resume: Resume | None = None,
                read: torch.Tensor | None = None, record_kv: bool = False, grad: bool = False,
                what: str = "") -> Output:
        runner = self._run.runner
        with runner.note_block_output():
            return self._run.guarded(lambda: runner.forward(ids, mask, hooks, resume=resume, read=read,
                                                            record_kv=record_kv, grad=grad), what or f"{len(ids)} rows")

    def forward_job(self, method: "JobMethod", job: Job, hooks: dict, start_layer: int | None = None,
                    start_pos: int | None = None, recorders: dict | None = None) -> torch.Tensor:
        return self._run.forward_job(method, job, hooks, start_layer, start_pos, recorders)

    def metric_values(self, output: Output, column: str, examples: torch.Tensor, slots, mask: torch.Tensor
                      ) -> torch.Tensor:
        run = self._run
        return metric_values(run.experiment, output, column, examples, slots, run.references_for(examples), mask)

    def cached(self, stream: str, key: CacheKey, examples: torch.Tensor,
               samples: torch.Tensor | None = None) -> torch.Tensor:
        return self._run.caches.get(stream, key, examples, samples)

    def baseline(self, stream: str) -> torch.Tensor:
        return self._run.baselines[stream]

    def state(self, name: str) -> Any:
        return self._run.states[name]

    def saved(self, key: str) -> dict[str, torch.Tensor] | None:
        store = self._run.store
        return self._run.saved_tensors(key, store.completed()) if store else None

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        if self._run.store:
            self._run.store.save_tensors(key, tensors)

    @property
    def checkpointed(self) -> bool:
        return self._run.store is not None

    def run_points(self, method: "JobMethod", points: torch.Tensor) -> torch.Tensor:
        return self._run.run_points(method, points)
