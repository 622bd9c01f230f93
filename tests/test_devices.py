"""Device choice (issue 18 item 3): Apple's MPS is accepted where torch has it, refused plainly where not,
and the few float64 sums fall back to float32 there (MPS has no float64). This machine has no MPS, so
availability is simulated; the run itself on MPS is left to a Mac."""
from __future__ import annotations

import re

import pytest
import torch

from causal.errors import CausalError
from causal.models import load


def test_mps_is_refused_with_the_reason_where_torch_lacks_it(monkeypatch):
    monkeypatch.setattr(load, "mps_available", lambda: False)
    with pytest.raises(CausalError, match="device 'mps' was asked for but Apple's MPS backend is not available here"):
        load.pick_device("mps")
    assert load.pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_mps_is_accepted_and_chosen_by_auto_where_available(monkeypatch):
    monkeypatch.setattr(load, "mps_available", lambda: True)
    assert load.pick_device("mps") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load.pick_device("auto") == torch.device("mps")  # no CUDA: the Apple GPU before the CPU


def test_wide_sums_are_float32_on_mps_only():
    assert load.widest_float(torch.device("mps")) == torch.float32
    assert load.widest_float(torch.device("cpu")) == torch.float64
    assert load.widest_float(torch.device("cuda")) == torch.float64


@pytest.mark.parametrize("name, message", [("xpu", "device 'xpu' is not supported yet; use 'auto', 'cpu', "
                                                   "'cuda[:N]' or 'mps'"),
                                           ("float64", "unknown device 'float64'")])
def test_other_devices_are_refused(name, message):
    with pytest.raises(CausalError, match=re.escape(message)):
        load.pick_device(name)


@pytest.mark.parametrize("bits, flag", [("8-bit", "load_in_8bit"), ("4-bit", "load_in_4bit")])
def test_bitsandbytes_weights_are_refused_off_cuda_before_loading(tmp_path, tiny_gpt2, write_experiment, no_forward,
                                                                 bits, flag):
    import json
    import shutil

    import causal
    folder = tmp_path / "quantised"
    shutil.copytree(tiny_gpt2, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", flag: True}
    (folder / "config.json").write_text(json.dumps(config))
    path = write_experiment("metric logprob(io)\nablate mlp_out[layer=0] with zero", model=folder)
    with pytest.raises(CausalError) as info:
        causal.run(path, causal.RunConfig(device="cpu", progress=False))
    message = str(info.value)
    assert f"is saved quantised by bitsandbytes ({bits}), which needs a CUDA GPU (this run is on cpu)" in message
    assert "exp.cx:2:7" in message and "pip install bitsandbytes" in message and not no_forward


OFFLOADED = '''experiment offload
model "zoo:attn-only-2l"
data induction(n=6, length=10, seed=0)
metric logprob(next) at 11..19
patch z[layer=*, head=*] from corrupt into clean
ablate resid_pre[layer=*, pos=*] with mean
steer resid_pre[layer=1] by 3 * (mean(corrupt) - mean(clean)) as push
trace noise(3 sigma, samples=2) on [1, 2] restore resid_pre[layer=*, pos=*]
path z[layer=0, head=*] -> q[layer=1, head=*] from corrupt into clean
attribute q[layer=*, head=*] from corrupt into clean verify top 2
attribute k[layer=*, kv_head=*] from corrupt into clean
lens resid_post top 3
record resid_pre as resid
generate 3 under push as continued
patch sae("zoo:attn-only-2l-sae")[feature=0..15] from corrupt into clean
'''


def test_a_model_offloaded_to_disk_by_accelerate_gives_the_same_results(tmp_path):
    """Issue 18 item 2 on the CPU: layer 1 and the unembedding live on disk (accelerate's offload, as
    `device_map` places a model too large for its device); every method equals the one-device run bit for bit."""
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import causal
    from causal.zoo import zoo_path
    folder = zoo_path("attn-only-2l")
    placement = {"gpt_neox.embed_in": "cpu", "gpt_neox.layers.0": "cpu", "gpt_neox.layers.1": "disk",
                 "gpt_neox.final_layer_norm": "cpu", "gpt_neox.rotary_emb": "cpu", "gpt_neox.emb_dropout": "cpu",
                 "lm_head": "disk"}
    offloaded = AutoModelForCausalLM.from_pretrained(folder, device_map=placement, offload_folder=str(tmp_path)).eval()
    assert next(offloaded.gpt_neox.layers[1].parameters()).device.type == "meta"  # really off the model
    config = causal.RunConfig(device="cpu", progress=False)
    one_device = causal.run_text(OFFLOADED, config)
    spread = causal.run_text(OFFLOADED, config, model=offloaded, tokenizer=AutoTokenizer.from_pretrained(folder))
    assert set(one_device.data_vars) == set(spread.data_vars)
    for name in one_device.data_vars:
        a, b = one_device[name].values, spread[name].values
        same = (a == b) | ((a != a) & (b != b)) if a.dtype.kind in "fO" else a == b  # NaN where both are
        assert np.all(same), name
    tokenizer = AutoTokenizer.from_pretrained(folder)
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()  # the weights' digest reads the offloaded ones
    assert load.wrap_model(offloaded, tokenizer).revision == load.wrap_model(plain, tokenizer).revision


def test_the_device_map_setting_loads_a_model_offloaded_to_disk(tmp_path, write_experiment):
    """`device_map=FILE` (or auto/balanced/sequential) from a `causal run` or RunConfig: the same numbers."""
    import json

    import numpy as np

    import causal
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps({"gpt_neox.embed_in": "cpu", "gpt_neox.layers.0": "cpu",
                                     "gpt_neox.layers.1": "disk", "gpt_neox.final_layer_norm": "cpu",
                                     "gpt_neox.rotary_emb": "cpu", "gpt_neox.emb_dropout": "cpu", "lm_head": "cpu"}))
    config = causal.RunConfig(device="cpu", progress=False)
    plain = causal.run_text(OFFLOADED, config)
    for device_map in (str(placement), "auto"):
        spread_config = causal.RunConfig(device="cpu", progress=False, device_map=device_map,
                                         offload_folder=str(tmp_path / "offload"))
        experiment = causal.prepare_text(OFFLOADED, spread_config)
        layer_1 = next(experiment.model.model.gpt_neox.layers[1].parameters()).device.type
        assert layer_1 == ("meta" if device_map != "auto" else "cpu")  # on disk (read from the checkpoint there)
        if device_map != "auto":  # `causal check` counts those weights apart, the layer's activations on the CPU
            from causal.app.api import plan_run
            from causal.app.check import describe
            memory = describe(experiment, plan_run(experiment, spread_config)).splitlines()[-1]
            assert memory.startswith("memory   per device") and ", offloaded to disk or CPU by accelerate " in memory
        spread = causal.run_prepared(experiment, spread_config)
        for name in ("patch_z", "attribute_q", "trace_resid_pre", "lens_resid_post", "resid"):
            assert np.array_equal(plain[name].values, spread[name].values, equal_nan=True), (device_map, name)


@pytest.mark.parametrize("value, message", [
    ("nowhere.json", "device_map='nowhere.json' is neither one of auto, balanced, balanced_low_0, sequential nor a "
                     "JSON file"),
    ("bad.json", "device_map file"),
    ("list.json", "must map module names to devices"),
])
def test_bad_device_maps_are_refused_before_loading(tmp_path, monkeypatch, value, message):
    from transformers import AutoModelForCausalLM

    import causal
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: 1 / 0)  # never reached
    with pytest.raises(CausalError, match=re.escape(message)):
        causal.run_text(OFFLOADED, causal.RunConfig(device="cpu", progress=False, device_map=value))
