"""reft (issue 14, item 7): LoReFT trained on a target column, saved, and reused by `steer ... by loreft(FILE)`."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

import causal
from causal import CausalError
from causal.zoo import zoo_path

pytestmark = pytest.mark.slow  # training

ROOT = Path(__file__).resolve().parents[1]
HEAD = 'model "zoo:hiereq-gpt2"\ndata hiereq(n={n}, seed=0)\nmetric accuracy(negated) at -1\n'


def write(tmp_path, body: str, n: int = 320, name: str = "x.cx") -> Path:
    path = tmp_path / name
    path.write_text(HEAD.format(n=n) + body + "\n")
    return path


def test_the_example_learns_to_negate_the_answer_at_the_last_layer():
    """The frozen toy never answers `negated` (0.0); a rank-1 LoReFT after block 1 at '=' makes it (>= 0.9)."""
    ds = causal.run(ROOT / "experiments" / "reft_hiereq.cx")
    assert float(ds["base"].mean()) == 0.0
    assert float(ds["flip_accuracy"].sel(layer=1, k=1).squeeze()) >= 0.9
    assert ds["flip_weight"].sizes["component"] == 64 and ds["flip_bias"].sizes["direction"] == 1


def test_saved_parameters_steer_another_experiment_as_trained(tmp_path):
    """`causal run` writes R, W, b; `steer ... by loreft(FILE)` reproduces the held-out accuracy, and its logits
    equal a plain HF forward with h + R (W h + b - Rᵀ h) applied by hand at the last position (1e-5)."""
    from safetensors.torch import load_file

    from causal.app.cli import main
    from causal.results import load
    out = tmp_path / "out"
    trained_file = write(tmp_path, "reft resid_post[layer=1, pos=-1] on base predicting negated by "
                                   "loreft(k=2, epochs=3) as flip")
    assert main(["run", str(trained_file), f"hydra.run.dir={out}", "progress=false", "plots=false"]) == 0
    trained = load(out / "results.nc")
    saved = out / "bases" / "flip-resid_post-layer1-pos-1-k2.safetensors"
    steer = write(tmp_path, f'steer resid_post[layer=1, pos=-1] by loreft("{saved}") on base as again', name="s.cx")
    steered = causal.run(steer)
    heldout = list(trained["flip_accuracy"].attrs["heldout_examples"])
    accuracy = float(trained["flip_accuracy"].squeeze())
    assert float(steered["again"].squeeze().values[heldout].mean()) == pytest.approx(accuracy, abs=1e-6)

    tensors = load_file(str(saved))
    basis, weight, bias = tensors["basis"], tensors["weight"], tensors["bias"]
    model = transformers.AutoModelForCausalLM.from_pretrained(zoo_path("hiereq-gpt2"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(zoo_path("hiereq-gpt2"))
    experiment = causal.prepare(steer, causal.RunConfig(progress=False))
    ids = experiment.prompts["base"].ids[:8]

    def edit(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        last = h[:, -1]
        h[:, -1] = last + ((last @ weight.T + bias) - last @ basis) @ basis.T
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = model.transformer.h[1].register_forward_hook(edit)
    with torch.no_grad():
        logits = model(ids).logits[:, -1]
    handle.remove()
    negated = torch.tensor([tokenizer.convert_tokens_to_ids(tokenizer.tokenize(a))[0]
                            for a in experiment.examples.columns["negated"][:8]])
    by_hand = (logits.argmax(-1) == negated).float()
    assert torch.equal(by_hand, torch.tensor(steered["again"].squeeze().values[:8], dtype=torch.float32))
    run = causal.run_text(HEAD.format(n=320).replace("accuracy(negated)", "logprob(negated)") +
                          f'steer resid_post[layer=1, pos=-1] by loreft("{saved}") on base as again\n')
    expected = logits.log_softmax(-1)[torch.arange(8), negated]
    assert torch.allclose(torch.tensor(run["again"].squeeze().values[:8]), expected, atol=1e-5)


@pytest.mark.parametrize("statement, where, message", [
    ("by das(k=1)", "4:61", "unknown trainer 'das'; choose loreft"),
    ("by loreft(k=65)", "4:71", "k=65: a subspace of the sites' 64-number vectors has 1..64"),
    ("by loreft(epochs=0)", "4:71", "epochs=0: a whole number of at least 1"),
])
def test_bad_settings_are_refused_before_training(tmp_path, statement, where, message):
    with pytest.raises(CausalError, match=rf"x.cx:{where}: error: .*{message}"):
        causal.run(write(tmp_path, f"reft resid_post[layer=1, pos=-1] on base predicting negated {statement}"))


def test_a_wrong_or_foreign_loreft_file_is_refused(tmp_path):
    from safetensors.torch import save_file
    good = {"basis": torch.randn(64, 2), "weight": torch.randn(2, 64), "bias": torch.randn(2)}
    cases = {"short.safetensors": ({**good, "bias": torch.randn(3)}, {}, "bias has shape (3,)"),
             "narrow.safetensors": ({**good, "basis": torch.randn(32, 2)}, {}, "basis has shape (32, 2)"),
             "nobias.safetensors": ({k: v for k, v in good.items() if k != "bias"}, {}, "has no tensor 'bias'"),
             "other.safetensors": (good, {"model": "gpt2"}, "was saved for model 'gpt2', not 'zoo:hiereq-gpt2'")}
    for file, (tensors, metadata, message) in cases.items():
        save_file(tensors, str(tmp_path / file), metadata=metadata or None)
        path = write(tmp_path, f'steer resid_post[layer=1, pos=-1] by loreft("{file}") on base')
        with pytest.raises(CausalError, match=r"x.cx:4:\d+: error: loreft") as info:
            causal.run(path)
        assert message in str(info.value), file


def test_a_loreft_the_loss_cannot_reach_is_reported_unreached(tmp_path):
    """A last-layer site before the read position: its LoReFT gets no gradient and is named so."""
    ds = causal.run(write(tmp_path, "reft resid_post[layer=1, pos=[1, -1]] on base predicting negated by "
                                    "loreft(k=1, epochs=1) as flip", n=80))
    assert ds["flip_accuracy"].attrs["unreached_candidates"] == ["layer=1 pos=1 k=1"]
