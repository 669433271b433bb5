import json

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline, DiffusionPipeline, DPMSolverMultistepScheduler, UNet2DModel

import dtm_core.model  # noqa: F401  (diffusers loads DeMeUNet2DModel from an imported module)
from dtm_core.config import ModelConfig
from dtm_core.export import export_pipeline, foldable_blocks, main
from dtm_core.model import DeMeUNet2DModel, build_scheduler, build_unet, save_model, with_projection

CFG = ModelConfig(block_out_channels=[16, 32])


@pytest.fixture
def merged_like(tmp_path):
    """A DeMe model whose projections are no longer the identity, saved as the pipeline saves models."""
    torch.manual_seed(0)
    model = with_projection(build_unet(CFG, 8, 1), True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "channel_projection" in name:
                p.add_(0.05 * torch.randn_like(p))
    save_model(model, build_scheduler(CFG), tmp_path / "merged")
    return model.eval(), tmp_path / "merged"


def test_export_writes_the_evaluations_sampler_and_it_samples_as_the_pipeline_does(merged_like, tmp_path):
    from dtm_core.model import load_scheduler
    from dtm_core.sampling import initial_noise, sample

    model, path = merged_like
    info = export_pipeline(path, tmp_path / "out")
    assert (info["pipeline"], info["sampler"], info["num_inference_steps"]) == ("DDPMPipeline", "dpmsolver", 20)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out")
    assert isinstance(pipe, DDPMPipeline) and isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    # the exported pipeline draws what the evaluation draws from the same noise
    noise = initial_noise(3, 2, (1, 8, 8))
    ours = sample([model], load_scheduler(path), noise, 4, sampler="dpmsolver", batch_size=2)
    with torch.no_grad():
        pipe.scheduler.set_timesteps(4)
        x = noise.clone()
        for t in pipe.scheduler.timesteps:
            x = pipe.scheduler.step(pipe.unet(x, t).sample, t, x).prev_sample
    np.testing.assert_allclose(x.clamp(-1, 1).numpy(), ours, atol=1e-4)


def test_ddim_export_loads_in_diffusers_and_samples(merged_like, tmp_path):
    model, path = merged_like
    info = export_pipeline(path, tmp_path / "out", sampler="ddim")
    assert info["unet_class"] == "DeMeUNet2DModel"
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["_class_name"] == "DDIMPipeline" and index["unet"] == ["dtm_core.model", "DeMeUNet2DModel"]
    for loader in (DDIMPipeline, DiffusionPipeline):
        pipe = loader.from_pretrained(tmp_path / "out")
        assert isinstance(pipe.unet, DeMeUNet2DModel)
        x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 500, 900])
        with torch.no_grad():
            torch.testing.assert_close(pipe.unet(x, t).sample, model(x, t).sample)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def test_stock_export_folds_the_upsampler_projections_exactly(tmp_path):
    torch.manual_seed(1)
    model = with_projection(build_unet(CFG, 8, 1), True)
    assert foldable_blocks(model) == ["up_blocks.0"]
    with torch.no_grad():  # only the foldable projection moves away from the identity
        model.up_blocks[0].channel_projection.weight.add_(0.1 * torch.randn_like(
            model.up_blocks[0].channel_projection.weight))
    save_model(model, build_scheduler(CFG), tmp_path / "m")
    info = export_pipeline(tmp_path / "m", tmp_path / "stock", stock=True)
    assert info["folded"] == ["up_blocks.0"] and info["max_abs_output_error"] < 1e-5
    assert all(d["distance_from_identity"] == 0.0 for d in info["dropped"])
    unet = UNet2DModel.from_pretrained(tmp_path / "stock" / "unet")
    assert type(unet) is UNet2DModel


def test_stock_export_reports_what_it_could_not_fold(merged_like, tmp_path, capsys):
    _, path = merged_like
    assert main([str(path), str(tmp_path / "stock"), "--stock"]) == 0
    info = json.loads((tmp_path / "stock" / "dtm_export.json").read_text())
    assert {d["block"] for d in info["dropped"]} == {"down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.1"}
    assert info["max_abs_output_error"] > 1e-4  # dropping trained projections changes the output: said, not hidden
    assert main([str(tmp_path / "absent"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
