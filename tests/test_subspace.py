"""Subspace interchange with a fixed basis (issue 14, item 1): `patch ... within basis("FILE")` against a
hand-written hook on the tiny GPT-2, h' = h + B Bᵀ (h_source - h) with B the file's directions made
orthonormal. Tolerance 1e-5 absolute (float32), as tests/test_methods.py."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import causal
from causal.errors import CausalError
from tests.conftest import ids_of, logprob_last, make_rows
from tests.handhooks import capture, run_with_edits

ATOL = 1e-5
D_MODEL = 32


def write_basis(path, tensor: torch.Tensor, **metadata) -> str:
    save_file({"basis": tensor.contiguous()}, str(path), metadata=metadata or None)
    return str(path)


@pytest.fixture
def gpt2(tiny_gpt2):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval(), AutoTokenizer.from_pretrained(tiny_gpt2)


def test_a_subspace_patch_equals_the_hand_projection(tmp_path, write_experiment, cpu_config, gpt2):
    model, tok = gpt2
    directions = torch.randn(D_MODEL, 3, generator=torch.Generator().manual_seed(0))
    basis = write_basis(tmp_path / "b.safetensors", directions)
    full = write_basis(tmp_path / "full.safetensors", torch.randn(D_MODEL, D_MODEL, generator=torch.Generator().manual_seed(1)))
    rows = make_rows()
    body = (f'metric logprob(io)\npatch resid_pre[layer=*, pos=-1] from corrupt into clean within basis("{basis}") as sub\n'
            f'patch resid_pre[layer=*, pos=-1] from corrupt into clean within basis("{full}") as full\n'
            'patch resid_pre[layer=*, pos=-1] from corrupt into clean as whole\n'
            f'patch resid_pre[layer=1] from clean into clean within basis("{basis}") as same')
    ds = causal.run(write_experiment(body, rows), cpu_config)
    q, _ = torch.linalg.qr(directions.double())
    q = q.float()
    for i, row in enumerate(rows):
        clean, corrupt = ids_of(tok, row["clean"]), ids_of(tok, row["corrupt"])
        io = tok.convert_tokens_to_ids(row["io"])
        for layer in range(2):
            source = capture(model, corrupt, "resid_pre", layer)

            def edit(act, layer=layer, source=source):
                act[:, -1] += ((source[:, -1] - act[:, -1]) @ q) @ q.T
            expected = logprob_last(run_with_edits(model, clean, [("resid_pre", layer, edit)]), io)
            assert float(ds["sub"].sel(layer=layer, example=i).squeeze()) == pytest.approx(expected, abs=ATOL)
    # k = d is whole-vector patching; clean into clean within a subspace changes nothing
    torch.testing.assert_close(torch.from_numpy(ds["full"].values), torch.from_numpy(ds["whole"].values), atol=ATOL, rtol=0)
    same = ds["same"].sel(layer=1).dropna("pos", how="all") if "pos" in ds["same"].dims else ds["same"].sel(layer=1)
    torch.testing.assert_close(torch.from_numpy(same.values.squeeze()), torch.from_numpy(ds["clean"].values),
                               atol=ATOL, rtol=0)


def test_a_head_subspace_uses_d_head(tmp_path, write_experiment, cpu_config, gpt2):
    model, tok = gpt2
    d_head = D_MODEL // model.config.n_head
    directions = torch.randn(d_head, 2, generator=torch.Generator().manual_seed(2))
    basis = write_basis(tmp_path / "h.safetensors", directions)
    rows = make_rows(n=2)
    ds = causal.run(write_experiment(f'metric logprob(io)\npatch z[layer=1, head=2] from corrupt into clean within '
                                     f'basis("{basis}") as sub', rows), cpu_config)
    q = torch.linalg.qr(directions.double())[0].float()
    columns = slice(2 * d_head, 3 * d_head)
    for i, row in enumerate(rows):
        clean, corrupt = ids_of(tok, row["clean"]), ids_of(tok, row["corrupt"])
        source = capture(model, corrupt, "z", 1)

        def edit(act):
            act[..., columns] += ((source[..., columns] - act[..., columns]) @ q) @ q.T
        expected = logprob_last(run_with_edits(model, clean, [("z", 1, edit)]), tok.convert_tokens_to_ids(row["io"]))
        assert float(ds["sub"].sel(example=i).squeeze()) == pytest.approx(expected, abs=ATOL)


@pytest.mark.parametrize("make, site, message", [
    (lambda: torch.randn(16, 2), "resid_pre[layer=0]", "has shape (16, 2), but the sites' vectors have 32 numbers"),
    (lambda: torch.randn(32), "resid_pre[layer=0]", "has shape (32,)"),
    (lambda: torch.ones(32, 2), "resid_pre[layer=0]", "its 2 directions are not independent"),
    (lambda: torch.randn(32, 2), "pattern[layer=0]", "'pattern' has none"),
    (lambda: torch.randn(32, 2), "resid_pre[layer=0] + z[layer=0]", "needs sites of one width; these have [8, 32]"),
])
def test_bad_bases_are_refused_before_any_forward(tmp_path, write_experiment, no_forward, make, site, message):
    basis = write_basis(tmp_path / "b.safetensors", make())
    path = write_experiment(f'metric logprob(io)\npatch {site} from corrupt into clean within basis("{basis}")')
    with pytest.raises(CausalError) as info:
        causal.run(path, causal.RunConfig(device="cpu", progress=False))
    assert message in str(info.value) and "exp.cx:5:" in str(info.value) and not no_forward


def test_a_missing_wrong_or_foreign_basis_file_is_refused(tmp_path, write_experiment, no_forward):
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    save_file({"other": torch.zeros(32, 1)}, str(tmp_path / "other.safetensors"))
    foreign = write_basis(tmp_path / "foreign.safetensors", torch.randn(32, 1), model="gpt2-xl")
    cases = {str(tmp_path / "nowhere.safetensors"): "not found",
             str(tmp_path / "junk.safetensors"): "is not a safetensors file",
             str(tmp_path / "other.safetensors"): "has no tensor 'basis' (it has other)",
             foreign: "was saved for model 'gpt2-xl'"}
    for file, message in cases.items():
        path = write_experiment(f'metric logprob(io)\npatch resid_pre[layer=0] from corrupt into clean within basis("{file}")')
        with pytest.raises(CausalError) as info:
            causal.run(path, causal.RunConfig(device="cpu", progress=False))
        assert message in str(info.value) and "exp.cx:5:" in str(info.value), file
    assert not no_forward


def test_ablate_and_steer_within_a_basis_equal_the_hand_projections(tmp_path, write_experiment, cpu_config, gpt2):
    """zero: h - B Bᵀ h; mean: h + B Bᵀ (mean - h) with the per-position mean over the clean prompts;
    steer: h + B Bᵀ v with v the difference of the two columns' means at the last position."""
    model, tok = gpt2
    directions = torch.randn(D_MODEL, 2, generator=torch.Generator().manual_seed(3))
    basis = write_basis(tmp_path / "b.safetensors", directions)
    rows = make_rows()
    body = (f'metric logprob(io)\nablate resid_pre[layer=1, pos=-1] with zero within basis("{basis}") as zero\n'
            f'ablate resid_pre[layer=1, pos=-1] with mean within basis("{basis}") as mean\n'
            f'steer resid_pre[layer=1, pos=-1] by 3 * (mean(clean at -1) - mean(corrupt at -1)) within '
            f'basis("{basis}") on clean as steer')
    ds = causal.run(write_experiment(body, rows), cpu_config)
    q = torch.linalg.qr(directions.double())[0].float()
    cleans = [ids_of(tok, row["clean"]) for row in rows]
    corrupts = [ids_of(tok, row["corrupt"]) for row in rows]
    assert len({c.shape[1] for c in cleans + corrupts}) == 1  # one length: per-position means are plain means
    acts = torch.cat([capture(model, c, "resid_pre", 1) for c in cleans])
    position_mean = acts.mean(0)
    vector = 3 * (acts[:, -1].mean(0) - torch.cat([capture(model, c, "resid_pre", 1) for c in corrupts])[:, -1].mean(0))
    edits = {"zero": lambda act: act[:, -1].sub_((act[:, -1] @ q) @ q.T),
             "mean": lambda act: act[:, -1].add_(((position_mean[-1] - act[:, -1]) @ q) @ q.T),
             "steer": lambda act: act[:, -1].add_((vector @ q) @ q.T)}
    for i, row in enumerate(rows):
        io = tok.convert_tokens_to_ids(row["io"])
        for name, edit in edits.items():
            expected = logprob_last(run_with_edits(model, cleans[i], [("resid_pre", 1, edit)]), io)
            assert float(ds[name].sel(example=i).squeeze()) == pytest.approx(expected, abs=ATOL), name


def test_a_difference_of_means_basis_equals_the_hand_projection(write_experiment, cpu_config, gpt2):
    """`within basis(mean(clean) - mean(corrupt))`: at each layer the one direction u of the difference of the
    columns' mean activations there (every position), normalised; a patch moves h along u only."""
    model, tok = gpt2
    rows = make_rows()
    body = ('metric logprob(io)\npatch resid_pre[layer=*, pos=-1] from corrupt into clean within '
            'basis(mean(clean) - mean(corrupt)) as sub')
    ds = causal.run(write_experiment(body, rows), cpu_config)
    cleans = [ids_of(tok, row["clean"]) for row in rows]
    corrupts = [ids_of(tok, row["corrupt"]) for row in rows]
    for layer in range(2):
        mean = lambda prompts: torch.cat([capture(model, p, "resid_pre", layer)[0] for p in prompts]).mean(0)
        u = mean(cleans) - mean(corrupts)
        u = u / u.norm()
        for i, row in enumerate(rows):
            source = capture(model, corrupts[i], "resid_pre", layer)

            def edit(act, source=source):
                act[:, -1] += ((source[:, -1] - act[:, -1]) @ u)[:, None] * u
            expected = logprob_last(run_with_edits(model, cleans[i], [("resid_pre", layer, edit)]),
                                    tok.convert_tokens_to_ids(row["io"]))
            assert float(ds["sub"].sel(layer=layer, example=i).squeeze()) == pytest.approx(expected, abs=ATOL)


@pytest.mark.parametrize("statement, mean_passes", [
    ("patch resid_pre[layer=0] from corrupt into clean {within}", 1),
    ("ablate resid_pre[layer=0] with zero {within} on clean", 1),
    ("steer resid_pre[layer=0] by 2 * mean(corrupt) {within} on clean", 2),  # the vector's mean is a second column
])
def test_a_difference_of_means_of_equal_columns_has_no_direction(write_experiment, cpu_config, monkeypatch, statement,
                                                                   mean_passes):
    """Refused once the statistics passes are in, before the base runs and jobs: only the means' forwards ran."""
    from causal.engine.forward import Runner
    forwards = []
    original = Runner.forward
    monkeypatch.setattr(Runner, "forward", lambda self, *a, **k: forwards.append(1) or original(self, *a, **k))
    within = "within basis(mean(clean) - mean(clean))"
    path = write_experiment(f'metric logprob(io)\n{statement.format(within=within)}')
    with pytest.raises(CausalError, match=r"difference of means at \('resid_pre', 0\) is zero") as info:
        causal.run(path, cpu_config)
    column = statement.index("{within}") + 1  # the clause, on the line after the header's four
    assert str(info.value).startswith(f"{path}:5:{column}: error: basis(...): "), str(info.value)
    assert str(info.value).splitlines()[1].strip().startswith(statement.split()[0])  # the statement's line, quoted
    assert len(forwards) == mean_passes
