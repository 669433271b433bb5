"""Typed, validated view of ``params.yaml``.

``params.yaml`` is the single source of configuration. :func:`load_params`
parses and validates all of it up front, cross-field rules included, and every
stage works from the parsed :class:`Params`. Errors name the offending key and
say what would fix it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError


def _distinct(values: list, message: str) -> list:
    if len(set(values)) != len(values):
        raise ValueError(message)
    return values


class _Section(BaseModel):
    # Unknown keys are errors: a misspelled key must not silently fall back
    # to a default.
    # NaN and infinity are refused for every float field.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)


class DataConfig(_Section):
    source: Literal["digits", "imagefolder", "idx"] = "digits"
    # imagefolder: a directory of class subfolders (<root>/<class>/<image>),
    # the torchvision ImageFolder layout; labels come from the subfolder names.
    image_folder: Optional[str] = None
    # idx: the directory of the four MNIST-style IDX files (train-*, t10k-*);
    # Debian's dataset-fashion-mnist installs Fashion-MNIST's here.
    idx_dir: str = "/usr/share/datasets/fashion-mnist"
    # one name per label (idx; null: Fashion-MNIST's names in its Debian directory, else the label numbers)
    class_names: Optional[list[str]] = None
    image_size: int = Field(8, ge=4, le=1024)
    channels: Literal[1, 3] = 1
    holdout_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    # The train/held-out split's own seed: a training-seed sweep (seed) must not
    # change which images a model may train on, nor the reference set.
    split_seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _folder_needed(self) -> "DataConfig":
        if self.source == "imagefolder" and not self.image_folder:
            raise ValueError(
                "data.image_folder must name a directory when data.source is 'imagefolder'"
            )
        if self.source == "idx" and self.channels != 1:
            raise ValueError("data.source 'idx' is grayscale: set data.channels: 1")
        if self.source == "digits" and (self.image_size != 8 or self.channels != 1):
            raise ValueError(
                "data.source 'digits' is 8x8 grayscale: set data.image_size: 8 and data.channels: 1"
            )
        return self


class ModelConfig(_Section):
    # A local diffusers UNet2DModel directory (or a pipeline directory with a
    # unet/ subfolder). null trains the embedded small base model instead.
    pretrained_path: Optional[str] = None
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64], min_length=1)
    layers_per_block: int = Field(1, ge=1, le=8)
    norm_num_groups: int = Field(8, ge=1)
    num_train_timesteps: int = Field(1000, ge=2)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    beta_start: float = Field(1e-4, gt=0.0, lt=1.0)
    beta_end: float = Field(0.02, gt=0.0, lt=1.0)
    # none: an unconditional UNet2DModel. prompt: a UNet2DConditionModel with
    # cross-attention on class prompts ("a handwritten seven"; dtm_core/conditioning.py),
    # trained in the pipeline with prompt dropout and sampled with classifier-free guidance.
    conditioning: Literal["none", "prompt"] = "none"
    cross_attention_dim: int = Field(64, ge=8)  # the prompt embedding's width (prompt only)

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

    steps: int = Field(..., ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(..., gt=0.0, le=1.0)
    weight_decay: float = Field(1e-6, ge=0.0)
    adam_betas: tuple[float, float] = (0.95, 0.999)
    adam_eps: float = Field(1e-8, gt=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    ema_max_decay: float = Field(0.9999, ge=0.0, lt=1.0)
    ema_inv_gamma: float = Field(1.0, gt=0.0)
    ema_power: float = Field(0.75, gt=0.0)
    # constant, or cosine decay to 0 after a linear warm-up of warmup_steps
    # (as diffusers' unconditional training example schedules it).
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    log_every: int = Field(10, ge=1)
    # Save resumable training state every this many steps (0: never). A killed
    # run resumes from the newest checkpoint under .dtm/checkpoints/.
    checkpoint_every: int = Field(100, ge=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    # model.conditioning prompt: the share of each batch trained on the empty prompt (classifier-free guidance)
    prompt_dropout: float = Field(0.1, ge=0.0, le=1.0)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        # YAML 1.1 readers (and tools that rewrite params.yaml) turn a bare
        # `no` into false; accept it as Accelerate's "no".
        return "no" if v is False else v

    @field_validator("adam_betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("both betas must lie in [0, 1)")
        return v


class PretrainConfig(OptimConfig):
    steps: int = Field(5000, ge=1)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    checkpoint_every: int = Field(500, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = Field(500, ge=0)
    ema_max_decay: float = Field(0.999, ge=0.0, lt=1.0)


class PartitionConfig(_Section):
    # The range indices 0..N-1. DVC's `matrix` fans the fine-tune out over this
    # list, so N is its length: `dvc exp run -S 'partition.ranges=[0,1,2,3,4,5,6,7]'`.
    ranges: list[int] = Field(default_factory=lambda: [0, 1, 2, 3], min_length=1)
    # Optional explicit boundaries [0, b1, ..., T] (N + 1 strictly increasing
    # values); they win over ``method``.
    boundaries: Optional[list[int]] = None
    # uniform: the paper's [(i-1)T/N, iT/N). snr: equal widths in log-SNR.
    # affinity: gradient-affinity interval clustering of ``bins`` equal bins
    # (each interval at least ``min_width`` bins), the pretrained model's
    # gradients on ``affinity_images`` train images sketched to ``sketch_dim``.
    method: Literal["uniform", "snr", "affinity"] = "uniform"
    bins: int = Field(50, ge=2)
    min_width: int = Field(2, ge=1)
    sketch_dim: int = Field(4096, ge=16)
    affinity_images: int = Field(256, ge=1)

    @field_validator("ranges")
    @classmethod
    def _indices(cls, v: list[int]) -> list[int]:
        if v != list(range(len(v))):
            raise ValueError(
                f"must be the range indices 0..N-1 in order (got {v}); "
                f"for N={len(v)} write {list(range(len(v)))}"
            )
        return v


class LoraParams(_Section):
    """finetune.lora: the LoRA adapter each fine-tune trains when finetune.adapter is lora (dtm_core/adapters.py)."""

    rank: int = Field(4, ge=1)
    alpha: float = Field(4.0, gt=0.0)  # the update is (alpha / rank) B A
    # Module-name suffixes PEFT wraps: the resnets' convolutions and time
    # projection, attention (to_q/to_k/to_v/to_out.0, as a Stable Diffusion
    # LoRA), and the channel projections (a low-rank update of the identity).
    targets: list[str] = Field(
        default_factory=lambda: ["conv1", "conv2", "time_emb_proj", "to_q", "to_k", "to_v", "to_out.0",
                                 "channel_projection"],
        min_length=1,
    )


class FinetuneConfig(OptimConfig):
    steps: int = Field(200, ge=1)  # per range model; the shared baseline gets N x steps
    # The shared baseline's own step count (null: N x steps, equal compute).
    # Fewer steps stop it early, at a budget chosen on validation noise
    # (tools.sweep finetune.shared_steps); under a constant learning rate an
    # S-step run is exactly the S-step snapshot of a longer one.
    shared_steps: Optional[int] = Field(None, ge=1)
    lr: float = Field(5e-5, gt=0.0, le=1.0)
    # The shared baseline's own learning rate (null: finetune.lr). Each method's
    # rate is chosen by the same validation protocol (docs/RESULTS.md).
    shared_lr: Optional[float] = Field(2e-4, gt=0.0, le=1.0)
    # The shared baseline's loss weighting over timesteps (paper Table 1's
    # baselines; dtm_core/weighting.py): none | snr_plus_one | trunc_snr |
    # min_snr | p2, with weighting_gamma (null: 5 for min_snr, 1 for p2).
    weighting: Literal["none", "snr_plus_one", "trunc_snr", "min_snr", "p2"] = "none"
    weighting_gamma: Optional[float] = Field(None, gt=0.0)
    p: float = Field(0.3, ge=0.0, le=1.0)  # probability a batch draws t from all of [0, T)
    antithetic: bool = True
    consistency_weight: float = Field(1.0, ge=0.0)
    channel_projection: bool = True
    # full: every weight trains and each fine-tune is a full copy; lora: only
    # finetune.lora's adapter trains and is stored (both the ranges and the
    # shared baseline, so the comparison stays like for like).
    adapter: Literal["full", "lora"] = "full"
    lora: LoraParams = Field(default_factory=LoraParams)

    @property
    def shared(self) -> "FinetuneConfig":
        """The shared baseline's recipe: this one at ``shared_lr`` where that is set."""
        return self if self.shared_lr is None else self.model_copy(update={"lr": self.shared_lr})

    def shared_total_steps(self, num_ranges: int) -> int:
        """The shared baseline's steps: ``shared_steps``, or N x ``steps`` (equal compute) when that is null."""
        return num_ranges * self.steps if self.shared_steps is None else self.shared_steps


class _Sampling(_Section):
    """The sampler of a section that generates images (evaluate, merge.search)."""

    # ddim: DDIMScheduler (first order; eta > 0 adds DDIM's noise). dpmsolver:
    # DPMSolverMultistepScheduler, DPM-Solver++ of order 2, as exact in fewer
    # steps (docs/RESULTS.md "A faster sampler"). unipc: UniPCMultistepScheduler,
    # the same solver plus a corrector. All deterministic at eta 0.
    sampler: Literal["ddim", "dpmsolver", "unipc"] = "dpmsolver"
    sampling_steps: int = Field(20, ge=1)


class SearchConfig(_Sampling):
    """merge.search: pick the merge weights by scoring candidates on validation samples."""

    # none: use merge.weights as given. grid: every combination of `values`
    # over the N ranges (len(values)**N merges); coordinate: coordinate descent
    # from merge.weights, one range at a time, until a sweep stops improving or
    # the budget is spent; cmaes: CMA-ES (pycma) over [min(values), max(values)]^N
    # from merge.weights; distill: learn the weights by gradient descent so the
    # merged model's eps-prediction matches, at every t, the range model that
    # owns t (no sampling). One override turns a strategy on:
    # dvc exp run -S merge.search.strategy=coordinate
    strategy: Literal["none", "grid", "coordinate", "cmaes", "distill"] = "none"
    values: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], min_length=1)
    max_evaluations: int = Field(24, ge=1)  # distinct weight vectors scored, at most
    num_samples: int = Field(500, ge=2)  # validation samples per candidate (one fixed bank of noise)
    # Successive halving: score every candidate on the first cheap_samples of
    # the bank (null: no cheap round), then re-score the best rescore_top at
    # num_samples; the best full score wins.
    cheap_samples: Optional[int] = Field(None, ge=2)
    rescore_top: int = Field(5, ge=1)
    cmaes_sigma: float = Field(0.25, gt=0.0)  # CMA-ES initial step size
    # distill: Adam steps, learning rate and batch size; per_block learns one
    # weight per range and top-level UNet block instead of one per range.
    distill_steps: int = Field(200, ge=1)
    distill_lr: float = Field(0.05, gt=0.0)
    distill_batch_size: int = Field(64, ge=1)
    per_block: bool = False

    @field_validator("values")
    @classmethod
    def _distinct(cls, v: list[float]) -> list[float]:
        return _distinct(v, "candidate weights must be distinct: a repeated value only re-scores the same merge")


class MergeConfig(_Section):
    method: Literal["task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune"] = "task_arithmetic"
    # One weight per range, low t to high t; null means uniform 1/N. With
    # merge.search set, the search starts here.
    weights: Optional[list[float]] = None
    # Fraction of each task vector's entries kept (ties, dare_*, magnitude_prune).
    density: float = Field(0.5, gt=0.0, le=1.0)
    # lambda in theta + lambda * merge(tau_1..tau_N).
    scale: float = Field(1.0, gt=0.0)
    # With LoRA fine-tunes (finetune.adapter: lora), merge the adapters as
    # adapters with PEFT's add_weighted_adapter instead of the dense task
    # vectors: cat (exact: equals task_arithmetic), linear, svd, ties,
    # dare_linear (density from merge.density); null: the dense merge.
    peft_combination: Optional[Literal["cat", "linear", "svd", "ties", "dare_linear"]] = None
    search: SearchConfig = Field(default_factory=SearchConfig)



class ClassifierConfig(_Section):
    seed: int = Field(0, ge=0)  # the feature space's own seed: fixed across training seeds
    steps: int = Field(600, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0.0, le=1.0)
    feature_dim: int = Field(64, ge=2)


class EvaluateConfig(_Sampling):
    # Feature space of FD/KID: "classifier" (the embedded digit classifier) or
    # "inception" (clean-fid's standard mode="clean" Inception, the one
    # comparable with published FIDs; its weight file must be on disk).
    features: Literal["classifier", "inception"] = "classifier"
    # The test noise, bootstrap and KID-subset seed. Independent of the training
    # seed, so a seed sweep measures every run with the same ruler; validation
    # (merge-weight search, recipe sweeps) uses noise derived from it under
    # another name, never the test noise itself.
    seed: int = Field(0, ge=0)
    # What FD is measured against where the source has a test split (idx): "test" for the final
    # evaluation; "validation" (the held-out split in the test split's place) for choices made on
    # data, such as an lr sweep, which must not see the test images. Sources without one: train.
    reference: Literal["test", "validation"] = "test"
    inception_dir: Optional[str] = None  # holds inception-2015-12-05.pt; null: where clean-fid looks (/tmp)
    num_samples: int = Field(22000, ge=2)
    eta: float = Field(0.0, ge=0.0, le=1.0)  # ddim only
    batch_size: int = Field(500, ge=1)
    noise_seeds: int = Field(1, ge=1, le=100)  # repeat the evaluation over this many initial-noise seeds
    bootstrap_rounds: int = Field(50, ge=10)  # resamples for the FD/KID confidence intervals
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    grid_size: int = Field(8, ge=1, le=32)
    # Held-out denoising loss: the eps-MSE of every model on the held-out split
    # at this many timesteps spread evenly over [0, T), with fixed noise.
    heldout_timesteps: int = Field(50, ge=2)
    # ... on at most this many held-out images (the first of the shuffled split): its cost is
    # images x timesteps UNet calls per model, which dominates evaluation for a large UNet
    heldout_images: int = Field(1000, ge=1)
    # Memorisation: a sample counts as memorised when it lies closer to its
    # nearest train image than this percentile of the held-out images' own
    # nearest-train distances.
    memorisation_percentile: float = Field(5.0, gt=0.0, lt=100.0)
    # model.conditioning prompt: sample i is prompted with class i mod C at this guidance scale;
    # each scale of guidance_curve is sampled on the first guidance_curve_samples rows of the
    # same noise and prompts (FD against conditional accuracy, the text-to-image FID-CLIP curve).
    guidance_scale: float = Field(2.0, ge=0.0)
    guidance_curve: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0, 7.5])
    guidance_curve_samples: int = Field(2000, ge=2)
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
    # Resamples of the report's paired intervals (merged - shared, ...). Its own
    # section so that changing it re-runs only the report stage; 50 rounds gave
    # intervals 6-17% too narrow (docs/RESULTS.md "Time against power").
    bootstrap_rounds: int = Field(1000, ge=10)


CONTROLS = ("shared_consistency", "soup", "shared_scaled", "merged_scaled")


class ControlsConfig(_Section):
    # The controls that separate decoupling from averaging (docs/FASHION.md), built and evaluated by the
    # controls stage: shared_consistency (the shared fine-tune with DeMe's consistency loss), soup (N
    # fine-tunes over all of [0, T) with DeMe's recipe, merged as the range models are), shared_scaled
    # (theta + lambda tau_shared) and merged_scaled (merge.scale), lambda and the scale chosen on validation.
    models: list[Literal[CONTROLS]] = Field(default_factory=list)
    scales: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5], min_length=1)
    num_samples: int = Field(2000, ge=2)  # validation samples per candidate scale (their own noise seed)

    @field_validator("models", "scales")
    @classmethod
    def _distinct(cls, v: list) -> list:
        return _distinct(v, "controls.models and controls.scales must not repeat a value")


class AnalysisConfig(_Section):
    """The paper's analyses on a finished run (stages/analysis.py); the digits default runs none."""

    # Held-out loss of theta + lambda tau for each range's task vector and the
    # shared fine-tune's, on evaluate's held-out images, timesteps and noise.
    lambdas: list[float] = Field(default_factory=list)
    # ... on the first this many held-out images (null: evaluate.heldout_images, whose noise then makes
    # lambda = 1 the evaluated model's own held-out loss); fewer cost proportionally less
    heldout_images: Optional[int] = Field(None, ge=1)
    # Gradient conflict (Fig. 1): the cosine of the eps-loss gradients between
    # this many equal timestep bins, for the pretrained and the merged model,
    # on partition.affinity_images train images sketched to partition.sketch_dim. 0: off.
    gradient_bins: int = Field(0, ge=0)

    @field_validator("lambdas")
    @classmethod
    def _distinct(cls, v: list) -> list:
        return _distinct(v, "analysis.lambdas must not repeat a value")

    @field_validator("gradient_bins")
    @classmethod
    def _bins(cls, v: int) -> int:
        if v == 1:
            raise ValueError("analysis.gradient_bins needs at least 2 bins to compare (or 0: off)")
        return v


class TrackingConfig(_Section):
    experiment_name: str = Field("decouple-then-merge", min_length=1)
    # Register the merged model in the MLflow Model Registry under this name (a
    # new version per pipeline run), or null for off.
    register_model: Optional[str] = None
    # Overridden by the MLFLOW_TRACKING_URI environment variable; null means
    # sqlite:///<repo root>/mlflow.db.
    tracking_uri: Optional[str] = None


class Params(_Section):
    seed: int = Field(0, ge=0)
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
        n = self.num_ranges
        T = self.model.num_train_timesteps
        if n > T:
            raise ValueError(
                f"partition.ranges has N={n} ranges but model.num_train_timesteps is {T}: "
                "N must not exceed T"
            )
        pc = self.partition
        if pc.method == "affinity" and pc.boundaries is None:
            if pc.bins > T:
                raise ValueError(f"partition.bins ({pc.bins}) cannot exceed model.num_train_timesteps ({T})")
            if n * pc.min_width > pc.bins:
                raise ValueError(
                    f"N={n} ranges of at least partition.min_width={pc.min_width} bins do not fit in "
                    f"partition.bins={pc.bins}: lower partition.min_width or raise partition.bins"
                )
        b = self.partition.boundaries
        if b is not None:
            if len(b) != n + 1:
                raise ValueError(
                    f"partition.boundaries needs N+1={n + 1} values for N={n} ranges (got {len(b)})"
                )
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
        search, feature_dim = self.merge.search, self.evaluate.classifier.feature_dim
        if search.cheap_samples is not None and not feature_dim < search.cheap_samples < search.num_samples:
            raise ValueError(
                f"merge.search.cheap_samples ({search.cheap_samples}) must lie between the classifier's feature "
                f"dimension ({feature_dim}) and merge.search.num_samples ({search.num_samples})"
            )
        if search.strategy != "none" and search.num_samples <= feature_dim:
            raise ValueError(
                f"merge.search.num_samples ({self.merge.search.num_samples}) must exceed the classifier's feature "
                f"dimension evaluate.classifier.feature_dim ({self.evaluate.classifier.feature_dim}) that scores "
                "the search candidates"
            )
        if self.model.conditioning == "prompt":
            unsupported = {
                "merge.search.strategy": self.merge.search.strategy != "none",
                "controls.models": bool(self.controls.models),
                "partition.method: affinity": self.partition.method == "affinity" and self.partition.boundaries is None,
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
            if self.merge.search.per_block:
                raise ValueError("merge.search.per_block weights apply to the dense merge only: set "
                                 "merge.peft_combination: null")
        w = self.merge.weights
        if w is not None and len(w) != n:
            raise ValueError(
                f"merge.weights has {len(w)} values but there are N={n} ranges "
                "(partition.ranges); give one weight per range or null for uniform 1/N"
            )
        search = self.merge.search
        if search.strategy == "grid":
            size = len(search.values) ** n
            if size > search.max_evaluations:
                raise ValueError(
                    f"merge.search.strategy 'grid' over N={n} ranges with {len(search.values)} values "
                    f"is {size} merges, more than merge.search.max_evaluations ({search.max_evaluations}); "
                    "raise merge.search.max_evaluations, use fewer merge.search.values, or set "
                    "merge.search.strategy: coordinate"
                )
        return self

    @property
    def num_ranges(self) -> int:
        return len(self.partition.ranges)

    @property
    def merge_weights(self) -> list[float]:
        if self.merge.weights is None:
            return [1.0 / self.num_ranges] * self.num_ranges
        return list(self.merge.weights)



def _format_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid parameters"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (misspelled? see params.yaml and dtm_core/config.py for valid keys)"
        given = err.get("input")
        if err["type"] != "extra_forbidden" and not isinstance(given, dict):
            msg += f" (got {given!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_params(data: Any, source: str = "params") -> Params:
    if data is None:
        data = {}
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
    """Flatten nested params into dotted keys, e.g. ``finetune.lr``."""
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict):
                out.update(flatten(value, name))
            else:
                out[name] = value
    else:
        out[prefix] = data
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
