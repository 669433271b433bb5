"""Typed, validated view of ``params.yaml``.

``params.yaml`` is the single source of configuration, and its comments document each key.
:func:`load_params` parses and validates all of it up front, cross-field rules included, and
every stage works from the parsed :class:`Params`. Errors name the offending key and say what
would fix it. The defaults here equal params.yaml's (tests/test_config.py checks it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.types import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from .errors import ConfigError


def _distinct(values: list) -> list:
    if len(set(values)) != len(values):
        raise ValueError("must not repeat a value")
    return values


Distinct = AfterValidator(_distinct)
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Rate = Annotated[float, Field(gt=0.0, le=1.0)]  # a learning rate, or a density
AtLeastTwo = Annotated[int, Field(ge=2)]
Decay = Annotated[float, Field(ge=0.0, lt=1.0)]


class _Section(BaseModel):
    # Unknown keys are errors (a misspelled key must not fall back to a default); NaN and infinity too.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)


class DataConfig(_Section):
    source: Literal["digits", "imagefolder", "idx"] = "digits"
    image_folder: Optional[str] = None
    idx_dir: str = "/usr/share/datasets/fashion-mnist"
    class_names: Optional[list[str]] = None
    image_size: int = Field(8, ge=4, le=1024)
    channels: Literal[1, 3] = 1
    holdout_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    # its own seed, so that a training-seed sweep changes neither the split nor the reference set
    split_seed: NonNegativeInt = 0

    @model_validator(mode="after")
    def _folder_needed(self) -> "DataConfig":
        if self.source == "imagefolder" and not self.image_folder:
            raise ValueError("data.image_folder must name a directory when data.source is 'imagefolder'")
        if self.source == "idx" and self.channels != 1:
            raise ValueError("data.source 'idx' is grayscale: set data.channels: 1")
        if self.source == "digits" and (self.image_size != 8 or self.channels != 1):
            raise ValueError("data.source 'digits' is 8x8 grayscale: set data.image_size: 8 and data.channels: 1")
        return self


class ModelConfig(_Section):
    # null: train the embedded small base model (the library knows no base/ checkpoint).
    pretrained_path: Optional[str] = None
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64], min_length=1)
    layers_per_block: int = Field(1, ge=1, le=8)
    norm_num_groups: PositiveInt = 8
    num_train_timesteps: AtLeastTwo = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    beta_start: float = Field(1e-4, gt=0.0, lt=1.0)
    beta_end: float = Field(0.02, gt=0.0, lt=1.0)
    conditioning: Literal["none", "prompt"] = "none"
    cross_attention_dim: int = Field(64, ge=8)

    @model_validator(mode="after")
    def _groups_divide(self) -> "ModelConfig":
        for c in self.block_out_channels:
            if c <= 0 or c % self.norm_num_groups:
                raise ValueError(
                    f"model.block_out_channels entry {c} must be a positive multiple of "
                    f"model.norm_num_groups ({self.norm_num_groups})"
                )
        return self


class OptimConfig(_Section):
    """An optimiser recipe: AdamW, gradient clipping, an EMA of the weights, a learning-rate schedule."""

    steps: PositiveInt
    batch_size: PositiveInt = 128
    lr: Rate
    weight_decay: NonNegativeFloat = 1e-6
    adam_betas: tuple[Decay, Decay] = (0.95, 0.999)
    adam_eps: PositiveFloat = 1e-8
    grad_clip: PositiveFloat = 1.0
    ema_max_decay: Decay = 0.9999
    ema_inv_gamma: PositiveFloat = 1.0
    ema_power: PositiveFloat = 0.75
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: NonNegativeInt = 0
    log_every: PositiveInt = 10
    checkpoint_every: NonNegativeInt = 100  # 0: never
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    prompt_dropout: Fraction = 0.1

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        # YAML 1.1 readers (and tools that rewrite params.yaml) turn a bare `no` into false
        return "no" if v is False else v


class PretrainConfig(OptimConfig):
    steps: PositiveInt = 5000
    lr: Rate = 1e-3
    checkpoint_every: NonNegativeInt = 500
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: NonNegativeInt = 500
    ema_max_decay: Decay = 0.999


class PartitionConfig(_Section):
    # DVC's `matrix` fans the fine-tune out over this list, so N is its length.
    ranges: list[int] = Field(default_factory=lambda: [0, 1, 2, 3], min_length=1)
    boundaries: Optional[list[int]] = None
    method: Literal["uniform", "snr", "affinity"] = "uniform"
    bins: AtLeastTwo = 50
    min_width: PositiveInt = 2
    sketch_dim: int = Field(4096, ge=16)
    affinity_images: PositiveInt = 256

    @field_validator("ranges")
    @classmethod
    def _indices(cls, v: list[int]) -> list[int]:
        if v != list(range(len(v))):
            raise ValueError(
                f"must be the range indices 0..N-1 in order (got {v}); for N={len(v)} write {list(range(len(v)))}"
            )
        return v


class LoraParams(_Section):
    """finetune.lora: the LoRA adapter each fine-tune trains when finetune.adapter is lora (dtm_core/adapters.py)."""

    rank: PositiveInt = 2
    alpha: PositiveFloat = 2.0
    targets: list[str] = Field(default_factory=lambda: ["conv1", "conv2", "time_emb_proj", "to_q", "to_k", "to_v",
                                                        "to_out.0", "channel_projection"], min_length=1)


class FinetuneConfig(OptimConfig):
    steps: PositiveInt = 200
    shared_steps: Optional[PositiveInt] = None
    lr: Rate = 5e-5
    shared_lr: Optional[Rate] = 2e-4
    weighting: Literal["none", "snr_plus_one", "trunc_snr", "min_snr", "p2"] = "none"
    weighting_gamma: Optional[PositiveFloat] = None
    p: Fraction = 0.3
    antithetic: bool = True
    consistency_weight: NonNegativeFloat = 1.0
    channel_projection: bool = True
    adapter: Literal["full", "lora"] = "full"
    lora: LoraParams = Field(default_factory=LoraParams)

    @property
    def shared(self) -> "FinetuneConfig":
        """The shared baseline's recipe: this one at ``shared_lr`` where that is set."""
        return self if self.shared_lr is None else self.model_copy(update={"lr": self.shared_lr})

    def shared_total_steps(self, num_ranges: int) -> int:
        """The shared baseline's steps: ``shared_steps``, or N x ``steps`` (equal steps) when that is null."""
        return num_ranges * self.steps if self.shared_steps is None else self.shared_steps


class _Sampling(_Section):
    """The sampler of a section that generates images (evaluate, merge.search)."""

    sampler: Literal["ddim", "dpmsolver", "unipc"] = "dpmsolver"  # dtm_core.sampling.SAMPLERS
    sampling_steps: PositiveInt = 20


class SearchConfig(_Sampling):
    """merge.search: pick the merge weights by scoring candidates on validation samples."""

    strategy: Literal["none", "grid", "coordinate", "cmaes", "distill"] = "none"
    values: Annotated[list[float], Distinct] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], min_length=1)
    max_evaluations: PositiveInt = 24
    num_samples: AtLeastTwo = 500
    cheap_samples: Optional[AtLeastTwo] = None
    rescore_top: PositiveInt = 5
    cmaes_sigma: PositiveFloat = 0.25
    distill_steps: PositiveInt = 200
    distill_lr: PositiveFloat = 0.05
    distill_batch_size: PositiveInt = 64
    per_block: bool = False


class MergeConfig(_Section):
    method: Literal["task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune"] = "task_arithmetic"
    weights: Optional[list[float]] = None
    density: Rate = 0.5
    scale: PositiveFloat = 1.0
    peft_combination: Optional[Literal["cat", "linear", "svd", "ties", "dare_linear"]] = None
    search: SearchConfig = Field(default_factory=SearchConfig)


class ClassifierConfig(_Section):
    seed: NonNegativeInt = 0
    steps: PositiveInt = 600
    batch_size: PositiveInt = 128
    lr: Rate = 2e-3
    feature_dim: AtLeastTwo = 64


class EvaluateConfig(_Sampling):
    features: Literal["classifier", "inception"] = "classifier"
    seed: NonNegativeInt = 0
    reference: Literal["test", "validation"] = "test"
    inception_dir: Optional[str] = None
    num_samples: AtLeastTwo = 22000
    eta: Fraction = 0.0
    batch_size: PositiveInt = 500
    noise_seeds: int = Field(1, ge=1, le=100)
    bootstrap_rounds: int = Field(50, ge=10)
    kid_subsets: PositiveInt = 100
    kid_subset_size: AtLeastTwo = 1000
    grid_size: int = Field(8, ge=1, le=32)
    heldout_timesteps: AtLeastTwo = 50
    heldout_images: PositiveInt = 1000
    memorisation_percentile: float = Field(5.0, gt=0.0, lt=100.0)
    guidance_scale: NonNegativeFloat = 2.0
    guidance_curve: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0, 7.5])
    guidance_curve_samples: AtLeastTwo = 2000
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)

    @property
    def feature_dim(self) -> int:
        return 2048 if self.features == "inception" else self.classifier.feature_dim

    @model_validator(mode="after")
    def _enough_samples(self) -> "EvaluateConfig":
        if self.eta > 0 and self.sampler != "ddim":
            raise ValueError(f"evaluate.eta ({self.eta}) is DDIM's noise; evaluate.sampler '{self.sampler}' is "
                             "deterministic: set evaluate.eta 0 or evaluate.sampler ddim")
        dim = self.feature_dim
        if self.num_samples <= dim:
            where = "the Inception features" if self.features == "inception" else "evaluate.classifier.feature_dim"
            raise ValueError(
                f"evaluate.num_samples ({self.num_samples}) must exceed the feature dimension {dim} "
                f"({where}), or the Frechet distance's covariance is singular; raise evaluate.num_samples"
                + (" or lower evaluate.classifier.feature_dim" if self.features == "classifier" else "")
            )
        return self


class ReportConfig(_Section):
    # Its own section, so that changing it re-runs only the report stage.
    bootstrap_rounds: int = Field(1000, ge=10)


CONTROLS = ("shared_consistency", "soup", "shared_scaled", "merged_scaled")


class ControlsConfig(_Section):
    models: Annotated[list[Literal[CONTROLS]], Distinct] = Field(default_factory=list)
    scales: Annotated[list[float], Distinct] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5],
                                                     min_length=1)
    num_samples: AtLeastTwo = 2000


class AnalysisConfig(_Section):
    """The paper's analyses on a finished run (stages/analysis.py); the digits default runs none."""

    lambdas: Annotated[list[float], Distinct] = Field(default_factory=list)
    heldout_images: Optional[PositiveInt] = None
    gradient_bins: NonNegativeInt = 0

    @field_validator("gradient_bins")
    @classmethod
    def _bins(cls, v: int) -> int:
        if v == 1:
            raise ValueError("analysis.gradient_bins needs at least 2 bins to compare (or 0: off)")
        return v


class TrackingConfig(_Section):
    experiment_name: str = Field("decouple-then-merge", min_length=1)
    register_model: Optional[str] = None  # null: off (the library knows no registry until params.yaml names one)
    tracking_uri: Optional[str] = None


class Params(_Section):
    seed: NonNegativeInt = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    controls: ControlsConfig = Field(default_factory=ControlsConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Params":
        n, T = self.num_ranges, self.model.num_train_timesteps
        pc, search, feature_dim = self.partition, self.merge.search, self.evaluate.classifier.feature_dim
        if n > T:
            raise ValueError(
                f"partition.ranges has N={n} ranges but model.num_train_timesteps is {T}: N must not exceed T"
            )
        if pc.method == "affinity" and pc.boundaries is None:
            if pc.bins > T:
                raise ValueError(f"partition.bins ({pc.bins}) cannot exceed model.num_train_timesteps ({T})")
            if n * pc.min_width > pc.bins:
                raise ValueError(
                    f"N={n} ranges of at least partition.min_width={pc.min_width} bins do not fit in "
                    f"partition.bins={pc.bins}: lower partition.min_width or raise partition.bins"
                )
        b = pc.boundaries
        if b is not None:
            if len(b) != n + 1:
                raise ValueError(f"partition.boundaries needs N+1={n + 1} values for N={n} ranges (got {len(b)})")
            if b[0] != 0 or b[-1] != T:
                raise ValueError(
                    f"partition.boundaries must start at 0 and end at T={T} so the ranges "
                    f"cover [0, T) (got {b[0]}..{b[-1]})"
                )
            for lo, hi in zip(b, b[1:]):
                if hi <= lo:
                    raise ValueError(
                        f"partition.boundaries must be strictly increasing: {lo} then {hi} would "
                        "make ranges overlap or be empty"
                    )
        if search.cheap_samples is not None and not feature_dim < search.cheap_samples < search.num_samples:
            raise ValueError(
                f"merge.search.cheap_samples ({search.cheap_samples}) must lie between the classifier's feature "
                f"dimension ({feature_dim}) and merge.search.num_samples ({search.num_samples})"
            )
        if search.strategy != "none" and search.num_samples <= feature_dim:
            raise ValueError(
                f"merge.search.num_samples ({search.num_samples}) must exceed the classifier's feature "
                f"dimension evaluate.classifier.feature_dim ({feature_dim}) that scores the search candidates"
            )
        scaled = sorted({"shared_scaled", "merged_scaled"} & set(self.controls.models))
        if scaled and self.controls.num_samples <= feature_dim:
            raise ValueError(
                f"controls.num_samples ({self.controls.num_samples}) must exceed the classifier's feature dimension "
                f"evaluate.classifier.feature_dim ({feature_dim}) that scores the scale searches of {scaled}"
            )
        if self.model.conditioning == "prompt":
            unsupported = {
                "merge.search.strategy": search.strategy != "none",
                "controls.models": bool(self.controls.models),
                "partition.method: affinity": pc.method == "affinity" and pc.boundaries is None,
                "analysis.gradient_bins": self.analysis.gradient_bins > 0,
            }
            if any(unsupported.values()):
                raise ValueError(
                    f"model.conditioning: prompt does not yet support {[k for k, v in unsupported.items() if v]} "
                    "(they sample or take gradients without prompts); turn them off for a conditional run"
                )
        if self.merge.peft_combination is not None:
            if self.finetune.adapter != "lora":
                raise ValueError(
                    f"merge.peft_combination: {self.merge.peft_combination} merges LoRA adapters, but "
                    "finetune.adapter is full; set finetune.adapter: lora or merge.peft_combination: null"
                )
            if search.per_block:
                raise ValueError("merge.search.per_block weights apply to the dense merge only: set "
                                 "merge.peft_combination: null")
        w = self.merge.weights
        if w is not None and len(w) != n:
            raise ValueError(
                f"merge.weights has {len(w)} values but there are N={n} ranges "
                "(partition.ranges); give one weight per range or null for uniform 1/N"
            )
        if search.strategy == "grid" and len(search.values) ** n > search.max_evaluations:
            raise ValueError(
                f"merge.search.strategy 'grid' over N={n} ranges with {len(search.values)} values "
                f"is {len(search.values) ** n} merges, more than merge.search.max_evaluations "
                f"({search.max_evaluations}); raise merge.search.max_evaluations, use fewer merge.search.values, "
                "or set merge.search.strategy: coordinate"
            )
        return self

    @property
    def num_ranges(self) -> int:
        return len(self.partition.ranges)

    @property
    def merge_weights(self) -> list[float]:
        return list(self.merge.weights or [1.0 / self.num_ranges] * self.num_ranges)


def _format_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid parameters"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            msg = "unknown key (misspelled? see params.yaml and dtm_core/config.py for valid keys)"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if not isinstance(err.get("input"), dict):
                msg += f" (got {err.get('input')!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_params(data: Any, source: str = "params") -> Params:
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameter file '{path}' not found: run from the repository root")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def load_params(path: str | Path = "params.yaml", config: str | Path | None = None) -> Params:
    """``path`` parsed, with a configuration file's keys (configs/fashion.yaml) on top where given."""
    data = read_yaml(path)
    if config is not None:
        data = overlay(data, read_yaml(config))
    return parse_params(data, str(config or path))


def overlay(base: dict, over: Optional[dict]) -> dict:
    """``base`` with ``over``'s keys replacing its own, section by section (a configuration file such as
    configs/fashion.yaml on top of params.yaml)."""
    out = dict(base)
    for key, value in (over or {}).items():
        out[key] = overlay(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested params (a mapping or a model) into dotted keys, e.g. ``finetune.lr``."""
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return out


def select(params: Params, keys: Sequence[str]) -> dict[str, Any]:
    """The flat values of the params ``keys`` name: whole sections (``finetune``) or dotted keys (``finetune.lr``).

    A stage declares the keys it reads once; this picks exactly those for its
    MLflow run and its resumable-checkpoint fingerprint.
    """
    flat = flatten(params)
    out: dict[str, Any] = {}
    for key in keys:
        hits = {k: v for k, v in flat.items() if k == key or k.startswith(key + ".")}
        if not hits:
            raise KeyError(f"no parameter '{key}' in Params")  # a wrong declaration: a bug, not user input
        out.update(hits)
    return out
