"""The prompt-conditioned UNet: prompts, their encoder, guidance, saving, projections, LoRA, training."""

import pytest
import torch

from dtm_core import adapters
from dtm_core.conditioning import EMPTY, PromptEncoder, class_prompts, guided_eps, tokenize
from dtm_core.config import FinetuneConfig, LoraParams, ModelConfig
from dtm_core.data import FASHION_CLASSES
from dtm_core.model import (
    PromptUNet2DModel,
    build_prompt_unet,
    build_scheduler,
    load_unet,
    save_model,
    with_projection,
)
from dtm_core.train import train

DIGITS = class_prompts([str(d) for d in range(10)])


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = build_prompt_unet(ModelConfig(), sample_size=8, channels=1, prompts=DIGITS, cross_attention_dim=32)
    with torch.no_grad():  # a trained-looking model: prompts that matter (a fresh one starts near zero there)
        for name, p in model.named_parameters():
            if "attn2.to_out" in name or "prompt_encoder" in name:
                p.normal_(0, 0.1)
    return model.eval()


def _xt(n=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g), torch.tensor([3, 100, 500, 999][:n])


def test_prompts_come_from_the_class_names_through_one_template():
    assert DIGITS[7] == "a handwritten seven" and len(DIGITS) == 10
    assert class_prompts(FASHION_CLASSES)[5] == "a photo of a sandal"
    vocab, ids = tokenize(["a photo of a bag", "a photo of a ankle boot"])
    assert vocab[0] == "<pad>" and len({len(i) for i in ids}) == 1 and ids[0][-1] == 0


def test_the_encoder_embeds_each_prompt_and_the_empty_one_differently():
    enc = PromptEncoder(DIGITS, dim=16)
    out = enc(torch.tensor([0, 7, EMPTY]))
    assert out.shape == (3, 3, 16)
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[1], out[2])
    with pytest.raises(ValueError, match="-1..9"):
        enc(torch.tensor([10]))


def test_the_model_has_stable_diffusions_attention_layers(unet):
    names = {n for n, _ in unet.named_modules()}
    for layer in ("attn1.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"):
        assert any(n.endswith(layer) for n in names), layer


def test_guidance_scale_one_is_the_conditional_prediction_and_zero_the_unconditional(unet):
    x, t = _xt()
    labels = torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        cond = unet(x, t, class_labels=labels).sample
        uncond = unet(x, t).sample  # no labels: the empty prompt
        assert torch.equal(uncond, unet(x, t, class_labels=torch.full((4,), EMPTY)).sample)
        assert not torch.allclose(cond, uncond, atol=1e-4)  # the prompt matters
        assert torch.allclose(guided_eps(unet, x, t, labels, 1.0), cond, atol=1e-6)
        assert torch.allclose(guided_eps(unet, x, t, labels, 0.0), uncond, atol=1e-5)
        assert torch.allclose(guided_eps(unet, x, t, labels, 4.0), uncond + 4.0 * (cond - uncond), atol=1e-4)


def test_it_saves_loads_and_takes_projections_like_the_unconditional_unet(unet, tmp_path):
    x, t = _xt()
    labels = torch.tensor([1, 2, EMPTY, 5])
    save_model(unet, build_scheduler(ModelConfig()), tmp_path / "m")
    loaded = load_unet(tmp_path / "m")
    projected = with_projection(unet, enabled=True).eval()
    assert isinstance(loaded, PromptUNet2DModel) and isinstance(projected, PromptUNet2DModel)
    assert sum("channel_projection" in n for n, _ in projected.named_parameters()) == 5
    with torch.no_grad():
        expected = unet(x, t, class_labels=labels).sample
        assert torch.equal(loaded(x, t, class_labels=labels).sample, expected)
        assert torch.allclose(projected(x, t, class_labels=labels).sample, expected, atol=1e-6)  # identity at init


def test_a_stable_diffusion_lora_on_its_attention_is_its_dense_delta(unet):
    targets = LoraParams(rank=2, alpha=2.0, targets=["to_q", "to_k", "to_v", "to_out.0"])
    model = adapters.attach(with_projection(unet, enabled=False), targets)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    deltas = adapters.dense_deltas(model)
    assert deltas and all(".attn1." in k or ".attn2." in k for k in deltas)
    before = {k: v.clone() for k, v in with_projection(unet, enabled=False).state_dict().items()}
    folded = adapters.fold(model).state_dict()
    for k, d in deltas.items():
        assert torch.allclose(folded[k] - before[k], d, atol=1e-6), k


def test_training_with_labels_and_prompt_dropout_learns_both_branches(unet):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(64, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.randint(0, 10, (64,), generator=g)
    cfg = FinetuneConfig(steps=4, batch_size=16, lr=1e-3, checkpoint_every=0, log_every=1)
    start = {k: v.clone() for k, v in unet.state_dict().items()}
    res = train(with_projection(unet, enabled=False), build_scheduler(ModelConfig()), images, cfg, seed=0,
                labels=labels, prompt_dropout=0.5)
    again = train(with_projection(unet, enabled=False), build_scheduler(ModelConfig()), images, cfg, seed=0,
                  labels=labels, prompt_dropout=0.5)
    after = res.model.state_dict()
    # the prompt pathway trained: cross-attention keys and the prompt embedding moved
    assert any(not torch.equal(after[k], start[k]) for k in after if "attn2.to_k" in k)
    assert not torch.equal(after["prompt_encoder.embed.weight"], start["prompt_encoder.embed.weight"])
    assert all(torch.equal(after[k], v) for k, v in again.model.state_dict().items())  # seeded: reproducible


def test_sampling_and_the_held_out_loss_prompt_each_row_with_its_own_label(unet):
    from dtm_core.denoising import denoising_losses
    from dtm_core.sampling import initial_noise, sample

    scheduler = build_scheduler(ModelConfig())
    noise = initial_noise(0, 6, (1, 8, 8))
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    plain = sample([unet], scheduler, noise, 4, sampler="dpmsolver", batch_size=3)
    at_zero = sample([unet], scheduler, noise, 4, sampler="dpmsolver", batch_size=3, labels=labels, guidance_scale=0.0)
    guided = sample([unet], scheduler, noise, 4, sampler="dpmsolver", batch_size=3, labels=labels, guidance_scale=4.0)
    assert abs(at_zero - plain).max() < 1e-4  # scale 0: the unconditional model, which unprompted calls get
    assert abs(guided - plain).max() > 1e-3
    images = noise.numpy().clip(-1, 1)
    grid = torch.tensor([10, 500]).numpy()
    unprompted = denoising_losses([unet], scheduler, images, grid, seed=0)
    empty = denoising_losses([unet], scheduler, images, grid, seed=0, labels=torch.full((6,), EMPTY))
    prompted = denoising_losses([unet], scheduler, images, grid, seed=0, labels=labels)
    assert (abs(empty - unprompted) < 1e-9).all() and abs(prompted - unprompted).max() > 1e-6


def test_a_prompted_model_exports_as_a_pipeline_that_samples_from_a_prompt(unet, tmp_path):
    from dtm_core.export import PromptPipeline, export_pipeline
    from dtm_core.sampling import initial_noise, sample

    scheduler = build_scheduler(ModelConfig())
    save_model(unet, scheduler, tmp_path / "model")
    info = export_pipeline(tmp_path / "model", tmp_path / "exported", steps=4)
    assert info["pipeline"] == "PromptPipeline"
    pipe = PromptPipeline.from_pretrained(tmp_path / "exported")
    assert pipe.prompts == DIGITS
    noise = initial_noise(3, 2, (1, 8, 8))
    got = pipe(["a handwritten seven", ""], guidance_scale=4.0, num_inference_steps=4, noise=noise,
               output_type="pt").images
    want = sample([unet], scheduler, noise, 4, sampler="dpmsolver", labels=torch.tensor([7, EMPTY]),
                  guidance_scale=4.0)
    assert torch.allclose(got, torch.as_tensor(want), atol=1e-5)  # what the evaluation samples
    assert len(pipe("a handwritten two", num_inference_steps=2).images) == 1  # PIL images by default
    with pytest.raises(ValueError, match="a handwritten seven"):
        pipe("a photo of a cat", num_inference_steps=2)
