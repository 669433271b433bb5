"""LoRA adapters (finetune.adapter: lora): the dense delta, the saved adapter, training only it, PEFT's merge."""

import json

import pytest
import torch

from dtm_core import adapters
from dtm_core.config import FinetuneConfig, LoraParams, ModelConfig
from dtm_core.errors import ModelLoadError
from dtm_core.model import build_scheduler, build_unet, float_state, load_unet, save_model, with_projection
from dtm_core.task_vector import TaskVector
from dtm_core.train import train

LORA = LoraParams(rank=2, alpha=4.0)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return build_unet(ModelConfig(), sample_size=8, channels=1).eval()


def _trained_adapter(base, seed: int, projection: bool = True):
    """A copy of ``base`` with an adapter whose B is random, as after training (B starts at zero)."""
    model = adapters.attach(with_projection(base, enabled=projection), LORA)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def _save(model, path, base_dir, projection=True):
    save_model(model, build_scheduler(ModelConfig()), path, {
        "base": str(base_dir), "channel_projection": projection,
        "lora": {"rank": LORA.rank, "alpha": LORA.alpha, "targets": LORA.targets}})


def _xt():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 1, 8, 8, generator=g), torch.tensor([0, 10, 500, 999])


def test_an_adapter_starts_as_its_base_and_freezes_every_base_weight(base):
    model = adapters.attach(with_projection(base, enabled=True), LORA).eval()
    x, t = _xt()
    with torch.no_grad():
        assert torch.equal(model(x, t).sample, base(x, t).sample)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    # every target kind is wrapped, the channel projections included
    for target in ("conv1", "conv2", "time_emb_proj", "to_q", "channel_projection"):
        assert any(f".{target}.lora_A." in n for n in trained), target


def test_the_lora_delta_equals_the_dense_weight_difference(base):
    model = _trained_adapter(base, seed=0)
    deltas = adapters.dense_deltas(model)
    # by hand for one convolution: scale * B A, with A's kernel kept
    conv = model.down_blocks[0].resnets[0].conv1
    A, B = conv.lora_A["default"].weight, conv.lora_B["default"].weight
    by_hand = (LORA.alpha / LORA.rank) * torch.einsum("or,rikl->oikl", B[:, :, 0, 0], A)
    assert torch.allclose(deltas["down_blocks.0.resnets.0.conv1.weight"], by_hand, atol=1e-7)
    before = float_state(with_projection(base, enabled=True))
    folded = float_state(adapters.fold(model))
    tau = TaskVector.from_states(before, folded).vector
    changed = {k for k, v in tau.items() if v.abs().max() > 0}
    assert changed == set(deltas)
    for k in deltas:
        assert torch.allclose(tau[k], deltas[k], atol=1e-6), k


def test_a_saved_adapter_holds_only_the_adapter_and_loads_as_the_folded_model(base, tmp_path):
    save_model(base, build_scheduler(ModelConfig()), tmp_path / "base")
    model = _trained_adapter(base, seed=0)
    x, t = _xt()
    with torch.no_grad():
        expected = model(x, t).sample
    _save(model, tmp_path / "range", tmp_path / "base")
    files = sorted(p.name for p in (tmp_path / "range").iterdir())
    assert files == ["dtm_info.json", adapters.ADAPTER_WEIGHTS, "scheduler_config.json"]
    # its size is the adapter's parameters in float32 and a header, nothing of the base
    size = (tmp_path / "range" / adapters.ADAPTER_WEIGHTS).stat().st_size
    assert 0 <= size - 4 * model.num_parameters(only_trainable=True) < 16_384
    full = (tmp_path / "base" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert size < 0.15 * full
    # PEFT's target set is written sorted: equal runs write equal bytes, whatever the process's hash seed
    from safetensors import safe_open

    with safe_open(str(tmp_path / "range" / adapters.ADAPTER_WEIGHTS), "pt") as handle:
        written = json.loads(handle.metadata()["lora_adapter_metadata"])["target_modules"]
    assert written == sorted(LORA.targets)
    loaded = load_unet(tmp_path / "range")
    assert not adapters.has_adapter(loaded)
    with torch.no_grad():
        assert torch.allclose(loaded(x, t).sample, expected, atol=1e-5)


def _with_header(path, metadata: list, targets: list) -> None:
    """Write a small safetensors file whose metadata keys and target list come in the given orders."""
    from safetensors.torch import save_file

    save_file({"b.weight": torch.ones(2, 3), "a.weight": torch.arange(4.0)}, str(path))
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    config = json.dumps({"r": 4, "target_modules": targets}, indent=2, sort_keys=True)
    values = {"format": "pt", "lora_adapter_metadata": config}
    text = json.dumps({"__metadata__": {k: values[k] for k in metadata}, **header}, separators=(",", ":")).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size:])


def test_a_canonical_header_makes_equal_contents_equal_bytes(tmp_path):
    """safetensors' metadata map and PEFT's target set come out in an order that changes between processes."""
    from safetensors.torch import load_file

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _with_header(a, ["format", "lora_adapter_metadata"], ["conv1", "to_q", "conv2"])
    _with_header(b, ["lora_adapter_metadata", "format"], ["to_q", "conv2", "conv1"])
    assert a.read_bytes() != b.read_bytes()
    adapters.canonical_header(a)
    adapters.canonical_header(b)
    assert a.read_bytes() == b.read_bytes()
    loaded = load_file(str(a))
    assert torch.equal(loaded["b.weight"], torch.ones(2, 3)) and torch.equal(loaded["a.weight"], torch.arange(4.0))
    from safetensors import safe_open

    with safe_open(str(a), "pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta["lora_adapter_metadata"])["target_modules"] == ["conv1", "conv2", "to_q"]


def test_an_adapter_without_its_base_says_which_directory_is_missing(base, tmp_path):
    _save(_trained_adapter(base, seed=0), tmp_path / "range", tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="nowhere"):
        load_unet(tmp_path / "range")
    info = json.loads((tmp_path / "range" / "dtm_info.json").read_text())
    del info["base"]
    (tmp_path / "range" / "dtm_info.json").write_text(json.dumps(info))
    with pytest.raises(ModelLoadError, match="dtm_info.json"):
        load_unet(tmp_path / "range")


def test_targets_that_match_nothing_name_the_param(base):
    with pytest.raises(ModelLoadError, match="finetune.lora.targets"):
        adapters.attach(with_projection(base, enabled=False), LoraParams(targets=["no_such_layer"]))


def test_training_an_adapter_changes_only_the_adapter(base):
    model = adapters.attach(with_projection(base, enabled=True), LORA)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    images = torch.randn(64, 1, 8, 8).clamp(-1, 1)
    cfg = FinetuneConfig(steps=3, batch_size=16, lr=1e-2, checkpoint_every=0, log_every=1)
    res = train(model, build_scheduler(ModelConfig()), images, cfg, seed=0)
    after = res.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert any(after[k].abs().max() > 0 for k in after if "lora_B" in k)  # B left zero: it trained


def test_peft_cat_merge_equals_the_dense_merge_and_linear_does_not(base, tmp_path):
    save_model(base, build_scheduler(ModelConfig()), tmp_path / "base")
    dirs, taus = [], []
    before = float_state(with_projection(base, enabled=True))
    for i in range(2):
        model = _trained_adapter(base, seed=10 + i)
        _save(model, tmp_path / f"r{i}", tmp_path / "base")
        dirs.append(tmp_path / f"r{i}")
        taus.append(TaskVector.from_states(before, float_state(load_unet(dirs[-1]))))
    weights = [0.3, 0.7]
    dense = TaskVector({k: weights[0] * taus[0].vector[k] + weights[1] * taus[1].vector[k] for k in taus[0].vector})
    expected = dense.apply_to(before)  # task arithmetic on the dense deltas

    def peft(combination, ws, paths):
        return float_state(adapters.peft_merge(with_projection(base, enabled=True), paths, ws, combination))

    cat = peft("cat", weights, dirs)
    assert max((cat[k] - expected[k]).abs().max().item() for k in expected) < 1e-6
    linear = peft("linear", weights, dirs)
    assert max((linear[k] - expected[k]).abs().max().item() for k in expected) > 1e-5  # cross terms B_i A_j
    one = peft("linear", [1.0], dirs[:1])  # one adapter at weight 1: no cross terms, exact
    single = taus[0].apply_to(before)
    assert max((one[k] - single[k]).abs().max().item() for k in single) < 1e-6
