"""Edits as objects: each kind against its formula by hand, the hook a plain loop over them, a new kind
that needs no engine change, and generation's widening keeping an edit's kind."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from causal.methods.base import hooks as methods_hooks
from causal.methods.edits import Add, Edit, InSpan, Mapped, Replace, as_hook, in_span
from causal.methods.generate import widened

ROWS, WIDTH, D = 3, 5, 4


def _act(seed: int = 0) -> torch.Tensor:
    return torch.randn((ROWS, WIDTH, D), generator=torch.Generator().manual_seed(seed))


def _where() -> torch.Tensor:
    where = torch.zeros((ROWS, WIDTH), dtype=torch.bool)
    where[0, 1] = where[1, 3] = where[2, 4] = True
    return where


def _by_hand(act, where, new):
    """new where `where` is set, act elsewhere."""
    return torch.where(where[..., None], new, act)


def test_replace_add_and_zero_equal_their_formulas():
    act, value, where = _act(0), _act(1), _where()
    assert torch.equal(Replace(where, value).apply(act, 0), _by_hand(act, where, value))
    assert torch.equal(Replace(where).apply(act, 0), _by_hand(act, where, torch.zeros_like(act)))
    assert torch.allclose(Add(where, value).apply(act, 0), _by_hand(act, where, act + value))
    vector = torch.randn(1, 1, D)  # one value for every row and position
    assert torch.allclose(Add(where, vector).apply(act, 0), _by_hand(act, where, act + vector))


def test_in_span_moves_only_the_span_of_the_basis():
    act, value, where = _act(0), _act(1), _where()
    basis = torch.linalg.qr(torch.randn(D, 2, generator=torch.Generator().manual_seed(2)))[0]
    projector = basis @ basis.T
    swapped = in_span(Replace(where, value), basis).apply(act, 0)
    assert torch.allclose(swapped, _by_hand(act, where, act + (value - act) @ projector), atol=1e-6)
    zeroed = in_span(Replace(where), basis).apply(act, 0)
    assert torch.allclose(zeroed, _by_hand(act, where, act - act @ projector), atol=1e-6)
    added = in_span(Add(where, value), basis).apply(act, 0)
    assert torch.allclose(added, _by_hand(act, where, act + value @ projector), atol=1e-6)
    assert isinstance(in_span(Add(where, value), basis), InSpan) and in_span(Add(where, value), basis).adds


def test_mapped_applies_its_function_where_set():
    act, where = _act(0), _where()
    out = Mapped(where, function=lambda h: 2 * h + 1).apply(act, 0)
    assert torch.equal(out, _by_hand(act, where, 2 * act + 1))


def test_a_forward_that_starts_part_way_slices_the_mask_and_the_values():
    act, value, where = _act(0), _act(1), _where()
    start = 2
    part = Replace(where, value).apply(act[:, start:], start)
    assert torch.equal(part, Replace(where, value).apply(act, 0)[:, start:])


def test_the_hook_is_a_plain_loop_and_a_new_kind_needs_no_engine_change():
    @dataclass
    class Scale(Edit):  # an edit kind the package does not have
        factor: float = 1.0

        def apply(self, act, start):
            return torch.where(self.mask(act, start), act * self.factor, act)

    act, value, where = _act(0), _act(1), _where()
    edits = [Replace(where, value), Scale(where, factor=3.0)]
    hooks = methods_hooks({("resid_pre", 0): edits})  # what a job's forward hooks in for its edits
    assert torch.allclose(hooks[("resid_pre", 0)](act, 0), _by_hand(act, where, 3 * value))
    assert torch.equal(as_hook([])(act, 0), act)


def test_widening_to_generated_tokens_keeps_the_kind_and_its_fields():
    """Generation widens a prompt's edit to the new positions; an InSpan stays confined to its basis and a
    Mapped keeps its function (a plain replacement would have been written before)."""
    where, basis = _where(), torch.eye(D)[:, :1]
    edit = InSpan(where, torch.randn(1, 1, D), basis, adds=True)
    wide = widened(edit, WIDTH, 2, None, None)
    assert isinstance(wide, InSpan) and wide.adds and torch.equal(wide.basis, basis)
    assert wide.where.shape == (ROWS, WIDTH + 2) and not wide.where[:, WIDTH:].any()
    mapped = widened(Mapped(where, function=torch.neg), WIDTH, 2, None, None)
    assert isinstance(mapped, Mapped) and mapped.function is torch.neg
