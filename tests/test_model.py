import copy

import pytest
import torch
from diffusers import UNet2DModel

from dtm_core.config import ModelConfig
from dtm_core.model import (
    DeMeUNet2DModel,
    ModelLoadError,
    build_scheduler,
    build_unet,
    has_projection,
    load_scheduler,
    load_unet,
    save_model,
    with_projection,
)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet(ModelConfig(), sample_size=8, channels=1).eval()


@pytest.fixture
def xt():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 1000, (6,), generator=g)


def test_projection_is_exact_identity_at_init(unet, xt):
    x, t = xt
    proj = with_projection(unet, enabled=True).eval()
    with torch.no_grad():
        assert torch.equal(unet(x, t).sample, proj(x, t).sample)
    names = [n for n, _ in proj.named_parameters() if "channel_projection" in n]
    # after both down blocks, the mid block and both up blocks
    assert len(names) == 5
    for n, p in proj.named_parameters():
        if "channel_projection" in n:
            c = p.shape[0]
            assert p.shape == (c, c, 1, 1)
            assert torch.equal(p[:, :, 0, 0], torch.eye(c))


def test_projection_changes_output_when_trained(unet, xt):
    x, t = xt
    proj = with_projection(unet, enabled=True).eval()
    with torch.no_grad():
        proj.mid_block.channel_projection.weight.mul_(1.5)
        assert not torch.allclose(unet(x, t).sample, proj(x, t).sample)


def test_projection_adds_one_c_by_c_map_per_block_one_to_three_percent(unet):
    proj = with_projection(unet, enabled=True)
    n0 = sum(p.numel() for p in unet.parameters())
    n1 = sum(p.numel() for p in proj.parameters())
    # down blocks 32, 64; mid 64; up blocks 64, 32 output channels: one bias-free C x C map each
    assert n1 - n0 == 32**2 + 64**2 + 64**2 + 64**2 + 32**2
    assert 0.01 <= (n1 - n0) / n0 <= 0.03


def test_deepcopy_keeps_its_own_projection(unet, xt):
    x, t = xt
    a = with_projection(unet, enabled=True).eval()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.up_blocks[0].channel_projection.weight.zero_()
        assert torch.equal(a(x, t).sample, unet(x, t).sample)
        assert not torch.equal(b(x, t).sample, unet(x, t).sample)


def test_save_load_roundtrip_projection(tmp_path, unet, xt):
    x, t = xt
    model = with_projection(unet, enabled=True).eval()
    with torch.no_grad():
        model.down_blocks[1].channel_projection.weight.mul_(0.9)
    save_model(model, build_scheduler(ModelConfig()), tmp_path / "m")
    loaded = load_unet(tmp_path / "m")
    assert isinstance(loaded, DeMeUNet2DModel) and has_projection(loaded)
    with torch.no_grad():
        assert torch.equal(model(x, t).sample, loaded(x, t).sample)
    # diffusers' own from_pretrained restores the class and its config too
    again = DeMeUNet2DModel.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(model(x, t).sample, again(x, t).sample)
    assert load_scheduler(tmp_path / "m").config.num_train_timesteps == 1000


def test_plain_model_loads_with_stock_unet2dmodel(tmp_path, unet, xt):
    x, t = xt
    save_model(with_projection(unet, enabled=False), build_scheduler(ModelConfig()), tmp_path / "p")
    stock = UNet2DModel.from_pretrained(tmp_path / "p").eval()
    assert type(stock) is UNet2DModel
    with torch.no_grad():
        assert torch.equal(stock(x, t).sample, unet(x, t).sample)
    assert not list(tmp_path.glob(".p.tmp-*"))


def test_load_missing_dir(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist: run dvc repro"):
        load_unet(tmp_path / "absent")


def test_missing_user_checkpoint_gets_no_pipeline_advice(tmp_path):
    with pytest.raises(ModelLoadError) as exc:
        load_unet(tmp_path / "absent", what="model.pretrained_path", user_supplied=True)
    assert "model.pretrained_path" in str(exc.value) and "dvc repro" not in str(exc.value)


def test_hub_id_is_recognised_with_how_to_download(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as exc:
        load_unet("google/ddpm-cifar10-32", what="model.pretrained_path", user_supplied=True)
    msg = str(exc.value)
    assert "Hugging Face Hub id" in msg and "DiffusionPipeline.from_pretrained('google/ddpm-cifar10-32')" in msg
    assert "set model.pretrained_path" in msg


def test_corrupt_user_checkpoint_is_never_told_to_delete_and_rerun(tmp_path, unet):
    save_model(unet, build_scheduler(ModelConfig()), tmp_path / "m")
    f = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ModelLoadError) as exc:
        load_unet(tmp_path / "m", what="model.pretrained_path", user_supplied=True)
    assert "re-export or re-download the checkpoint" in str(exc.value)
    assert "Delete" not in str(exc.value) and "dvc repro" not in str(exc.value)


def test_load_not_a_diffusers_dir(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "weights.bin").write_bytes(b"123")
    with pytest.raises(ModelLoadError, match="not a diffusers UNet2DModel directory"):
        load_unet(tmp_path / "x")


def test_load_corrupt_weights(tmp_path, unet):
    save_model(unet, build_scheduler(ModelConfig()), tmp_path / "m")
    f = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_unet(tmp_path / "m")


def test_load_missing_weight_file(tmp_path, unet):
    save_model(unet, build_scheduler(ModelConfig()), tmp_path / "m")
    (tmp_path / "m" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="weight file .* is missing"):
        load_unet(tmp_path / "m")


def test_load_weights_not_matching_config(tmp_path, unet):
    save_model(unet, build_scheduler(ModelConfig()), tmp_path / "a")
    other = build_unet(ModelConfig(block_out_channels=[16, 32]), 8, 1)
    save_model(other, build_scheduler(ModelConfig()), tmp_path / "b")
    (tmp_path / "a" / "diffusion_pytorch_model.safetensors").write_bytes(
        (tmp_path / "b" / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    with pytest.raises(ModelLoadError, match="does not match its config"):
        load_unet(tmp_path / "a")


def test_save_failure_leaves_no_partial_dir(tmp_path, unet, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(unet), "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        save_model(unet, build_scheduler(ModelConfig()), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []
