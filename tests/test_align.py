"""align (issue 14): trained interchange interventions on the zoo's hierarchical-equality toy."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import causal
from causal import CausalError

pytestmark = pytest.mark.slow  # training

ROOT = Path(__file__).resolve().parents[1]
HEAD = 'model "zoo:hiereq-gpt2"\ndata hiereq(n={n}, seed=0)\nmetric accuracy(cf_wx) at -1\n'


def run(tmp_path, statement: str, n: int = 320):
    path = tmp_path / "x.cx"
    path.write_text(HEAD.format(n=n) + statement + "\n")
    return causal.run(path)


def test_finds_wx_where_the_model_computes_it_and_chance_elsewhere():
    """The example file: WX at the second shape after block 0 (>= 0.9); the other sites stay near chance."""
    ds = causal.run(ROOT / "experiments" / "das_hiereq.cx")
    iia = ds["wx_iia"].sel(k=1)
    assert float(iia.sel(layer=0, pos=1)) >= 0.9
    control = iia.where((iia.layer != 0) | (iia.pos != 1))
    assert float(control.max()) < 0.6  # the first shape alone, or the third, cannot hold (a == b)
    assert ds["wx_loss"].dims[-1] == "epoch" and ds["wx_basis"].sizes["component"] == 64


def test_candidates_trained_together_equal_each_trained_alone(tmp_path):
    """Rows of one forward: each candidate's steps are its own (Adam is elementwise; losses are summed)."""
    together = run(tmp_path, "align resid_post[layer=0, pos=[1, 3]] from source into base predicting cf_wx "
                             "by lowrank(k=[1, 2], epochs=2) as wx")
    alone = run(tmp_path, "align resid_post[layer=0, pos=3] from source into base predicting cf_wx "
                          "by lowrank(k=2, epochs=2) as wx")
    a = together["wx_basis"].sel(pos=3, k=2).values
    b = alone["wx_basis"].sel(pos=3, k=2).values
    assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5, equal_nan=True)
    assert float(abs(together["wx_iia"].sel(pos=3, k=2) - alone["wx_iia"].sel(pos=3, k=2)).max()) == 0


def test_full_rotation_equals_whole_vector_patching(tmp_path):
    """k = d swaps the whole vector: IIA is the patch's accuracy on the same held-out pairs."""
    ds = run(tmp_path, "align resid_post[layer=0, pos=1] from source into base predicting cf_wx "
                       "by das(k=64, epochs=1) as wx\npatch resid_post[layer=0, pos=1] from source into base")
    heldout = ds["wx_iia"].attrs["heldout_examples"]
    patched = ds["patch_resid_post"].squeeze().values[list(heldout)].mean()
    assert float(ds["wx_iia"].squeeze()) == pytest.approx(float(patched), abs=1e-6)


def test_deterministic_for_a_fixed_seed(tmp_path):
    statement = "align resid_post[layer=0, pos=1] from source into base predicting cf_wx by das(k=1, epochs=2) as wx"
    first, second = run(tmp_path, statement), run(tmp_path, statement)
    assert (first["wx_basis"].values == second["wx_basis"].values).all()


@pytest.mark.parametrize("statement, where, message", [
    ("by das(k=65)", "4:80", "k=65: a subspace of the sites' 64-number vectors has 1..64"),
    ("by das(k=0)", "4:80", "has 1..64"),
    ("by dass(k=1)", "4:73", "unknown trainer 'dass'"),
    ("by das(rate=1)", "4:80", "has no setting 'rate'"),
    ("by boundless(k=2)", "4:86", "boundless learns its k"),
])
def test_bad_settings_are_refused_before_training(tmp_path, statement, where, message):
    with pytest.raises(CausalError, match=rf"x.cx:{where}: error: .*{message}"):
        run(tmp_path, f"align resid_post[layer=0, pos=1] from source into base predicting cf_wx {statement}")


def test_bad_labels_and_too_few_pairs(tmp_path):
    with pytest.raises(CausalError, match=r"x.cx:4:67: error: column 'wx_changes', example 0: answer .* not in the "
                                          "vocabulary"):
        run(tmp_path, "align resid_post[layer=0, pos=1] from source into base predicting wx_changes by das()")
    with pytest.raises(CausalError, match=r"x.cx:4:\d+: error: 12 pairs split .* each needs at least 4"):
        run(tmp_path, "align resid_post[layer=0, pos=1] from source into base predicting cf_wx by das()", n=12)


def test_learned_bases_are_saved_beside_the_results_and_reused_by_within_basis(tmp_path):
    """`causal run` writes one safetensors file per candidate; patching within that file's basis in another
    experiment reproduces the candidate's held-out IIA, and another model's run refuses the file."""
    from causal.app.cli import main
    from causal.results import load
    path = tmp_path / "x.cx"
    path.write_text(HEAD.format(n=320) + "align resid_post[layer=0, pos=[1, 3]] from source into base "
                    "predicting cf_wx by lowrank(k=2, epochs=2) as wx\n")
    out = tmp_path / "out"
    assert main(["run", str(path), f"hydra.run.dir={out}", "progress=false", "plots=false"]) == 0
    trained = load(out / "results.nc")
    files = sorted(p.name for p in (out / "bases").iterdir())
    assert files == ["wx-resid_post-layer0-pos1-k2.safetensors", "wx-resid_post-layer0-pos3-k2.safetensors"]
    basis = str(out / "bases" / files[0])
    reuse = tmp_path / "reuse.cx"
    reuse.write_text(HEAD.format(n=320) + f'patch resid_post[layer=0, pos=1] from source into base within '
                     f'basis("{basis}") as sub\n')
    patched = causal.run(reuse)
    heldout = list(trained["wx_iia"].attrs["heldout_examples"])
    iia = float(trained["wx_iia"].sel(layer=0, pos=1, k=2))
    assert float(patched["sub"].squeeze().values[heldout].mean()) == pytest.approx(iia, abs=1e-6)
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(basis, "pt") as handle:
        metadata, tensor = handle.metadata(), handle.get_tensor("basis")
    assert metadata["model"] == "zoo:hiereq-gpt2" and float(metadata["heldout_score"]) == pytest.approx(iia, abs=1e-6)
    save_file({"basis": tensor}, str(tmp_path / "retrained.safetensors"), metadata={**metadata, "model_revision": "v2"})
    reuse.write_text(reuse.read_text().replace(basis, str(tmp_path / "retrained.safetensors")))
    with pytest.raises(CausalError, match=r"reuse.cx:4:\d+: error: basis .* learned on revision 'v2' of 'zoo:hiereq"):
        causal.run(reuse)


def test_a_killed_training_resumes_from_its_last_finished_epoch(tmp_path, monkeypatch):
    """Killed in its third epoch, the re-run loads weights, Adam's moments and the early-stopping record of
    epoch 2 and trains only epochs 3 and 4; the result equals an uninterrupted run's exactly."""
    from dataclasses import replace

    import xarray as xr

    from causal.methods import training
    path = tmp_path / "x.cx"
    path.write_text(HEAD.format(n=320) + "align resid_post[layer=0, pos=[1, 3]] from source into base "
                    "predicting cf_wx by boundless(epochs=4) as wx\n")
    config = causal.RunConfig(progress=False, checkpoints=str(tmp_path / "ck"))
    uninterrupted = causal.run(path, replace(config, checkpoints=None))
    trained: list[int] = []
    real_epoch = training._epoch

    class Killed(KeyboardInterrupt):  # as a real interruption: it passes the internal-error boundary
        pass

    kill = [True]

    def dies_in_the_third(align, run, state, optimiser, temperatures, progress, epoch):
        if epoch == 2 and kill:
            kill.clear()
            raise Killed
        trained.append(epoch)
        return real_epoch(align, run, state, optimiser, temperatures, progress, epoch)

    monkeypatch.setattr(training, "_epoch", dies_in_the_third)
    with pytest.raises(Killed):
        causal.run(path, config)
    resumed = causal.run(path, config)
    assert trained == [0, 1, 2, 3], "finished epochs were trained again"
    xr.testing.assert_identical(resumed.drop_attrs(deep=False), uninterrupted.drop_attrs(deep=False))


@pytest.fixture(scope="module")
def model64():
    import transformers

    from causal.zoo import zoo_path
    folder = zoo_path("hiereq-gpt2")
    return (transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64),
            transformers.AutoTokenizer.from_pretrained(folder))


@pytest.mark.parametrize("cache_gb", [None, 1e-6])
def test_resumed_rows_and_recorded_activations_train_as_the_reference_path(tmp_path, model64, cache_gb):
    """Candidates at layers 0 and 1 in one batch: each group's rows resume at its layer from the recorded base
    run, sources are recorded once (or, past the cache budget, per batch, and each candidate in a forward of its
    own); the bases equal those of optimize=False with every candidate in one forward, where every row runs the
    whole model, to 1e-9 (float64). Position 4 at layer 1: at the last
    layer only the last position reaches the readout, so a resumed row there shows a wrong start."""
    from dataclasses import replace
    model, tokenizer = model64
    path = tmp_path / "x.cx"
    path.write_text(HEAD.format(n=160) + "align resid_post[layer=*, pos=[1, 4]] from source into base predicting "
                    "cf_wx by lowrank(k=2, epochs=2) as wx\n")
    config = causal.RunConfig(progress=False, cache_gb=cache_gb)
    fast = causal.run(path, config, model=model, tokenizer=tokenizer)
    reference = causal.run(path, replace(config, optimize=False, cache_gb=None), model=model, tokenizer=tokenizer)
    assert fast["wx_basis"].sizes["layer"] == 2
    assert abs(fast["wx_basis"] - reference["wx_basis"]).max() < 1e-9
    assert (fast["wx_iia"] == reference["wx_iia"]).all()


def test_the_plot_shows_held_out_iia_over_the_sites_and_every_candidates_curve(tmp_path):
    from causal.results.plot import plot_all
    from causal.results.trained_plots import trained_figures
    ds = run(tmp_path, "align resid_post[layer=*, pos=[1, 3]] from source into base predicting cf_wx "
                       "by das(k=1, epochs=2) as wx")
    (stem, figure), = list(trained_figures(ds))
    scores, curves = figure.axes[:2]  # then the colour bar
    assert stem == "wx" and scores.get_xlabel() == "pos" and scores.get_ylabel() == "layer"
    cells = sorted(float(t.get_text()) for t in scores.texts)
    assert cells == pytest.approx(sorted(ds["wx_iia"].values.ravel().round(2).tolist()), abs=0.006)
    assert len(curves.lines) == 4 and curves.get_xlabel() == "epoch"
    assert [p.name for p in plot_all(ds, tmp_path / "plots")] == ["wx.png"]


def test_boundless_keeps_a_subspace_where_wx_lives_and_none_where_it_cannot(tmp_path):
    """The example file: at the second shape held-out IIA >= 0.9 with a learned size between 1 and d; at the
    first it keeps no dimension (a swap of nothing changes nothing: IIA is the unchanged pairs' share). Its
    bases are written, the empty one too."""
    from safetensors.torch import load_file

    from causal.app.cli import main
    out = tmp_path / "out"
    assert main(["run", str(ROOT / "experiments" / "boundless_hiereq.cx"), f"hydra.run.dir={out}", "progress=false",
                 "plots=false"]) == 0
    ds = causal.load(out / "results.nc")
    found, first = ds.sel(layer=0, pos=1, k=64), ds.sel(layer=0, pos=0, k=64)
    assert float(found["wx_iia"]) >= 0.9 and 1 <= int(found["wx_size"]) < 64
    assert int(first["wx_size"]) == 0 and float(first["wx_iia"]) < 0.6
    kept = load_file(str(out / "bases" / "wx-resid_post-layer0-pos1-k64.safetensors"))["basis"]
    assert kept.shape == (64, int(found["wx_size"]))
    assert torch.allclose(kept.T @ kept, torch.eye(kept.shape[1]), atol=1e-5)


def test_per_head_candidates_swap_in_d_head_and_a_full_rotation_equals_the_head_patch(tmp_path):
    """z[head=*]: one candidate per head, each a rotation of the head's d_head = 16 numbers; with k = 16 the
    swap is the whole head's output, so the held-out IIA is the head patch's accuracy on those pairs."""
    ds = run(tmp_path, "align z[layer=0, head=*, pos=1] from source into base predicting cf_wx by das(k=16, epochs=1) "
                       "as wx\npatch z[layer=0, head=*, pos=1] from source into base")
    assert ds["wx_basis"].sizes["component"] == 16 and ds["wx_iia"].sizes["head"] == 4
    heldout = list(ds["wx_iia"].attrs["heldout_examples"])
    patched = ds["patch_z"].isel(example=heldout).mean("example")
    assert abs(ds["wx_iia"].squeeze() - patched.squeeze()).max() < 1e-6


def test_the_lowrank_example_swaps_wx_at_the_second_shape_for_every_k():
    ds = causal.run(ROOT / "experiments" / "lowrank_hiereq.cx")
    iia = ds["wx_iia"].sel(layer=0)
    assert (iia.sel(pos=1) >= 0.9).all() and float(iia.where(iia.pos != 1).max()) < 0.6


@pytest.mark.parametrize("trainer", ["das(k=1, epochs=1)", "boundless(epochs=1)"])
def test_a_candidate_the_loss_cannot_reach_is_reported_unreached(tmp_path, trainer, caplog):
    """resid_post of the last layer at position 1: nothing after it carries position 1 to the readout at the last
    position, so its gradient is exactly zero (boundless's size penalty has one, which is not the loss reaching):
    named in the attrs and the run's warnings; the last position's candidate is not."""
    import logging
    with caplog.at_level(logging.WARNING, logger="causal"):
        ds = run(tmp_path, f"align resid_post[layer=1, pos=[1, 4]] from source into base predicting cf_wx "
                           f"by {trainer} as wx", n=80)
    k = ds["wx_iia"].k.values[0]
    assert ds["wx_iia"].attrs["unreached_candidates"] == [f"layer=1 pos=1 k={k}"]
    assert "the loss never reached 1 of 2 candidates (layer=1 pos=1" in caplog.text
    reached = run(tmp_path, "align resid_post[layer=0, pos=[1, 4]] from source into base predicting cf_wx "
                            "by das(k=1, epochs=1) as wx", n=80)
    assert reached["wx_iia"].attrs["unreached_candidates"] == []
