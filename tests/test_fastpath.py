"""The optimised executor gives the numbers of the unoptimised reference path, and really is optimised.

Reference: `RunConfig(optimize=False, batch_size=1)`: every row its own forward over the
whole model, logits at every position. Compared with every pack mode (exact, auto, sites)
at a small and a large batch size, on tiny models of several architectures (GPT-2,
Llama with grouped-query attention, Phi with parallel attention + MLP, the zoo's trained
attention-only model) and ragged, right-padded prompts (tests/fastpath_cases.py).

Tolerance: 1e-5 absolute (rtol 0) on raw float32 metrics (log-probs, logit differences, KL,
probabilities, ranks, accuracies; nothing normalized). The two routes differ only in
summation order: padded batches vs single rows, attention over a cached key/value prefix
vs the whole sequence, resumed vs recomputed blocks. NaN patterns (positions a prompt
lacks) must be identical.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
import transformers as T

import causal
import causal.engine.plan
from causal.app.api import run_prepared
from causal.engine.plan import compile_plan
from causal.engine.forward import Runner
from causal.values import Resume
from fastpath_cases import ARCHS, CASES, SMALL, Arch, make_rows, save_model, write_case

ATOL = 1e-5
EFFECT = 50 * ATOL  # every intervention must move a metric by more than this, or equality proves nothing
SMALL_BATCH, LARGE_BATCH = 3, 64  # 3 < examples per start group: exact packing cuts groups
CONFIGS = [(pack, batch) for pack in ("exact", "auto", "sites") for batch in (SMALL_BATCH, LARGE_BATCH)]
CHEAP_CALLS = 30.0  # token-layers: an `auto` overhead at which the cost model merges some start groups only


def config(**changes) -> causal.RunConfig:
    return causal.RunConfig(device="cpu", progress=False, **changes)


REFERENCE = dict(optimize=False, batch_size=1)


@pytest.fixture(scope="module")
def model_refs(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("fastpath-models")
    return {name: save_model(arch, folder / name) for name, arch in ARCHS.items()}


@pytest.fixture(scope="module")
def prepared(model_refs, tmp_path_factory):
    """(arch, case) -> (Experiment, reference Dataset), each prepared and run once per module."""
    cache: dict = {}

    def get(arch: str, case: str):
        if (arch, case) not in cache:
            body, ragged = CASES[case]
            folder = tmp_path_factory.mktemp(f"{arch}-{case}")
            path = write_case(folder, model_refs[arch], body(ARCHS[arch]), make_rows(ragged=ragged))
            experiment = causal.prepare(path, config())
            cache[(arch, case)] = experiment, run_prepared(experiment, config(**REFERENCE))
        return cache[(arch, case)]
    return get


def assert_same(reference, got, what: str) -> None:
    """Every variable: the same NaN pattern, and max |difference| <= ATOL elsewhere."""
    assert set(reference.data_vars) == set(got.data_vars)
    for name in reference.data_vars:
        expected, actual = reference[name].values, got[name].transpose(*reference[name].dims).values
        np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=f"{what}: NaNs of {name}")
        np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=0, equal_nan=True, err_msg=f"{what}: {name}")


# equality with the reference path

@pytest.mark.slow
@pytest.mark.parametrize("pack, batch", CONFIGS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_fast_path_equals_reference(arch, case, pack, batch, prepared):
    experiment, reference = prepared(arch, case)
    got = run_prepared(experiment, config(pack=pack, batch_size=batch))
    assert_same(reference, got, f"{arch} {case} pack={pack} batch_size={batch}")


@pytest.mark.parametrize("case", ["sites", "interventions"])
@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa"])
def test_cost_model_mixing_start_groups_equals_reference(arch, case, prepared, monkeypatch):
    """With cheap forward calls `auto` merges only some neighbouring start groups: jobs of mixed starts."""
    experiment, reference = prepared(arch, case)
    monkeypatch.setattr(causal.engine.plan, "call_overhead", lambda d_model, unembedding, device_type: CHEAP_CALLS)
    monkeypatch.setattr(causal.engine.plan, "resume_overhead", lambda d_model, device_type: 0.0)  # resume every row
    jobs = {pack: len(compile_plan(experiment, LARGE_BATCH, pack).jobs) for pack in ("exact", "auto", "sites")}
    assert jobs["sites"] < jobs["auto"] < jobs["exact"]
    assert_same(reference, run_prepared(experiment, config(pack="auto", batch_size=LARGE_BATCH)), f"{arch} {case}")


def test_chunked_plan_equals_reference(prepared):
    """A cache budget too small for two examples: base runs held one example at a time (one Chunk each)."""
    experiment, reference = prepared("llama_gqa", "interventions")
    tiny = config(pack="sites", batch_size=SMALL_BATCH, cache_gb=1e-9)
    plan = compile_plan(experiment, SMALL_BATCH, "sites", "cpu", tiny.cache_gb * 2 ** 30)
    assert len(plan.chunks) == experiment.n_examples
    assert_same(reference, run_prepared(experiment, tiny), "one example per chunk")


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("case", list(CASES))
def test_every_intervention_moves_the_metrics(arch, case, prepared):
    """Non-vacuous equality: each statement changes some metric by far more than the tolerance.

    Exception: the attention-only model's MLP is identically zero, so patching it changes nothing.
    """
    experiment, reference = prepared(arch, case)
    for name, baseline in baselines(experiment).items():
        moved = float(np.nanmax(np.abs((reference[name] - reference[baseline]).values)))
        if arch == "attn_only_2l" and name == "patch_mlp_out":
            assert moved == 0.0
        else:
            assert moved > EFFECT, f"{name} moves the metrics by at most {moved:g}"


def baselines(experiment) -> dict[str, str]:
    """Result variable -> the baseline run its rows change: the noised run for traces, else the base prompts."""
    out = {}
    for method in experiment.interventions:
        baseline = method.stream
        out[method.name] = baseline
        if getattr(method, "exact_name", None):
            out[method.exact_name] = baseline
    return out


def test_ragged_prompts_leave_missing_positions_nan(prepared):
    """The layer x position sweep covers the longest prompt; shorter ones are NaN exactly past their end."""
    experiment, reference = prepared("gpt2", "sites")
    lengths = experiment.prompts["clean"].lengths.numpy()
    assert len(set(lengths)) == 3
    width = int(lengths.max())
    swept = reference["patch_resid_pre"].sel(metric="logprob(io)", pos=list(range(width)))
    missing = np.isnan(swept.transpose("layer", "pos", "example"))
    expected = np.arange(width)[:, None] >= lengths[None, :]
    np.testing.assert_array_equal(missing.values, np.broadcast_to(expected, missing.shape))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_verified_attribution_equals_patching(arch, prepared):
    """`attribute ... verify top k` patches its top sites exactly: the numbers of a plain patch statement."""
    _, reference = prepared(arch, "interventions")
    exact, patched = reference["atp_heads_exact"], reference["patch_heads"]
    verified = ~np.isnan(exact.values).all(axis=tuple(range(2, exact.ndim)))  # (layer, head)
    assert verified.sum() == 3
    np.testing.assert_allclose(exact.values[verified], patched.transpose(*exact.dims).values[verified],
                               atol=ATOL, rtol=0)


# the optimisations happen

SWEEP = "metric logprob(io)\npatch resid_pre[layer=*, pos=*] from corrupt into clean"


@pytest.fixture(scope="module")
def resid_sweep(model_refs, tmp_path_factory):
    """A layer x position residual sweep on GPT-2 (3 layers), metric at the last token only."""
    path = write_case(tmp_path_factory.mktemp("sweep"), model_refs["gpt2"], SWEEP, make_rows())
    return causal.prepare(path, config())


def test_exact_plan_starts_each_row_at_its_layer_and_position(resid_sweep):
    plan = compile_plan(resid_sweep, LARGE_BATCH, "exact")
    points = resid_sweep.interventions[0].sweep.points
    n_layers, width = resid_sweep.model.adapter.n_layers, resid_sweep.prompts["clean"].ids.shape[1]
    for job in plan.jobs:
        (target,) = points[int(job.points[0])]
        assert (job.points == job.points[0]).all()
        assert (job.start_layer, job.start_pos) == (target.layers[0], target.pos)
    starts = {(job.start_layer, job.start_pos) for job in plan.jobs}
    assert starts == {(layer, pos) for layer in range(n_layers) for pos in range(width)}
    assert plan.resume_layers["clean"] == set(range(1, n_layers)) and plan.kv_streams == {"clean"}
    reference = compile_plan(resid_sweep, LARGE_BATCH, "exact", optimize=False)
    assert {(job.start_layer, job.start_pos) for job in reference.jobs} == {(0, 0)}
    assert not any(reference.resume_layers.values()) and not reference.kv_streams


def test_sites_packing_needs_fewer_jobs_than_exact(resid_sweep):
    exact, sites = compile_plan(resid_sweep, SMALL_BATCH, "exact"), compile_plan(resid_sweep, SMALL_BATCH, "sites")
    assert sites.rows == exact.rows
    assert len(sites.jobs) < len(exact.jobs)


def test_sites_packing_needs_the_fewest_forwards(resid_sweep):
    """pack=sites fills batches (rows of any start share one): ceil(rows / batch_size) jobs at every batch size."""
    rows = compile_plan(resid_sweep, 1, "sites").rows
    extra = {}  # batch size -> (jobs, fewest possible)
    for batch in range(1, rows + 1):
        jobs = len(compile_plan(resid_sweep, batch, "sites").jobs)
        if jobs != -(-rows // batch):
            extra[batch] = (jobs, -(-rows // batch))
    assert not extra, f"{rows} rows; batch_size: (jobs, fewest possible): {extra}"


@contextmanager
def logged_forwards():
    """Runner.forward calls while the block runs: rows, where each resumed, and how many logit positions."""
    calls: list[dict] = []
    original = Runner.forward

    def forward(runner, ids, attention_mask, hooks, resume=None, read=None, record_kv=False, grad=False):
        output = original(runner, ids, attention_mask, hooks, resume, read, record_kv, grad)
        resume = resume or Resume()
        calls.append({"rows": ids.shape[0], "width": ids.shape[1], "layer": resume.layer, "pos": resume.pos,
                      "layers": runner.adapter.n_layers, "logit_positions": output.logits.shape[1]})
        return output
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Runner, "forward", forward)
        yield calls


def token_layers(calls: list[dict]) -> int:
    """Block applications: rows x layers computed x positions computed."""
    return sum(c["rows"] * (c["layers"] - c["layer"]) * (c["width"] - c["pos"]) for c in calls)


def test_packed_run_uses_far_fewer_forwards_than_rows(resid_sweep):
    plan = compile_plan(resid_sweep, LARGE_BATCH, "sites")
    with logged_forwards() as calls:
        run_prepared(resid_sweep, config(pack="sites", batch_size=LARGE_BATCH))
    assert len(calls) == 2 + len(plan.jobs)  # base runs of clean and corrupt, then one forward per job
    assert len(calls) * 10 < plan.rows


def test_skips_layers_and_positions_and_unembeds_only_read_positions(resid_sweep):
    """Exact packing: each job's forward resumes at its rows' layer and position and unembeds one position."""
    with logged_forwards() as reference:
        run_prepared(resid_sweep, config(**REFERENCE))
    with logged_forwards() as fast:
        run_prepared(resid_sweep, config(pack="exact", batch_size=LARGE_BATCH))
    width, n = resid_sweep.prompts["clean"].ids.shape[1], resid_sweep.n_examples
    reference_jobs, fast_jobs = reference[2 * n:], fast[2:]  # after the base runs of clean and corrupt
    assert len(reference_jobs) == compile_plan(resid_sweep, 1, "exact", optimize=False).rows
    assert all(c["layer"] == 0 and c["pos"] == 0 and c["logit_positions"] == width for c in reference)
    plan = compile_plan(resid_sweep, LARGE_BATCH, "exact")
    assert [(c["rows"], c["layer"], c["pos"]) for c in fast_jobs] == \
        [(len(job.examples), job.start_layer, job.start_pos) for job in plan.jobs]
    assert all(c["logit_positions"] == 1 for c in fast)  # the metric reads the last token only
    # (L+1)/2L of the layers and about half the positions remain: 0.43 of the work here (3 layers, 4-7 tokens)
    assert token_layers(fast_jobs) < 0.5 * token_layers(reference_jobs)



def test_resumed_forwards_use_the_cache_argument_transformers_wants(resid_sweep, recwarn):
    """Issue "a researcher's first week", item 13: `past_key_values=` warned on every run ("removed in 5.40")."""
    import inspect
    model = resid_sweep.model.model
    wanted = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    assert Runner(resid_sweep.model).cache_argument == wanted
    with logged_forwards() as calls:
        run_prepared(resid_sweep, config(pack="exact", batch_size=LARGE_BATCH))
    assert any(c["pos"] > 0 for c in calls)  # the KV-prefix path ran
    assert not [w for w in recwarn if "past_key_values" in str(w.message)]


def modelled_cost(plan, packer) -> float:
    """What the cost model says a plan costs: block work from each job's start, resuming's setup, calls."""
    return sum(packer.cost(len(job.examples), job.start_layer, job.start_pos) + packer.overhead +
               (packer.resume_cost if (job.start_layer, job.start_pos) != (0, 0) else 0.0) for job in plan.jobs)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_the_cost_model_never_picks_a_plan_dearer_than_the_reference(arch, prepared):
    """Issue "speed to the floor", item 1: on a tiny GQA Llama at batch size 1 the fast path was slower than
    optimize=False. At every batch size the plan chosen costs, by the model's own measure, at most what the
    reference plan (every row from the start, the same batches) would."""
    from causal.engine.plan import Packer
    experiment, _ = prepared(arch, "sites")
    dearer = {}
    for batch in (1, 2, 3, 4, 8, 64):
        packer = Packer(experiment, batch, "auto", "cpu")
        chosen = modelled_cost(compile_plan(experiment, batch, "auto"), packer)
        reference = modelled_cost(compile_plan(experiment, batch, "sites", optimize=False), packer)
        if chosen > reference * (1 + 1e-9):
            dearer[batch] = (chosen, reference)
    assert not dearer, f"batch size: (chosen, reference) modelled cost {dearer}"


def test_a_tiny_model_runs_whole_forwards_where_resuming_costs_more(prepared):
    """d_model 32: resuming's setup (~0.3 ms) is more than a few rows' whole forward, so rows start at 0."""
    from causal.engine.plan import resume_overhead
    experiment, _ = prepared("llama_gqa", "sites")
    assert resume_overhead(32, "cpu") > compile_plan(experiment, 1, "auto").jobs[0].examples.numel() * 2 * 7
    assert {(job.start_layer, job.start_pos) for job in compile_plan(experiment, 1, "auto").jobs} == {(0, 0)}
    assert resume_overhead(768, "cpu") < 5  # GPT-2-small: a few token-layers, resuming pays


# a model whose attention has a sliding window no longer than the prompts

@pytest.mark.parametrize("statement", ["patch resid_pre[layer=*, pos=*] from corrupt into clean",
                                       "patch pattern[layer=*, head=*, pos=-1] from corrupt into clean"],
                         ids=["resid_pre", "pattern"])
def test_sliding_window_model_equals_reference(statement, tmp_path):
    """Prompts of 5-7 tokens, a sliding window of 4: a suffix run on a KV prefix differs from the full run
    (`ModelAdapter.supports_kv_prefix` says so), so the fast path must not skip positions there."""
    arch = Arch("mistral_window", "", config=lambda: T.MistralConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, sliding_window=4))
    path = write_case(tmp_path / "case", save_model(arch, tmp_path / "model"), f"metric logprob(io)\n{statement}",
                      make_rows())
    experiment = causal.prepare(path, config())
    reference = run_prepared(experiment, config(**REFERENCE))
    assert_same(reference, run_prepared(experiment, config(pack="exact", batch_size=SMALL_BATCH)), "window of 4")


@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa"])
def test_unembedding_in_vocabulary_slices_equals_reference(arch, prepared, monkeypatch):
    """On the CPU the fast path unembeds a slice of the vocabulary per matmul (engine.forward, issue "speed to
    the floor", item 2). Slices of 24 rows cut the 64-token vocabulary into 24 + 24 + 16: every result still
    equals the reference path's."""
    import causal.engine.forward as forward
    experiment, reference = prepared(arch, "interventions")
    monkeypatch.setattr(forward, "VOCAB_SLICE", 24)
    sliced = []
    original = forward._sliced_linear
    monkeypatch.setattr(forward, "_sliced_linear", lambda *args: sliced.append(args[-1].shape[0]) or original(*args))
    assert_same(reference, run_prepared(experiment, config(pack="auto", batch_size=LARGE_BATCH)), arch)
    assert sliced  # the sliced unembedding ran
    lm_head = experiment.model.model.get_output_embeddings()
    assert "forward" not in vars(lm_head)  # and the model's own forward is back


@pytest.mark.parametrize("row_block", [128, 4])
def test_sliced_linear_equals_one_matmul(monkeypatch, row_block):
    """Equal up to float32 rounding: the transposed matmul may sum a dot product in another order. Blocks of 4
    rows cut the 6 rows unevenly."""
    import causal.engine.forward as forward
    monkeypatch.setattr(forward, "ROW_BLOCK", row_block)
    weight, bias, hidden = torch.randn(2 * forward.VOCAB_SLICE + 5, 8), torch.randn(2 * forward.VOCAB_SLICE + 5), \
        torch.randn(3, 2, 8)
    for b in (None, bias):
        torch.testing.assert_close(forward._sliced_linear(weight, b, hidden),
                                   torch.nn.functional.linear(hidden, weight, b), atol=1e-6, rtol=1e-6)


def test_an_unembedding_whose_forward_is_wrapped_keeps_its_wrapper(prepared, monkeypatch):
    """accelerate's offload hooks live in the module's own `forward` attribute: the sliced unembedding must
    neither replace them for the call nor delete them after it."""
    import causal.engine.forward as forward
    experiment, reference = prepared("gpt2", "interventions")
    monkeypatch.setattr(forward, "VOCAB_SLICE", 24)
    lm_head = experiment.model.model.get_output_embeddings()
    calls = []
    plain = lm_head.forward

    def wrapper(hidden):
        calls.append(hidden.shape)
        return plain(hidden)
    monkeypatch.setattr(lm_head, "forward", wrapper, raising=False)
    assert_same(reference, run_prepared(experiment, config(pack="auto", batch_size=LARGE_BATCH)), "wrapped head")
    assert calls and lm_head.forward is wrapper
