"""Export any model the pipeline made as a diffusers pipeline directory.

    python -m dtm_core.export models/merged exported/merged            # the evaluation's sampler (DPM-Solver++)
    python -m dtm_core.export models/merged exported/merged --sampler ddim   # a DDIMPipeline instead
    python -m dtm_core.export models/merged exported/merged-stock --stock

The output is a standard diffusers pipeline directory (model_index.json,
unet/, scheduler/): by default a ``DDPMPipeline`` holding the evaluation's
scheduler (DPM-Solver++ of order 2 over the whole of [0, T)), so
``pipe(num_inference_steps=20)`` draws what every reported FD measured;
``--sampler ddim`` writes a ``DDIMPipeline``. A prompt-conditioned model
exports as a :class:`PromptPipeline`. A model with channel projections keeps
them as a :class:`~dtm_core.model.DeMeUNet2DModel`, which
``DiffusionPipeline.from_pretrained`` loads once ``dtm_core.model`` is imported.

``--stock`` writes a stock ``UNet2DModel`` instead. A projection folds exactly
into a convolution only where that convolution's output is the block's output
and nothing reads it before the projection: the upsampler of an up block.
After a down block the tensor is also kept (unprojected) as a skip connection,
and the mid block and last up block end in a residual sum and a GroupNorm, so
those projections are dropped, and the largest change of the UNet's output on
random inputs is reported (``dtm_export.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch
from diffusers import DDIMPipeline, DDPMPipeline, DiffusionPipeline, ImagePipelineOutput, UNet2DModel

from .conditioning import EMPTY, guided_eps
from .errors import DtmError, ModelLoadError
from .io import atomic_dir
from .model import PROJECTION_ATTR, PromptUNet2DModel, has_projection, load_scheduler, load_unet
from .sampling import SAMPLERS, sampling_scheduler


def foldable_blocks(unet: UNet2DModel) -> list[str]:
    """The blocks whose projection folds exactly into their upsampler's convolution."""
    return [f"up_blocks.{i}" for i, b in enumerate(unet.up_blocks)
            if getattr(b, "upsamplers", None) and getattr(b.upsamplers[0], "conv", None) is not None]


def to_stock(unet: UNet2DModel, probes: int = 8, seed: int = 0) -> tuple[UNet2DModel, dict]:
    """A stock UNet2DModel: foldable projections folded into their convolutions, the others dropped."""
    config = {k: v for k, v in unet.config.items() if not k.startswith("_") and k != PROJECTION_ATTR}
    stock = UNet2DModel.from_config(config)
    state = {k: v for k, v in unet.state_dict().items() if f".{PROJECTION_ATTR}." not in k}
    stock.load_state_dict(state)
    folded = foldable_blocks(unet)
    with torch.no_grad():
        for name in folded:
            block = unet.get_submodule(name)
            P = getattr(block, PROJECTION_ATTR).weight[:, :, 0, 0]  # (C_out, C_in) of the 1x1 map
            conv = stock.get_submodule(name).upsamplers[0].conv
            conv.weight.copy_(torch.einsum("oc,cikl->oikl", P, conv.weight))
            if conv.bias is not None:
                conv.bias.copy_(P @ conv.bias)
    dropped = []
    for name, module in unet.named_modules():
        proj = getattr(module, PROJECTION_ATTR, None)
        if isinstance(proj, torch.nn.Conv2d) and name not in folded:
            eye = torch.eye(proj.weight.shape[0])
            dropped.append({"block": name, "distance_from_identity": float((proj.weight[:, :, 0, 0] - eye).norm())})
    g = torch.Generator().manual_seed(seed)
    size, ch = unet.config.sample_size, unet.config.in_channels
    x = torch.randn(probes, ch, size, size, generator=g)
    t = torch.randint(0, 1000, (probes,), generator=g)
    with torch.no_grad():
        err = float((unet.eval()(x, t).sample - stock.eval()(x, t).sample).abs().max())
    return stock.eval(), {"folded": folded, "dropped": dropped, "max_abs_output_error": err}


class PromptPipeline(DiffusionPipeline):
    """Samples a prompt-conditioned model (:class:`~dtm_core.model.PromptUNet2DModel`) from its prompts.

    ``pipe("a photo of a sandal", guidance_scale=4.0)``: a prompt is one of
    the model's class prompts (``pipe.prompts``), or "" for the empty one;
    classifier-free guidance as in the evaluation. Its text encoder and
    vocabulary live in the UNet (``unet.prompt_encoder``, ``unet.config.prompts``).
    """

    def __init__(self, unet: PromptUNet2DModel, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def prompts(self) -> list[str]:
        return list(self.unet.config.prompts)

    @torch.no_grad()
    def __call__(self, prompt, guidance_scale: float = 2.0, num_inference_steps: int = 20,
                 generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None,
                 output_type: str = "pil", return_dict: bool = True):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        unknown = [p for p in prompts if p and p not in self.prompts]
        if unknown:
            raise ValueError(f"prompts {unknown} are not this model's; it knows: {self.prompts} (or '' for none)")
        labels = torch.tensor([self.prompts.index(p) if p else EMPTY for p in prompts])
        cfg = self.unet.config
        if noise is None:
            noise = torch.randn((len(prompts), cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=generator)
        x = noise.to(self.device)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            eps = guided_eps(self.unet, x, t.to(self.device), labels.to(self.device), guidance_scale)
            x = self.scheduler.step(eps, t, x).prev_sample
        images = x.clamp(-1, 1).cpu()
        if output_type != "pt":
            images = (images / 2 + 0.5).permute(0, 2, 3, 1).numpy()
            images = self.numpy_to_pil(images) if output_type == "pil" else images
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def export_pipeline(model_dir: str | Path, out_dir: str | Path, stock: bool = False, sampler: str = "dpmsolver",
                    steps: int = 20) -> dict:
    """Write a pipeline directory for ``model_dir`` sampling with ``sampler``; what was done, as a dict (also
    dtm_export.json, which names the ``steps`` the pipeline's FDs were measured at)."""
    unet = load_unet(model_dir, what="model to export")
    scheduler = sampling_scheduler(load_scheduler(model_dir), steps, sampler)
    pipeline = PromptPipeline if isinstance(unet, PromptUNet2DModel) else DDIMPipeline if sampler == "ddim" \
        else DDPMPipeline
    if stock and pipeline is PromptPipeline:
        raise ModelLoadError(f"'{model_dir}' is prompt-conditioned: there is no stock diffusers UNet to export it as")
    info = {"source": str(model_dir), "unet_class": type(unet).__name__, "stock": False,
            "pipeline": pipeline.__name__, "sampler": sampler, "num_inference_steps": steps}
    if stock and has_projection(unet):
        unet, folding = to_stock(unet)
        info.update({"stock": True, "unet_class": "UNet2DModel", **folding})
    pipe = pipeline(unet=unet, scheduler=scheduler)
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "dtm_export.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dtm_core.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--stock", action="store_true", help="a stock UNet2DModel: fold what folds, drop the rest")
    ap.add_argument("--sampler", choices=SAMPLERS, default="dpmsolver",
                    help="the pipeline's scheduler (default: the evaluation's, DPM-Solver++)")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps the export records (default: 20)")
    args = ap.parse_args(argv)
    try:
        info = export_pipeline(args.model_dir, args.out_dir, stock=args.stock, sampler=args.sampler, steps=args.steps)
    except DtmError as exc:
        print(f"error: export: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    if info["pipeline"] == "PromptPipeline":
        print(f"load it with: from dtm_core.export import PromptPipeline; pipe = PromptPipeline.from_pretrained("
              f"'{args.out_dir}'); pipe('<one of pipe.prompts>', guidance_scale=2.0, num_inference_steps={args.steps})")
    elif info["unet_class"] == "DeMeUNet2DModel":
        print(f"load it with: import dtm_core.model; from diffusers import DiffusionPipeline; "
              f"DiffusionPipeline.from_pretrained('{args.out_dir}')(num_inference_steps={args.steps})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
