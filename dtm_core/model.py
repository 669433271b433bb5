"""UNet factory, channel-wise projection, and loading/saving in diffusers' layout.

Models on disk are diffusers ``save_pretrained`` directories (config.json +
diffusion_pytorch_model.safetensors) with the noise schedule beside them in
scheduler_config.json. A model without projection layers is a stock
``UNet2DModel``; one with them is a :class:`DeMeUNet2DModel`, a UNet2DModel
subclass whose config carries ``channel_projection: true``.

The channel-wise projection (DeMe, Sec. 3) is a learnable C x C map
``P(F) = W F`` (a bias-free 1x1 convolution initialised to the identity)
applied to the output of every down block, the mid block and every up block.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from diffusers import DDPMScheduler, ModelMixin, UNet2DConditionModel, UNet2DModel
from diffusers.loaders import PeftAdapterMixin
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import adapters
from .conditioning import EMPTY, PromptEncoder
from .config import ModelConfig
from .errors import ModelLoadError
from .io import atomic_dir

# A pipeline exported with a DeMeUNet2DModel names this module in model_index.json;
# diffusers then looks up the component's base class (ModelMixin) here to find
# its loading method, so the name must resolve in this module.
__all__ = ["DeMeUNet2DModel", "PromptUNet2DModel", "ModelMixin"]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PROJECTION_ATTR = "channel_projection"


def compute_layout(model: torch.nn.Module) -> torch.nn.Module:
    """Hold ``model``'s 4-d weights channels-last: 17-27% faster convolutions on CPU
    (docs/results/conv_layout.json), other rounding. Such state dicts are not contiguous and safetensors
    refuses them, so a model goes back to :func:`storage_layout` before it is saved (``save_model`` does so)."""
    return model.to(memory_format=torch.channels_last)


def storage_layout(model: torch.nn.Module) -> torch.nn.Module:
    """The plain contiguous layout models are saved, merged and differenced in."""
    return model.to(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def computing(models) -> Iterator[None]:
    """``models`` in :func:`compute_layout` inside the block, back in :func:`storage_layout` after (a copy of
    each weight both ways: exact, and cheap next to one batch)."""
    for m in models:
        compute_layout(m)
    try:
        yield
    finally:
        for m in models:
            storage_layout(m)


def _identity_projection(channels: int) -> torch.nn.Conv2d:
    conv = torch.nn.Conv2d(channels, channels, kernel_size=1, bias=False)
    torch.nn.init.dirac_(conv.weight)
    return conv


def _project_tuple_output(module, args, output):
    # Down blocks return (hidden_states, skip_states); the projection acts on
    # the hidden states passed to the next block. The skips stay as the block
    # made them, so the up block across sees its last skip unprojected: the
    # paper places P "after the output of every down block" and does not name
    # the skips; this reading projects the path through the UNet's depth only.
    hidden, skips = output
    return (getattr(module, PROJECTION_ATTR)(hidden), skips)


def _project_tensor_output(module, args, output):
    return getattr(module, PROJECTION_ATTR)(output)


class DeMeUNet2DModel(PeftAdapterMixin, UNet2DModel):
    """UNet2DModel with optional identity-initialised channel-wise projections, and LoRA adapters.

    ``PeftAdapterMixin`` gives it diffusers' adapter methods (``add_adapter``,
    ``save_lora_adapter``, ``fuse_lora``), as UNet2DConditionModel has them.

    The constructor takes exactly UNet2DModel's arguments plus
    ``channel_projection``; the signature is published to diffusers (below)
    so ``from_pretrained``/``from_config`` restore the full configuration.
    """

    def __init__(self, *args, channel_projection: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_to_config(channel_projection=channel_projection)
        if channel_projection:
            _attach_projections(self)


def _attach_projections(unet) -> None:
    """An identity projection after every down block, the mid block and every up block of ``unet``."""
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        setattr(block, PROJECTION_ATTR, _identity_projection(_block_out_channels(block)))
        # Hooks are module-level functions that find the projection on the block
        # they fire for, so deep copies stay self-contained.
        block.register_forward_hook(_project_tuple_output if block in unet.down_blocks else _project_tensor_output)


def _block_out_channels(block: torch.nn.Module) -> int:
    resnets = getattr(block, "resnets", None)
    if not resnets:
        raise ModelLoadError(
            f"cannot attach a channel projection to a {type(block).__name__}: it has no resnets to read the "
            "output channels from; set finetune.channel_projection: false for this checkpoint"
        )
    return resnets[-1].out_channels


class PromptUNet2DModel(UNet2DConditionModel):
    """UNet2DConditionModel conditioned on class prompts (:mod:`dtm_core.conditioning`), with optional
    identity-initialised channel projections as :class:`DeMeUNet2DModel` has them.

    Its prompt encoder is a submodule, saved in the same weight file; its
    config carries the prompts. ``forward(x, t, class_labels=labels)`` embeds
    the labels' prompts (-1: the empty prompt); without labels every sample
    gets the empty prompt, the unconditional prediction.
    """

    def __init__(self, *args, prompts: Sequence[str] = (), channel_projection: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_to_config(prompts=list(prompts), channel_projection=channel_projection)
        self.prompt_encoder = PromptEncoder(prompts, self.config.cross_attention_dim)
        if channel_projection:
            _attach_projections(self)

    def forward(self, sample, timestep, encoder_hidden_states=None, class_labels=None, **kwargs):
        if encoder_hidden_states is None:
            labels = class_labels if class_labels is not None else torch.full((sample.shape[0],), EMPTY)
            encoder_hidden_states = self.prompt_encoder(labels).to(sample.dtype)
        return super().forward(sample, timestep, encoder_hidden_states, **kwargs)


def _publish_signature(cls, parent, extra: dict) -> None:
    """diffusers restores a model's configuration from its ``__init__`` signature: add our keyword arguments."""
    sig = inspect.signature(parent.__init__)
    cls.__init__.__signature__ = sig.replace(parameters=[  # type: ignore[attr-defined]
        *sig.parameters.values(),
        *(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default) for name, default in extra.items()),
    ])


_publish_signature(DeMeUNet2DModel, UNet2DModel, {"channel_projection": False})
_publish_signature(PromptUNet2DModel, UNet2DConditionModel, {"prompts": (), "channel_projection": False})


def build_unet(cfg: ModelConfig, sample_size: int, channels: int) -> UNet2DModel:
    n = len(cfg.block_out_channels)
    return UNet2DModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n, norm_num_groups=cfg.norm_num_groups,
    )


def build_prompt_unet(cfg: ModelConfig, sample_size: int, channels: int, prompts: Sequence[str],
                      cross_attention_dim: int = 64, head_dim: int = 8) -> PromptUNet2DModel:
    """The prompt-conditioned UNet of ``cfg``'s shape: cross-attention in every block, as Stable Diffusion's."""
    n = len(cfg.block_out_channels)
    return PromptUNet2DModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        mid_block_type="UNetMidBlock2DCrossAttn", norm_num_groups=cfg.norm_num_groups,
        cross_attention_dim=cross_attention_dim, attention_head_dim=head_dim, prompts=prompts,
    )


def build_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         beta_start=cfg.beta_start, beta_end=cfg.beta_end, prediction_type="epsilon", clip_sample=True)


def with_projection(unet: UNet2DModel, enabled: bool = True) -> UNet2DModel:
    """A copy of ``unet`` as a DeMeUNet2DModel, or a PromptUNet2DModel (identity projections if enabled).

    The output is exactly that of ``unet`` while the projections are the
    identity; every UNet weight is copied.
    """
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    config.pop(PROJECTION_ATTR, None)
    cls = PromptUNet2DModel if isinstance(unet, PromptUNet2DModel) else DeMeUNet2DModel
    model = cls(**config, channel_projection=enabled)
    missing, unexpected = model.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(PROJECTION_ATTR not in k for k in missing):
        raise ValueError(f"weights do not fit the UNet: missing={missing} unexpected={unexpected}")
    return model


def has_projection(unet: UNet2DModel) -> bool:
    return bool(unet.config.get(PROJECTION_ATTR, False))


def save_model(unet: UNet2DModel, scheduler: DDPMScheduler, path: str | Path, extra: Optional[dict] = None) -> None:
    """Save atomically in diffusers' layout, scheduler config beside the UNet.

    A model without projection layers is saved as a stock UNet2DModel, so
    ``UNet2DModel.from_pretrained`` and ``DDPMPipeline`` load it unchanged.
    A model with a LoRA adapter is saved as its adapter alone; ``extra`` must
    then name its ``base`` directory (:mod:`dtm_core.adapters`).
    """
    storage_layout(unet)
    adapter = adapters.has_adapter(unet)
    if adapter and (not extra or "base" not in extra):
        raise ValueError("saving an adapter needs extra['base']: the directory of the model it adapts")
    if isinstance(unet, DeMeUNet2DModel) and not has_projection(unet) and not adapter:
        plain = UNet2DModel.from_config({k: v for k, v in unet.config.items() if k != PROJECTION_ATTR})
        plain.load_state_dict(unet.state_dict())
        unet = plain
    with atomic_dir(path) as tmp:
        if adapter:
            adapters.save_adapter(unet, tmp)
        else:
            unet.save_pretrained(tmp, safe_serialization=True)
        scheduler.save_pretrained(tmp)
        if extra:
            (tmp / "dtm_info.json").write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_hint(path: Path) -> str:
    """Advice for a path that looks like a Hugging Face Hub id (``org/name``) rather than a directory."""
    text = str(path)
    if not HUB_ID.match(text):
        return ""
    local = text.split("/")[-1]
    return (
        f" '{text}' looks like a Hugging Face Hub id, and this pipeline never downloads. On a machine with "
        f"internet access run: python -c \"from diffusers import DiffusionPipeline; "
        f"DiffusionPipeline.from_pretrained('{text}').save_pretrained('{local}')\" "
        f"(or: huggingface-cli download {text} --local-dir {local}), copy the '{local}' directory here and "
        f"set model.pretrained_path to its path."
    )


def _unet_dir(path: Path, what: str, user_supplied: bool) -> Path:
    if (path / "config.json").is_file():
        return path
    if (path / "unet" / "config.json").is_file():
        return path / "unet"
    fix = "point model.pretrained_path at such a directory" if user_supplied else "re-run the stage that writes it"
    raise ModelLoadError(
        f"{what}: '{path}' is not a diffusers UNet2DModel directory: expected config.json and {WEIGHTS_NAME} "
        f"(or a pipeline directory with unet/config.json). Save one with UNet2DModel.save_pretrained(path), "
        f"or {fix}."
    )


def load_unet(path: str | Path, what: str = "model", user_supplied: bool = False) -> UNet2DModel:
    """Load a UNet from a local directory, never from a hub.

    Returns a DeMeUNet2DModel when the config asks for projection layers,
    a stock UNet2DModel otherwise; a pipeline's adapter directory comes back
    as its base with the adapter folded in. Errors name the directory and the fix:
    for a pipeline output (re-run the stage), or, with ``user_supplied``,
    for a checkpoint the user named (fix the path, re-export the checkpoint;
    never "delete it and re-run").
    """
    path = Path(path).expanduser()
    if not path.exists():
        if user_supplied:
            raise ModelLoadError(
                f"{what} '{path}' does not exist: point it at a local diffusers UNet2DModel directory or a "
                f"pipeline directory with unet/.{_hub_hint(path)}"
            )
        raise ModelLoadError(f"{what} directory '{path}' does not exist: run dvc repro to produce it.")
    if not user_supplied and adapters.is_adapter_dir(path):
        base_dir, projection = adapters.adapter_base(path)
        base = with_projection(load_unet(base_dir, what=f"base of {what}"), enabled=projection)
        return adapters.folded(base, path, what)
    unet_dir = _unet_dir(path, what, user_supplied)
    redo = "re-export or re-download the checkpoint" if user_supplied else "re-run the stage that writes it (dvc repro)"
    try:
        config = json.loads((unet_dir / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{what}: '{unet_dir / 'config.json'}' is not valid JSON ({exc}); {redo}.") from exc
    cls_name = config.get("_class_name")
    if cls_name not in ("UNet2DModel", "DeMeUNet2DModel", "PromptUNet2DModel"):
        raise ModelLoadError(
            f"{what}: '{unet_dir}' holds a {cls_name!r}, not a UNet2DModel; DeMe here fine-tunes "
            "unconditional diffusers UNet2DModel checkpoints."
        )
    weights = unet_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelLoadError(
            f"{what}: weight file '{weights}' is missing. Re-save the model with "
            f"save_pretrained(..., safe_serialization=True), or {redo}."
        )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{what}: weight file '{weights}' is corrupt or truncated ({exc}); {redo}.") from exc
    cls = PromptUNet2DModel if cls_name == "PromptUNet2DModel" else \
        DeMeUNet2DModel if config.get(PROJECTION_ATTR) else UNet2DModel
    init = {k: v for k, v in config.items() if not k.startswith("_")}
    if cls is UNet2DModel:
        init.pop(PROJECTION_ATTR, None)
    try:
        model = cls.from_config(init)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ModelLoadError(
            f"{what}: '{weights}' does not match its config.json ({str(exc).splitlines()[0]}); "
            f"the checkpoint is inconsistent: {redo}."
        ) from exc
    return model.eval()


def find_scheduler(path: str | Path) -> Optional[DDPMScheduler]:
    """The noise schedule saved beside a model (or in a pipeline's scheduler/), or None."""
    path = Path(path)
    for candidate in (path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            return DDPMScheduler.from_pretrained(candidate.parent)
    return None


def load_scheduler(path: str | Path) -> DDPMScheduler:
    """The noise schedule of a model this pipeline saved (always stored beside it)."""
    scheduler = find_scheduler(path)
    if scheduler is None:
        raise ModelLoadError(f"no scheduler_config.json next to the model in '{path}': re-run dvc repro")
    return scheduler


def float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """All floating-point tensors of the state dict (integer buffers skipped)."""
    return {k: v.detach() for k, v in model.state_dict().items() if torch.is_floating_point(v)}


def pretrained_like(pretrained_dir: Path, ranged_model: UNet2DModel) -> dict[str, torch.Tensor]:
    """The pretrained weights in a range model's layout (identity projections where it has them)."""
    base = load_unet(pretrained_dir, what="pretrained model")
    if has_projection(ranged_model):
        base = with_projection(base, enabled=True)
    return float_state(base)
