"""align's training steps equal pyvene's (issue 14, item 6): same weights, pairs, first rotation and optimiser.

pyvene 0.1.8 (a dev extra) trains its RotatedSpaceIntervention, LowRankRotatedSpaceIntervention and
BoundlessRotatedSpaceIntervention at GPT-2's block 0 output, position 1, with Adam over the same batches
in the same order (and, for boundless, the same temperatures and boundary penalty) that causal's
`align` takes. Three steps; the learned bases agree to 1e-5 (measured: das and lowrank 1.3e-8, the float32
of the Dataset; boundless 1.9e-6, whose last step at temperature 0.1 leaves columns inside the boundary
with nearly equal weights, so their rotations' gradients are tiny and Adam magnifies what differs).

In float64 (the rotation built in float64: a float32 one cast up is orthogonal only to ~1e-7): Adam divides each gradient element by its own size, so an element whose exact gradient is 0
(torch's matrix_exp parametrisation starts at A = 0, where columns past k do not move the swap) steps by
noise / (noise + eps). In float32 that noise (~1e-9) is eps's size and the two libraries' bases differ by
~1e-3 after one step; in float64 it is ~1e-17 and they agree.
"""
from __future__ import annotations

import pytest
import pyvene
import torch
import transformers

import causal
from causal.methods.rotations import BOUNDLESS_END_TEMPERATURE, BOUNDLESS_START_TEMPERATURE, Subspace
from causal.methods.training import initial
from causal.zoo import zoo_path

pytestmark = pytest.mark.slow  # training against pyvene

K, POSITION, LR, BATCH = 2, 1, 0.01, 16
INTERVENTIONS = {"das": pyvene.RotatedSpaceIntervention, "lowrank": pyvene.LowRankRotatedSpaceIntervention,
                 "boundless": pyvene.BoundlessRotatedSpaceIntervention}


@pytest.fixture(scope="module")
def model64():
    folder = zoo_path("hiereq-gpt2")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64)
    return model, transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("kind", list(INTERVENTIONS))
def test_three_training_steps_equal_pyvenes(tmp_path, model64, kind):
    model, tokenizer = model64
    k = "" if kind == "boundless" else f"k={K}, "
    path = tmp_path / "x.cx"
    path.write_text('model "zoo:hiereq-gpt2"\ndata hiereq(n=64, seed=0)\nmetric accuracy(cf_wx) at -1\n'
                    f"align resid_post[layer=0, pos={POSITION}] from source into base predicting cf_wx by "
                    f"{kind}({k}epochs=1, batch={BATCH}, lr={LR}, heldout=0.125, dev=0.125) as wx\n")
    config = causal.RunConfig(progress=False)
    ours = causal.run(path, config, model=model, tokenizer=tokenizer)
    experiment = causal.prepare(path, config, model=model, tokenizer=tokenizer)
    align = experiment.interventions[0]
    assert len(align.split.train) == 3 * BATCH
    theirs = _pyvene_basis(kind, model, experiment, align)
    basis = torch.tensor(ours["wx_basis"].squeeze("k").squeeze().values, dtype=torch.float64).reshape(64, -1)
    size = int(ours["wx_size"].squeeze())
    assert size == theirs.shape[1] and size >= 1
    assert torch.allclose(basis[:, :size], theirs, atol=1e-5, rtol=0)


def _pyvene_basis(kind: str, model, experiment, align) -> torch.Tensor:
    """pyvene trains from causal's first rotation over causal's batches: the directions that swap at the end."""
    representation = {"layer": 0, "component": "block_output", "unit": "pos", "intervention_type": INTERVENTIONS[kind]}
    if kind == "lowrank":
        representation["low_rank_dimension"] = K
    intervenable = pyvene.IntervenableModel(pyvene.IntervenableConfig(representations=[representation]), model)
    intervenable.disable_model_gradients()
    intervention = next(iter(intervenable.interventions.values()))
    intervention = intervention[0] if isinstance(intervention, (list, tuple)) else intervention
    k = align.training.ks[0]  # boundless: the width
    intervention.to(torch.float64)
    first = Subspace(kind, 64, k, initial(0, align.sweep.points[0], k), torch.float64)
    intervention.rotate_layer.load_state_dict(first.rotation.state_dict())
    parameters = list(intervention.rotate_layer.parameters())
    if kind == "das":
        intervention.set_interchange_dim(K)
    if kind == "boundless":
        parameters.append(intervention.intervention_boundaries)
        # its column indices are int64, which makes (i - 0.0) / T float32: indices in float64 keep the mask in
        # float64 (the same numbers, without float32's rounding, which Adam's first steps magnify)
        intervention.intervention_population.data = intervention.intervention_population.data.double()
    optimiser = torch.optim.Adam(parameters, lr=LR)
    train = align.split.train
    order = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(1))]  # causal's epoch 1
    temperatures = torch.linspace(BOUNDLESS_START_TEMPERATURE, BOUNDLESS_END_TEMPERATURE, 3).tolist()
    base, source = experiment.prompts[align.base], experiment.prompts[align.source]
    for step, start in enumerate(range(0, len(order), BATCH)):
        batch = order[start:start + BATCH]
        if kind == "boundless":
            intervention.set_temperature(torch.tensor(temperatures[step], dtype=torch.float64))
        where = [[[POSITION]] * len(batch)]
        _, out = intervenable({"input_ids": base.ids[batch]}, [{"input_ids": source.ids[batch]}],
                              {"sources->base": (where, where)})
        loss = torch.nn.functional.cross_entropy(out.logits[torch.arange(len(batch)), base.lengths[batch] - 1],
                                                 align.labels[batch])
        if kind == "boundless":
            loss = loss + intervention.intervention_boundaries.clamp(1e-3, 1).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    weight = intervention.rotate_layer.weight.detach()
    if kind == "das":
        return weight[:, :K]
    if kind == "lowrank":
        return weight
    boundary = intervention.intervention_boundaries.detach().clamp(1e-3, 1) * 64
    index = torch.arange(64, dtype=torch.float64)
    t = temperatures[-1]
    return weight[:, torch.sigmoid(index / t) * torch.sigmoid((boundary - index) / t) > 0.5]
