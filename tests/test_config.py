import math

import pytest

from dtm_core.config import ConfigError, flatten, load_params, parse_params, select
from dtm_core.seeding import derive_seed


def _with(d: dict, section: str, **values) -> dict:
    out = dict(d)
    out[section] = {**(d.get(section) or {}), **values}
    return out


def test_repo_params_parse_and_defaults(default_params_dict):
    p = parse_params(default_params_dict)
    assert p.num_ranges == 4
    assert p.merge_weights == [0.25] * 4
    assert p.finetune.p == 0.3 and p.finetune.consistency_weight == 1.0 and p.finetune.channel_projection


def test_code_defaults_are_params_yaml(default_params_dict):
    # A key left out of a user's params.yaml gets the shipped default, not an older one.
    # Two defaults differ on purpose: the library knows no repository (no base/
    # checkpoint to import, no registry to fill) until params.yaml names one.
    on_purpose = {"model.pretrained_path", "tracking.register_model"}
    shipped = flatten(parse_params(default_params_dict).model_dump())
    defaults = flatten(parse_params({}).model_dump())
    assert {k for k in shipped if shipped[k] != defaults.get(k)} == on_purpose


def test_load_params_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_load_params_bad_yaml(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(f)


@pytest.mark.parametrize(
    "section, values, key",
    [
        ("finetune", {"lrr": 0.1}, "finetune.lrr"),
        ("finetune", {"p": 1.5}, "finetune.p"),
        ("finetune", {"p": -0.1}, "finetune.p"),
        ("finetune", {"steps": 0}, "finetune.steps"),
        ("finetune", {"steps": "many"}, "finetune.steps"),
        ("finetune", {"lr": -1e-4}, "finetune.lr"),
        ("finetune", {"lr": 0}, "finetune.lr"),
        ("finetune", {"batch_size": 0}, "finetune.batch_size"),
        ("finetune", {"consistency_weight": float("nan")}, "finetune.consistency_weight"),
        ("pretrain", {"steps": -5}, "pretrain.steps"),
        ("merge", {"method": "average"}, "merge.method"),
        ("merge", {"weights": [0.5, float("inf"), 0.1, 0.1]}, "merge.weights"),
        ("partition", {"ranges": [1, 2, 3]}, "partition.ranges"),
        ("partition", {"ranges": []}, "partition.ranges"),
        ("data", {"source": "cifar"}, "data.source"),
        ("evaluate", {"num_samples": 10}, "evaluate.num_samples"),
        ("evaluate", {"sampler": "euler"}, "evaluate.sampler"),
        ("evaluate", {"sampler": "dpmsolver", "eta": 0.5}, "evaluate.eta"),
        ("report", {"bootstrap_rounds": 5}, "report.bootstrap_rounds"),
        ("tracking", {"experiment_name": ""}, "tracking.experiment_name"),
        ("finetune", {"adapter": "qlora"}, "finetune.adapter"),
        ("merge", {"peft_combination": "cat"}, "merge.peft_combination"),  # merges adapters; the fine-tunes are full
        ("model", {"conditioning": "text"}, "model.conditioning"),
        ("merge", {"weights": [0.5, float("nan"), 0.1, 0.1]}, "merge.weights"),
    ],
)
def test_bad_values_name_the_key(default_params_dict, section, values, key):
    with pytest.raises(ConfigError) as exc:
        parse_params(_with(default_params_dict, section, **values))
    assert key in str(exc.value)


def test_sampler_choices_are_the_samplers_sampling_knows():
    # config.py cannot import dtm_core.sampling (torch, diffusers) just to validate: the two lists must agree
    import typing

    from dtm_core.config import EvaluateConfig, SearchConfig
    from dtm_core.sampling import SAMPLERS

    for section in (EvaluateConfig, SearchConfig):
        assert set(typing.get_args(section.model_fields["sampler"].annotation)) == set(SAMPLERS)


def test_unknown_top_level_section(default_params_dict):
    with pytest.raises(ConfigError, match="finetuen.*unknown key"):
        parse_params({**default_params_dict, "finetuen": {}})


def test_merge_weights_must_match_n(default_params_dict):
    with pytest.raises(ConfigError, match="merge.weights has 3 values but there are N=4"):
        parse_params(_with(default_params_dict, "merge", weights=[0.3, 0.3, 0.4]))


def test_n_cannot_exceed_T(default_params_dict):
    d = _with(default_params_dict, "model", num_train_timesteps=3)
    with pytest.raises(ConfigError, match="N must not exceed T"):
        parse_params(d)


@pytest.mark.parametrize(
    "boundaries, message",
    [
        ([0, 300, 200, 700, 1000], "strictly increasing"),
        ([0, 250, 250, 750, 1000], "strictly increasing"),
        ([10, 250, 500, 750, 1000], "start at 0"),
        ([0, 250, 500, 750, 900], "end at T=1000"),
        ([0, 500, 1000], "needs N\\+1=5 values"),
    ],
)
def test_explicit_boundaries_validated(default_params_dict, boundaries, message):
    with pytest.raises(ConfigError, match=message):
        parse_params(_with(default_params_dict, "partition", boundaries=boundaries))


def test_imagefolder_requires_folder(default_params_dict):
    with pytest.raises(ConfigError, match="data.image_folder"):
        parse_params(_with(default_params_dict, "data", source="imagefolder", image_size=16))


def test_derive_seed_stable_and_distinct():
    assert derive_seed(0, "finetune-1") == derive_seed(0, "finetune-1")
    seeds = {derive_seed(0, f"finetune-{i}") for i in range(8)} | {derive_seed(1, "finetune-1")}
    assert len(seeds) == 9
    assert all(0 <= s < 2**31 for s in seeds)


def test_the_shared_recipe_is_the_fine_tune_at_its_own_lr(default_params_dict):
    ft = parse_params(default_params_dict).finetune
    assert ft.model_copy(update={"shared_lr": None}).shared.lr == ft.lr
    shared = ft.model_copy(update={"lr": 1e-4, "shared_lr": 3e-4}).shared
    assert shared.lr == 3e-4 and shared.steps == ft.steps and shared.weighting == ft.weighting


def test_flatten_dotted(default_params_dict):
    flat = flatten(parse_params(default_params_dict))
    assert flat["finetune.lr"] == pytest.approx(default_params_dict["finetune"]["lr"])
    assert flat["finetune.shared_lr"] == pytest.approx(default_params_dict["finetune"]["shared_lr"])
    assert flat["evaluate.classifier.feature_dim"] == 64
    assert flat["seed"] == 0
    assert not any(isinstance(v, dict) for v in flat.values())
    assert not math.isnan(flat["finetune.p"])


@pytest.mark.parametrize(
    "values, key",
    [
        ({"density": 0.0}, "merge.density"),
        ({"density": 1.5}, "merge.density"),
        ({"scale": 0.0}, "merge.scale"),
        ({"scale": float("inf")}, "merge.scale"),
        ({"method": "average"}, "merge.method"),
        ({"search": {"values": []}}, "merge.search.values"),
        ({"search": {"values": [0.5, float("nan")]}}, "merge.search.values"),
        ({"search": {"values": [0.5, 0.5]}}, "merge.search.values"),
        ({"search": {"max_evaluations": 0}}, "merge.search.max_evaluations"),
        ({"search": {"num_samples": 1}}, "merge.search.num_samples"),
        ({"search": {"sampling_steps": 0}}, "merge.search.sampling_steps"),
        ({"search": {"strategy": "random"}}, "merge.search.strategy"),
        ({"search": {"valuez": [1.0]}}, "merge.search.valuez"),
    ],
)
def test_bad_merge_values_name_the_key(default_params_dict, values, key):
    with pytest.raises(ConfigError) as exc:
        parse_params(_with(default_params_dict, "merge", **values))
    assert key in str(exc.value)


def test_merge_defaults_and_methods(default_params_dict):
    m = parse_params(default_params_dict).merge
    assert (m.method, m.density, m.scale, m.search.strategy) == ("task_arithmetic", 0.5, 1.0, "none")
    for method in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
        assert parse_params(_with(default_params_dict, "merge", method=method, density=1.0)).merge.method == method
    s = parse_params(_with(default_params_dict, "merge", search={})).merge.search
    assert (s.strategy, s.values, s.max_evaluations, s.num_samples, s.sampling_steps) == (
        "none", [0.0, 0.25, 0.5, 0.75, 1.0], 24, 500, 20
    )


def test_grid_search_must_fit_the_budget(default_params_dict):
    grid = {"strategy": "grid", "values": [0.0, 0.5, 1.0]}  # 3**4 = 81 merges for N=4
    with pytest.raises(ConfigError) as exc:
        parse_params(_with(default_params_dict, "merge", search={**grid, "max_evaluations": 80}))
    assert "merge.search.max_evaluations" in str(exc.value) and "merge.search.strategy" in str(exc.value)
    assert parse_params(_with(default_params_dict, "merge", search={**grid, "max_evaluations": 81})).merge.search
    # coordinate descent has no such limit
    assert parse_params(_with(default_params_dict, "merge", search={**grid, "strategy": "coordinate"}))


def test_select_picks_sections_and_dotted_keys(default_params_dict):
    p = parse_params(default_params_dict)
    picked = select(p, ["seed", "finetune.lr", "merge.search"])
    assert picked["seed"] == 0 and picked["finetune.lr"] == p.finetune.lr
    assert "merge.search.strategy" in picked and "merge.method" not in picked and "finetune.p" not in picked
    with pytest.raises(KeyError):
        select(p, ["finetune.lrr"])


@pytest.mark.parametrize("key", ["lr", "weight_decay", "grad_clip", "p", "consistency_weight"])
def test_non_finite_floats_are_refused_everywhere(default_params_dict, key):
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=f"finetune.{key}"):
            parse_params(_with(default_params_dict, "finetune", **{key: bad}))


def test_params_yaml_spells_out_every_key(default_params_dict):
    """Every parameter is explicit in params.yaml, so `dvc params diff` and MLflow show all of them."""
    parsed = flatten(parse_params(default_params_dict))
    assert set(parsed) == set(flatten(default_params_dict))


def test_the_shared_budget_is_n_times_steps_unless_set(default_params_dict):
    ft = parse_params(default_params_dict).finetune
    assert ft.shared_steps is None and ft.shared_total_steps(4) == 4 * ft.steps
    assert ft.model_copy(update={"shared_steps": 1500}).shared_total_steps(4) == 1500
    with pytest.raises(ConfigError, match="finetune.shared_steps"):
        parse_params(_with(default_params_dict, "finetune", shared_steps=0))


def test_idx_source_is_grayscale():
    with pytest.raises(ConfigError, match="data.channels: 1"):
        parse_params({"data": {"source": "idx", "channels": 3}})
    assert parse_params({"data": {"source": "idx", "image_size": 16}}).data.idx_dir.endswith("fashion-mnist")


def test_a_configuration_file_goes_on_top_of_params_and_a_missing_one_is_named(tmp_path):
    (tmp_path / "p.yaml").write_text("seed: 3\nfinetune:\n  lr: 0.001\n  steps: 7\n")
    (tmp_path / "c.yaml").write_text("finetune:\n  lr: 0.002\n")
    p = load_params(tmp_path / "p.yaml", tmp_path / "c.yaml")
    assert (p.seed, p.finetune.lr, p.finetune.steps) == (3, 0.002, 7)
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_params(tmp_path / "p.yaml", tmp_path / "missing.yaml")


def test_controls_validation_samples_must_exceed_the_feature_dimension(default_params_dict):
    """The scale searches score FD on controls.num_samples samples: no more than the dimension is singular."""
    d = _with(default_params_dict, "controls", models=["soup", "shared_scaled"], num_samples=64)
    with pytest.raises(ConfigError) as exc:
        parse_params(d)
    assert "controls.num_samples (64)" in str(exc.value) and "['shared_scaled']" in str(exc.value)
    parse_params(_with(default_params_dict, "controls", models=["soup", "shared_scaled"], num_samples=65))
    parse_params(_with(default_params_dict, "controls", models=["soup"], num_samples=64))  # no scale search
