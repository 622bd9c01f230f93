"""reft's training steps equal pyreft's LoreftIntervention (issue 14, item 7).

pyreft 0.1.0 pins transformers 4.45, so it is installed without its dependencies (README set-up,
.ci/run) and only its LoreftIntervention is used, inside pyvene's IntervenableModel as pyreft's own
ReftModel does. Both start from causal's seeded parameters (R, W, b) at GPT-2 block 1's output, last
position, and take Adam steps over the same batches in the same order on the next-token loss of the
target column. float64, for the reason tests/test_pyvene_parity.py gives; three steps, agreeing to 1e-5
(measured: R 2.1e-8, W 7.0e-9, b 5.9e-9, the float32 of the Dataset).
"""
from __future__ import annotations

import pytest

import pyvene
import torch
import transformers
from pyreft import LoreftIntervention

import causal
from causal.methods.rotations import Loreft
from causal.methods.training import initial
from causal.zoo import zoo_path

pytestmark = pytest.mark.slow  # training against pyreft

K, LAYER, LR, BATCH = 2, 1, 0.01, 16


def test_three_training_steps_equal_pyrefts(tmp_path):
    folder = zoo_path("hiereq-gpt2")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    path = tmp_path / "x.cx"
    path.write_text('model "zoo:hiereq-gpt2"\ndata hiereq(n=64, seed=0)\nmetric accuracy(negated) at -1\n'
                    f"reft resid_post[layer={LAYER}, pos=-1] on base predicting negated by loreft(k={K}, epochs=1, "
                    f"batch={BATCH}, lr={LR}, heldout=0.125, dev=0.125) as flip\n")
    config = causal.RunConfig(progress=False)
    ours = causal.run(path, config, model=model, tokenizer=tokenizer)
    experiment = causal.prepare(path, config, model=model, tokenizer=tokenizer)
    reft = experiment.interventions[0]
    assert len(reft.split.train) == 3 * BATCH

    intervention = LoreftIntervention(embed_dim=64, low_rank_dimension=K, dtype=torch.float64)
    first = Loreft(64, K, initial(0, reft.sweep.points[0], K), torch.float64)
    intervention.rotate_layer.load_state_dict(first.rotation.state_dict())
    intervention.learned_source.load_state_dict(first.learned_source.state_dict())
    intervention.to(torch.float64)
    config = pyvene.IntervenableConfig(representations=[{"layer": LAYER, "component": "block_output",
                                                         "low_rank_dimension": K, "intervention": intervention}])
    intervenable = pyvene.IntervenableModel(config, model)
    intervenable.disable_model_gradients()
    optimiser = torch.optim.Adam(list(intervention.rotate_layer.parameters()) +
                                 list(intervention.learned_source.parameters()), lr=LR)
    base = experiment.prompts["base"]
    order = reft.split.train[torch.randperm(len(reft.split.train), generator=torch.Generator().manual_seed(1))]
    for start in range(0, len(order), BATCH):
        batch = order[start:start + BATCH]
        last = [[[int(p)] for p in base.lengths[batch] - 1]]
        _, out = intervenable({"input_ids": base.ids[batch]}, unit_locations={"sources->base": (None, last)})
        logits = out.logits[torch.arange(len(batch)), base.lengths[batch] - 1]
        loss = torch.nn.functional.cross_entropy(logits, reft.labels[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    def ours_(name):
        return torch.tensor(ours[f"flip_{name}"].squeeze().values, dtype=torch.float64)
    assert torch.allclose(ours_("basis"), intervention.rotate_layer.weight.detach(), atol=1e-5, rtol=0)
    assert torch.allclose(ours_("weight"), intervention.learned_source.weight.detach(), atol=1e-5, rtol=0)
    assert torch.allclose(ours_("bias"), intervention.learned_source.bias.detach(), atol=1e-5, rtol=0)
    moved = (ours_("basis") - first.rotation.weight.detach()).abs().max()
    assert moved > 1e-3  # the steps did something to compare
