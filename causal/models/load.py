"""Resolve a model reference to a loaded model.

References: `zoo:<name>` (a toy model shipped here), `pkg:<python_package>[/<subfolder>]`
(a folder inside an installed Python package, e.g. a model packaged on PyPI for offline
use), a local folder, or a HF hub id. HF models are used exactly as published: no weight
conversion, `trust_remote_code` off unless asked. Hub ids are loaded from the hub when it can
be reached; when a quick probe says it cannot (or HF_HUB_OFFLINE=1), from the local HF cache
only, and one that is not there is refused at once (transformers would retry for minutes). Decoders load with their LM head; encoders load with
their masked-LM head when the checkpoint has one, else as the bare encoder (never with a
randomly initialised head).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import socket
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from causal.errors import CausalError, Span, did_you_mean
from causal.models.adapter import ARCHITECTURES, ModelAdapter, adapter_for
from causal.zoo import zoo_names, zoo_path

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    ref: str
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    adapter: ModelAdapter
    revision: str
    device: torch.device
    dtype: torch.dtype
    head: str = "lm"  # "lm": the model returns vocabulary logits; "encoder": it returns hidden states


DEVICES = "use 'auto', 'cpu', 'cuda[:N]' or 'mps'"


def mps_available() -> bool:
    """Apple's Metal backend: Apple silicon with a torch built for it."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def pick_device(name: str) -> torch.device:
    """'auto': a CUDA GPU, else Apple's MPS, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CausalError(f"unknown device {name!r}; {DEVICES}") from None
    if device.type == "meta":
        raise CausalError(f"device {name!r} holds no weights (shapes only), so no model can run on it; {DEVICES}")
    if device.type not in ("cpu", "cuda", "mps"):
        raise CausalError(f"device {name!r} is not supported yet; {DEVICES}")
    if device.type == "mps" and not mps_available():
        raise CausalError(f"device {name!r} was asked for but Apple's MPS backend is not available here (it needs "
                          "Apple silicon, macOS 12.3 or later and a torch built with MPS)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CausalError(f"device {name!r} was asked for but CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CausalError(f"device {name!r} was asked for but this machine has {torch.cuda.device_count()} "
                          f"CUDA device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return device


def widest_float(device: torch.device) -> torch.dtype:
    """float64 for the few sums that need it; float32 on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def resolve_reference(ref: str, span: Span | None = None) -> str:
    """The folder or hub id that `from_pretrained` should receive."""
    if ref.startswith("zoo:"):
        name = ref[4:]
        if name not in zoo_names():
            raise CausalError(f"no toy model {name!r} in the zoo; available: {', '.join(zoo_names())}",
                              span, hint=did_you_mean(name, zoo_names()))
        return str(zoo_path(name))
    if ref.startswith("pkg:"):
        return str(package_folder(ref, span))
    if ref.startswith((".", "/", "~")) or Path(ref).exists():  # a local folder, not a hub id
        return str(_model_folder(Path(ref).expanduser(), ref, span))
    return ref


def _model_folder(folder: Path, ref: str, span: Span | None) -> Path:
    """A local model folder, checked here: transformers would take a missing one for a malformed hub id."""
    if not folder.exists():
        raise CausalError(f"no model folder {ref!r} (resolved to {str(folder.resolve())!r})", span,
                          hint="a local path starts with ./, ../, / or ~; a hub id looks like org/name")
    if not folder.is_dir():
        raise CausalError(f"model {ref!r} is a file; a model is a folder holding config.json, the weights and the "
                          "tokenizer's files", span)
    if not (folder / "config.json").is_file():
        held = sorted(p.name for p in folder.iterdir())[:8]
        raise CausalError(f"model folder {ref!r} has no config.json, so it is not a Hugging Face model folder "
                          f"(it holds: {', '.join(held) or 'nothing'})", span,
                          hint="save one with model.save_pretrained(folder) and tokenizer.save_pretrained(folder)")
    return folder


def package_folder(ref: str, span: Span | None = None) -> Path:
    """`pkg:<package>[/<subfolder>]` -> that folder of the installed package (found without importing it)."""
    package, _, subfolder = ref[len("pkg:"):].partition("/")
    try:
        spec = importlib.util.find_spec(package) if package else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        hint = (f"Python package names use underscores: try 'pkg:{package.replace('-', '_')}'"
                if "-" in package else "install it with pip, or check the name")
        raise CausalError(f"no installed Python package {package!r} (model reference {ref!r})", span,
                          hint=hint)
    root = Path(next(iter(spec.submodule_search_locations)))
    folder = root / subfolder
    if not folder.is_dir():
        folders = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))]
        raise CausalError(f"no folder {subfolder!r} in Python package {package!r} at {root} "
                          f"(model reference {ref!r})", span,
                          hint=did_you_mean(subfolder, folders) or f"folders there: {', '.join(folders) or 'none'}")
    return folder


def model_class_for(config) -> tuple[type, str]:
    """Which Auto class loads the checkpoint without inventing weights, and what its forward returns."""
    names = config.architectures or []
    if any(name.endswith("ForMaskedLM") for name in names):
        return AutoModelForMaskedLM, "lm"
    spec = ARCHITECTURES.get(getattr(config, "model_type", None))
    if spec is not None and not spec.is_causal:
        return AutoModel, "encoder"
    return AutoModelForCausalLM, "lm"


def load_model(ref: str, device: str = "auto", dtype: str = "float32", span: Span | None = None,
               trust_remote_code: bool = False, device_map: str | None = None,
               offload_folder: str | None = None) -> LoadedModel:
    torch_dtype = _dtype(dtype)
    target = resolve_reference(ref, span)
    torch_device = pick_device(device)
    placement = _placement(device_map, offload_folder)
    hf_logging.disable_progress_bar()  # our own progress bar covers the run; theirs is noise per load
    options = {"trust_remote_code": trust_remote_code, "local_files_only": _cache_only(ref, target, span)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(target, **options)
        config = AutoConfig.from_pretrained(target, **options)
        _check_quantization(ref, config, torch_device, span)
        model_class, head = model_class_for(config)
        model, info = model_class.from_pretrained(target, dtype=torch_dtype, output_loading_info=True, **options,
                                                  **placement)
    except CausalError:
        raise
    except Exception as exc:  # noqa: BLE001 -- whatever a broken folder or weights file raises, say so plainly
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CausalError(f"cannot load model {ref!r}: {first_line}", span,
                          hint="use a local folder, a 'zoo:' or 'pkg:' model, or a hub id with network access "
                               "or a filled HF cache; models that ship their own code need trust_remote_code=true"
                          ) from None
    _check_complete(ref, info, tokenizer, span)
    model.eval()
    if placement:  # accelerate placed it: inputs go where the embeddings are
        embeddings = model.get_input_embeddings().weight
        torch_device = embeddings.device if embeddings.device.type != "meta" else torch.device("cpu")
    else:
        model.to(torch_device)
    adapter = adapter_for(model)
    return LoadedModel(ref, model, tokenizer, adapter, _revision(target, model), torch_device, torch_dtype, head)


PLACEMENTS = ("auto", "balanced", "balanced_low_0", "sequential")


def _placement(device_map: str | None, offload_folder: str | None) -> dict:
    """from_pretrained's device_map / offload_folder for the `device_map` setting, checked before loading."""
    if device_map is None:
        return {}
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise CausalError(f"device_map={device_map!r} needs the accelerate package", hint="pip install accelerate") from None
    placement: str | dict = device_map
    if device_map not in PLACEMENTS:
        path = Path(device_map)
        if not path.is_file():
            raise CausalError(f"device_map={device_map!r} is neither one of {', '.join(PLACEMENTS)} nor a JSON file")
        try:
            placement = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CausalError(f"device_map file {device_map!r} is not JSON: {exc}") from None
        if not isinstance(placement, dict) or not all(isinstance(k, str) and isinstance(v, (str, int))
                                                     for k, v in placement.items()):
            raise CausalError(f"device_map file {device_map!r} must map module names to devices "
                              '({"model.layers.0": 0, "lm_head": "cpu", "model.layers.9": "disk"})')
    return {"device_map": placement, "offload_folder": offload_folder or tempfile.mkdtemp(prefix="causal-offload-")}


def _check_quantization(ref: str, config, device: torch.device, span: Span | None) -> None:
    """Weights saved quantised by bitsandbytes load only onto a CUDA GPU with bitsandbytes installed."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return
    settings = quantization if isinstance(quantization, dict) else quantization.to_dict()
    method = settings.get("quant_method", "unknown")
    if method != "bitsandbytes":
        return  # other schemes (GPTQ, AWQ, ...) are transformers' to load or refuse
    bits = "4-bit" if settings.get("load_in_4bit") else "8-bit"
    missing = []
    if device.type != "cuda":
        missing.append(f"a CUDA GPU (this run is on {device.type})")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        missing.append("the bitsandbytes package")
    if missing:
        raise CausalError(f"model {ref!r} is saved quantised by bitsandbytes ({bits}), which needs "
                          f"{' and '.join(missing)}", span,
                          hint="run it with device=cuda on a machine with a GPU and `pip install bitsandbytes`, or use "
                               "the model's unquantised weights (dtype=float16 or bfloat16 halves their memory)")


PROBE_SECONDS = 3.0  # how long the hub may take to accept a connection before we load from the cache only


def _cache_only(ref: str, target: str, span: Span | None) -> bool:
    """True for a hub id while the hub cannot be reached: load it from the HF cache only, at once. One that is
    not in the cache is refused here, in a second, instead of after transformers' minutes of retries."""
    from huggingface_hub import constants, try_to_load_from_cache
    if target != ref or Path(target).exists() or (not constants.HF_HUB_OFFLINE and hub_reachable()):
        return False
    try:
        cached = isinstance(try_to_load_from_cache(ref, "config.json"), str)
    except Exception:  # noqa: BLE001 -- not a valid hub id: then it is not cached either
        cached = False
    if not cached:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"the hub ({constants.ENDPOINT}) cannot be reached"
        raise CausalError(f"cannot load model {ref!r}: {why}, and the model is not in the local HF cache "
                          f"({constants.HF_HUB_CACHE})", span,
                          hint="load it once where the hub can be reached (that fills the cache), or use a local "
                               "folder, a 'zoo:' or a 'pkg:' model")
    return True


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """Whether the HF hub accepts a connection within PROBE_SECONDS (once per process). Behind a proxy
    (HTTPS_PROXY, ALL_PROXY) the hub is taken to be reachable: the probe would not go through it."""
    from huggingface_hub import constants
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=PROBE_SECONDS).close()
    except (OSError, ValueError):
        return False
    return True


def wrap_model(model, tokenizer, device: str = "auto", dtype: str | None = None) -> LoadedModel:
    """A model the caller already holds (in a notebook), used in place: not copied, moved or cast.

    `device` and `dtype` are what the caller expects it to be on ("auto"/None: whatever it is);
    a mismatch is an error, since moving the caller's model would be a side effect. Training
    mode is refused rather than switched off: dropout would make every number random.
    """
    if not isinstance(model, PreTrainedModel):
        raise CausalError(f"model must be a transformers PreTrainedModel (from from_pretrained), got "
                          f"{type(model).__name__}")
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise CausalError(f"a model passed in needs its tokenizer (a transformers tokenizer), got "
                          f"{type(tokenizer).__name__}")
    if model.training:
        raise CausalError(f"model {type(model).__name__} is in training mode, so dropout would randomise every "
                          "result", hint="call model.eval() first")
    parameter = next(model.parameters())
    if parameter.device.type == "meta":
        raise CausalError(f"model {type(model).__name__} has no weights (they are on the meta device)",
                          hint="load it with from_pretrained (or model.to_empty(...) and load a state dict)")
    if device != "auto" and not _same_device(pick_device(device), parameter.device):
        raise CausalError(f"device {device!r} was asked for but the model passed in is on {parameter.device}",
                          hint="move the model with model.to(...), or leave device='auto'")
    if dtype is not None and _dtype(dtype) != parameter.dtype:
        raise CausalError(f"dtype {dtype!r} was asked for but the model passed in is "
                          f"{str(parameter.dtype).removeprefix('torch.')}",
                          hint="cast the model, or leave the dtype unset")
    ref = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    head = "lm" if model.get_output_embeddings() is not None else "encoder"
    return LoadedModel(ref, model, tokenizer, adapter_for(model), _weights_digest(model), parameter.device,
                       parameter.dtype, head)


def _same_device(asked: torch.device, actual: torch.device) -> bool:
    return asked.type == actual.type and (asked.index is None or asked.index == (actual.index or 0))


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise CausalError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _weights_digest(model: torch.nn.Module) -> str:
    """A content hash of the weights, so results and checkpoints name the exact model that ran."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.device.type == "meta":  # offloaded by accelerate: its weights lie on the CPU or disk
            tensor = _offloaded_weight(model, name)
        digest.update(name.encode())
        digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:16]


def _offloaded_weight(model: torch.nn.Module, name: str) -> torch.Tensor:
    """A weight accelerate keeps off the model, read through the weights map of its module's hook."""
    module_name, _, leaf = name.rpartition(".")
    weights = getattr(getattr(model.get_submodule(module_name), "_hf_hook", None), "weights_map", None)
    if weights is None:
        raise CausalError(f"weight {name!r} of the model passed in is on the meta device and not offloaded by "
                          "accelerate, so it has no values")
    return weights[leaf]


def _check_complete(ref: str, info: dict, tokenizer, span: Span | None) -> None:
    """HF fills missing weights with random values and only logs it: every number after that would be noise."""
    missing = list(info.get("missing_keys") or []) + [str(k[0]) if isinstance(k, tuple) else str(k)
                                                        for k in info.get("mismatched_keys") or []]
    if missing:
        shown = ", ".join(sorted(missing)[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CausalError(f"cannot load model {ref!r}: its weights lack or mis-shape {shown}", span)
    if len(set(tokenizer.get_vocab()) - set(tokenizer.all_special_tokens)) == 0:
        raise CausalError(f"cannot load model {ref!r}: its tokenizer is empty (no tokenizer files in the folder?)",
                          span)


def _revision(target: str, model: torch.nn.Module) -> str:
    """A commit hash for hub models; a content hash of the weights for local folders."""
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return str(commit)
    folder = Path(target)
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not weights:
        return "unknown"
    digest = hashlib.sha256()
    for path in weights:
        digest.update(path.read_bytes())
    return "sha256:" + digest.hexdigest()[:16]


@contextmanager
def frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Gradients are wanted for activations only: parameters stay out of the graph."""
    states = [(p, p.requires_grad) for p in model.parameters() if p.requires_grad]
    for p, _ in states:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, state in states:
            if not p.is_inference():  # accelerate's offload may have swapped in weights read under inference mode
                p.requires_grad_(state)
