import copy

import torch

from dtm_core.config import ModelConfig
from dtm_core.data import load_digits_source
from dtm_core.merge import block_of, merge_files
from dtm_core.merge_distill import distill_weights
from dtm_core.model import build_scheduler, build_unet, float_state
from dtm_core.task_vector import TaskVector

CFG = ModelConfig(block_out_channels=[16, 32])


def _models():
    torch.manual_seed(0)
    base = build_unet(CFG, 8, 1).eval()
    expert = copy.deepcopy(base)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return base, expert


def test_block_of_groups_tensors_by_top_level_block():
    assert block_of("down_blocks.1.resnets.0.conv1.weight") == "down_blocks.1"
    assert block_of("mid_block.resnets.0.norm1.bias") == "mid_block"
    assert block_of("conv_in.weight") == "conv_in"


def test_distillation_recovers_the_weights_that_reproduce_the_experts():
    """Both ranges' experts are theta + tau: the merged model matches them where w_1 + w_2 = 1."""
    base, expert = _models()
    tau = TaskVector.from_states(float_state(base), float_state(expert)).vector
    images = load_digits_source().images[:128]
    res = distill_weights(base, float_state(base), [tau, tau], [expert, expert], build_scheduler(CFG), images,
                          [(0, 500), (500, 1000)], start=[0.0, 0.0], steps=150, lr=0.05, batch_size=32, seed=1)
    assert abs(sum(res["weights"]) - 1.0) < 0.1
    assert res["losses"][-1] < 0.1 * res["losses"][0]


def test_per_block_weights_are_learned_and_merge_files_applies_them(tmp_path):
    base, expert = _models()
    tau = TaskVector.from_states(float_state(base), float_state(expert)).vector
    images = load_digits_source().images[:64]
    res = distill_weights(base, float_state(base), [tau, tau], [expert, expert], build_scheduler(CFG), images,
                          [(0, 500), (500, 1000)], start=[0.5, 0.5], steps=5, batch_size=16, per_block=True, seed=1)
    blocks = res["block_weights"]
    assert {"conv_in", "mid_block", "down_blocks.0", "up_blocks.1"} <= set(blocks)
    assert all(len(v) == 2 for v in blocks.values())
    TaskVector(tau).save(tmp_path / "a.safetensors")
    TaskVector(tau).save(tmp_path / "b.safetensors")
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    zeroed = {b: [0.0, 0.0] for b in blocks}
    zeroed["conv_in"] = [1.0, 0.0]
    merged = merge_files(float_state(base), files, [0.5, 0.5], block_weights=zeroed)
    torch.testing.assert_close(merged["conv_in.weight"], float_state(expert)["conv_in.weight"])
    torch.testing.assert_close(merged["mid_block.resnets.0.conv1.weight"],
                               float_state(base)["mid_block.resnets.0.conv1.weight"])
