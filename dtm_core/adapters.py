"""Per-range LoRA adapters (``finetune.adapter: lora``) through diffusers' PEFT integration.

A fine-tune with an adapter trains low-rank updates ``B A`` (PEFT's LoRA,
attached with diffusers' ``add_adapter``) on the modules named in
``finetune.lora.targets`` while every base weight stays frozen; B starts at
zero, so the model starts as the base, as the identity projections do.

On disk such a model is its adapter alone (diffusers' ``save_lora_adapter``
file) with the scheduler and a ``dtm_info.json`` that names the base it was
trained on. :func:`dtm_core.model.load_unet` loads that base and folds the
adapter in (:func:`folded`: ``fuse_lora`` then ``unload_lora``), so task vectors, merging, the ensemble
and export read it as they read a full fine-tune: its task vector is the
dense delta ``scale * B A`` of every wrapped weight.

:func:`peft_merge` merges adapters as adapters, with PEFT's
``add_weighted_adapter``. Its ``cat`` combination is exact (the adapters are
stacked, rank N r), so it equals the dense task-arithmetic merge; ``linear``
sums ``sqrt(w) A`` and ``sqrt(w) B`` separately, which adds cross terms
``B_i A_j`` and is not the dense merge (tests/test_adapters.py measures both).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from .config import LoraParams
from .errors import ModelLoadError

ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"
INFO_FILE = "dtm_info.json"


def _peft():
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - peft is a project dependency
        raise ModelLoadError("finetune.adapter: lora needs the peft package: pip install peft") from exc
    return peft


def lora_config(cfg: LoraParams):
    """PEFT's LoraConfig for ``finetune.lora``."""
    return _peft().LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets),
                              init_lora_weights=True)


def attach(model, cfg: LoraParams, name: str = "default"):
    """Add a LoRA adapter to ``model`` (a :class:`~dtm_core.model.DeMeUNet2DModel`) and freeze the rest.

    Raises a :class:`ModelLoadError` naming ``finetune.lora.targets`` when no
    module of the model matches them.
    """
    try:
        model.add_adapter(lora_config(cfg), adapter_name=name)
    except ValueError as exc:
        if "not found in the base model" not in str(exc) and "Target modules" not in str(exc):
            raise
        raise ModelLoadError(
            f"finetune.lora.targets {list(cfg.targets)} match no module of this UNet ({exc}); name module "
            "suffixes it has, such as conv1, conv2, time_emb_proj, to_q, to_k, to_v"
        ) from exc
    return model


def has_adapter(model) -> bool:
    return bool(getattr(model, "_hf_peft_config_loaded", False))


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_WEIGHTS).is_file()


def save_adapter(model, tmp: Path) -> None:
    """Write ``model``'s adapter weights (no base weights) into the directory ``tmp``, in a canonical header."""
    model.save_lora_adapter(str(tmp), weight_name=ADAPTER_WEIGHTS)
    canonical_header(Path(tmp) / ADAPTER_WEIGHTS)


def canonical_header(path: Path) -> None:
    """Rewrite a safetensors file's header so that equal contents give equal bytes (DVC hashes the file).

    safetensors keeps the metadata in a hash map whose order changes from process to process, and PEFT writes
    ``target_modules`` (a set) into diffusers' adapter metadata in the process's string-hash order: both are
    sorted here. The tensors' entries and bytes stay as they are; the header keeps its length.
    """
    with open(path, "r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        meta = header.pop("__metadata__", None)
        if not meta:
            return
        if "lora_adapter_metadata" in meta:
            config = json.loads(meta["lora_adapter_metadata"])
            if isinstance(config.get("target_modules"), list):
                config["target_modules"] = sorted(config["target_modules"])
            meta["lora_adapter_metadata"] = json.dumps(config, indent=2, sort_keys=True)
        text = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":"),
                          ensure_ascii=False).encode()
        if len(text) > size:  # the same content re-serialised: never longer than safetensors' own
            raise ModelLoadError(f"'{path}': its header cannot be rewritten in place ({len(text)} > {size} bytes)")
        handle.seek(8)
        handle.write(text.ljust(size, b" "))


def _info(path: Path) -> dict:
    """The adapter's dtm_info.json: its base directory, whether it has projections, its finetune.lora."""
    try:
        info = json.loads((path / INFO_FILE).read_text())
        if not {"base", "channel_projection", "lora"} <= set(info):
            raise KeyError("base, channel_projection, lora")
        return info
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise ModelLoadError(
            f"adapter '{path}' has no readable {INFO_FILE} naming its base model ({exc}); re-run the stage "
            "that wrote it (dvc repro)"
        ) from exc


def load_into(model, path: str | Path, name: str = "default"):
    """Load the adapter saved in ``path`` into ``model`` under ``name``."""
    model.load_lora_adapter(str(path), weight_name=ADAPTER_WEIGHTS, prefix=None, adapter_name=name)
    return model


def fold(model):
    """``model`` with its active adapters added into the base weights and removed: a plain model again
    (a model without an adapter comes back as it is)."""
    if has_adapter(model):
        model.fuse_lora()
        model.unload_lora()
    return model


def adapter_base(path: str | Path) -> tuple[Path, bool]:
    """The base directory an adapter directory was trained on, and whether that base carried projections."""
    info = _info(Path(path))
    return Path(info["base"]), bool(info["channel_projection"])


def folded(base, path: str | Path, what: str):
    """``base`` (as :func:`adapter_base` names it) with the adapter saved in ``path`` folded in: a plain model."""
    try:
        load_into(base, path)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise ModelLoadError(
            f"{what}: adapter '{Path(path) / ADAPTER_WEIGHTS}' does not fit its base ({exc}); "
            "re-run the stage that wrote it (dvc repro)"
        ) from exc
    return fold(base).eval()


def dense_deltas(model, name: str = "default") -> dict[str, torch.Tensor]:
    """Each wrapped weight's update ``scale * B A`` as a dense tensor, keyed by the plain model's tensor name."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for module_name, module in model.named_modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            out[f"{module_name}.weight"] = module.get_delta_weight(name).detach().float()
    return out


def peft_merge(model, adapter_dirs: Sequence[str | Path], weights: Sequence[float], combination: str,
               density: float | None = None):
    """Merge saved adapters into ``model`` (their base) with PEFT's ``add_weighted_adapter``, then fold.

    ``combination`` is PEFT's ``combination_type`` (cat, linear, svd, ties,
    dare_linear, ...), ``density`` the share ties and dare keep. Every adapter must have been trained with the same
    ``finetune.lora`` (read from its dtm_info.json). Returns the plain model.
    """
    peft = _peft()
    from safetensors.torch import load_file

    configs = [lora_config(LoraParams(**_info(Path(p))["lora"])) for p in adapter_dirs]
    names = [f"range{i}" for i in range(len(adapter_dirs))]
    tuner = peft.LoraModel(model, configs[0], names[0])
    for name, config, path in zip(names, configs, adapter_dirs):
        if name != names[0]:
            tuner.peft_config[name] = config
            tuner.inject_adapter(model, name)
        peft.set_peft_model_state_dict(model, load_file(str(Path(path) / ADAPTER_WEIGHTS)), adapter_name=name)
    pruned = combination in ("ties", "dare_linear")
    tuner.add_weighted_adapter(names, list(weights), "merged", combination_type=combination,
                               density=density if pruned else None)
    tuner.set_adapter("merged")
    return tuner.merge_and_unload(adapter_names=["merged"]).eval()
