"""The sections of the analysis stages: extraction, OT drift, SAEs, detection, evaluation and
the training-phase HMM.
"""

from __future__ import annotations

from typing import Any, Literal, Self, get_args

from pydantic import Field, field_validator, model_validator

from shared.spec.fields import Float, Int, Section, Seed, Selection, problem

#: Training-dynamics metrics the trainer writes to each checkpoint's dynamics.json (the
#: visualizing-training set, after Hu et al.); `hmm.features` picks among these names.
DynamicsFeature = Literal[
    "l1",
    "l2",
    "code_sparsity",
    "w_mean",
    "w_median",
    "w_var",
    "b_mean",
    "b_median",
    "b_var",
    "trace",
    "spectral",
    "computational_sparsity",
    "sv_mean",
    "sv_var",
]
DYNAMICS_FEATURES: tuple[str, ...] = get_args(DynamicsFeature)
_DEFAULT_HMM_FEATURES: list[DynamicsFeature] = [
    "l1",
    "l2",
    "code_sparsity",
    "trace",
    "spectral",
    "computational_sparsity",
    "sv_mean",
    "sv_var",
]


#: SAE training length when a spec gives neither `sae.epochs` nor `sae.tokens`.
DEFAULT_SAE_TOKENS = 262_144


class ExtractSpec(Section):
    """Hidden states: which checkpoints, which tokens of the fixed probe set, stored how."""

    steps: Selection = "all"
    """Checkpoint steps to extract: all, or a list of steps."""
    probe_samples: Int = Field(default=64, gt=0)
    """Sequences in the fixed probe set, the same for every checkpoint."""
    token_policy: Literal["all", "last", "answer", "random_k"] = "all"
    """Which positions of a probe sequence to keep."""
    random_k: Int = Field(default=8, gt=0)
    """Positions kept per sequence by token_policy random_k."""
    max_tokens_per_layer: Int | None = Field(default=4096, gt=0)
    """Cap on stored tokens per layer and checkpoint (subsampled, seeded); null: no cap."""
    sites: list[Literal["attn_out", "mlp_out", "resid_mid"]] = Field(default_factory=list)
    """Sites beyond the residual stream after each block (always extracted)."""
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Storage dtype of hidden states."""
    batch_size: Int = Field(default=16, gt=0)
    """Probe sequences per forward pass."""
    seed: Seed = 0
    """Seed for the probe set and token subsampling (follows run.seed)."""

    @field_validator("sites")
    @classmethod
    def _unique_sites(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class OTSpec(Section):
    """Representation drift by optimal transport between hidden-state clouds."""

    method: Literal["sinkhorn", "emd", "sliced"] = "sinkhorn"
    """Entropic OT (sinkhorn), exact OT (emd) or sliced Wasserstein."""
    reg: Float = Field(default=0.05, gt=0)
    """Entropic regularisation epsilon of sinkhorn."""
    scaling: bool = True
    """Anneal epsilon from large to `reg` (epsilon scaling): faster and stabler sinkhorn."""
    max_iter: Int = Field(default=200, gt=0)
    """Sinkhorn iterations per OT problem; a problem still above `tol` after them is finished by Newton's method in float64."""
    tol: Float = Field(default=1e-5, gt=0)
    """Sinkhorn's stopping tolerance on the marginal error (L1: mass in the wrong place, 0..2)."""
    rtol: Float = Field(default=1e-3, gt=0)
    """Relative accuracy of every sinkhorn drift value: where the error estimated from `tol` is larger, its OT problems are polished in float64 (Newton)."""
    n_points: Int = Field(default=256, gt=1)
    """Points sampled from each hidden-state cloud."""
    pca_components: Int | None = Field(default=32, gt=0)
    """Project onto this many principal components first; null keeps all dimensions."""
    n_projections: Int = Field(default=128, gt=0)
    """Random directions of the sliced method."""
    bootstrap: Int = Field(default=20, ge=0)
    """Bootstrap resamples for confidence intervals; 0 disables them."""
    permutations: Int = Field(default=20, ge=0)
    """Random splits of one checkpoint's token cloud into two disjoint halves (the n drift tokens pooled with up to n more probe tokens): the noise baseline and p-value of each step's drift; 0 disables them."""
    change_penalty: Float | None = Field(default=None, gt=0)
    """Penalty of the change-point search; null picks one from the data (BIC-like)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to solve (the stage's --device flag overrides it)."""
    dtype: Literal["float32", "float64"] = "float32"
    """Solver precision."""
    seed: Seed = 0
    """Seed for sampling, projections and bootstrap (follows run.seed)."""


class SAESpec(Section):
    """Sparse autoencoders on hidden states, one per layer."""

    arch: Literal["jumprelu", "topk", "relu"] = "jumprelu"
    """JumpReLU (learned thresholds, L0 penalty), TopK (k active) or ReLU (L1 penalty)."""
    layers: Selection = "all"
    """Hidden-state layers (0 = embeddings .. n_layer) to train an SAE on."""
    step: Int | None = Field(default=None, ge=0)
    """Checkpoint step whose hidden states train the SAEs; null: the last one."""
    source: Literal["stream", "probe"] = "stream"
    """Training activations: `stream` runs the checkpoint over the run's training data through a shuffled buffer; `probe` reads the extracted probe tokens (a few thousand at most)."""
    expansion: Int = Field(default=5, gt=0)
    """Features per input dimension (d_sae = expansion * n_embd); 5 as GhostTrack (1024 -> 5120)."""
    k: Int | None = Field(default=None, gt=0)
    """Active features per token; required by (and only used by) arch topk."""
    sparsity_loss: Literal["step", "tanh", "target_l0"] = "tanh"
    """JumpReLU sparsity penalty: its tanh relaxation of L0 (reaches the encoder, so it sparsifies within a short budget), L0 via step (only the thresholds learn from it, slowly), or distance to target_l0."""
    l0_coeff: Float = Field(default=3e-3, ge=0)
    """Weight of the JumpReLU sparsity penalty; inputs have unit mean squared norm, so 3e-3 prices one strongly active feature at 0.3% of their power."""
    target_l0: Float | None = Field(default=None, gt=0)
    """Active features per token aimed at by sparsity_loss target_l0."""
    l1_coeff: Float = Field(default=3e-2, ge=0)
    """Weight of the decoder-norm-weighted L1 penalty of arch relu (inputs of unit mean squared norm)."""
    bandwidth: Float = Field(default=0.05, gt=0)
    """Width of the rectangle kernel of JumpReLU's threshold pseudo-gradient (SAELens: 0.05)."""
    init_threshold: Float = Field(default=0.01, gt=0)
    """Initial JumpReLU threshold (SAELens: 0.01)."""
    tanh_scale: Float = Field(default=4.0, gt=0)
    """Scale inside the tanh of sparsity_loss tanh."""
    aux_k_coeff: Float = Field(default=1 / 32, ge=0)
    """Weight of TopK's auxiliary loss that revives dead features (Gao et al.: 1/32)."""
    pre_act_coeff: Float = Field(default=0.0, ge=0)
    """Weight of JumpReLU's pre-activation loss sum ReLU(theta - z) that revives dead features
    (Anthropic, January 2025); 0: off."""
    lr: Float = Field(default=1e-3, gt=0)
    """Adam learning rate."""
    batch_size: Int = Field(default=256, gt=0)
    """Tokens per batch."""
    epochs: Float | None = Field(default=None, gt=0)
    """Passes over the source's training tokens (the training set, or the probe's training share), instead of tokens."""
    tokens: Int | None = Field(default=None, gt=0)
    """Training tokens in total (default 262,144 when epochs is not set); a small training set is cycled in a new shuffled order each pass."""
    buffer_tokens: Int = Field(default=65_536, gt=0)
    """Source stream: activations in the shuffling buffer (at least 2 batches), half refilled at a time; a training set this small is computed once."""
    stream_dtype: Literal["float32", "bfloat16"] = "float32"
    """Source stream: the dtype the checkpoint computes the *training* activations in. bfloat16 halves the forward pass on GPUs and on CPUs with bf16 matmuls (activations within about 0.5% of float32; the held-out judges stay float32), so generation keeps up with a small SAE."""
    eval_tokens: Int = Field(default=2000, gt=0)
    """Source stream: held-out tokens (eval split) the metrics are measured on; fewer when the split has fewer."""
    warmup_steps: Int = Field(default=0, ge=0)
    """Learning-rate warm-up steps."""
    sparsity_warmup_steps: Int = Field(default=0, ge=0)
    """Steps over which the sparsity coefficient ramps up from 0."""
    holdout_fraction: Float = Field(default=0.1, ge=0, lt=1)
    """Source probe: share of the probe's sequences held out for the SAE's metrics."""
    compile: bool = False
    """torch.compile the SAE."""
    seed: Seed = 0
    """Seed for init, batching, the stream's order and the held-out choice (follows run.seed)."""

    @model_validator(mode="before")
    @classmethod
    def _epochs_or_tokens(cls, data: Any) -> Any:
        """Exactly one training length; tokens by default, so a spec may name neither."""
        if not isinstance(data, dict):
            return data
        if data.get("epochs") is not None and data.get("tokens") is not None:
            raise problem("set sae.epochs or sae.tokens, not both", "tokens")
        if data.get("epochs") is None and data.get("tokens") is None:
            data = {**data, "tokens": DEFAULT_SAE_TOKENS}
        return data

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.buffer_tokens < 2 * self.batch_size:
            raise problem(
                f"buffer_tokens {self.buffer_tokens} holds fewer than two batches of "
                f"{self.batch_size}; raise it to at least {2 * self.batch_size}",
                "buffer_tokens",
            )
        if self.arch == "topk" and self.k is None:
            raise problem("arch topk needs k, the active features per token (e.g. 32)", "k")
        if self.sparsity_loss == "target_l0" and self.target_l0 is None:
            raise problem(
                "sparsity_loss target_l0 needs target_l0, the active features per token to aim at",
                "target_l0",
            )
        return self


class DetectSpec(Section):
    """Hallucination detection: generate answers, track SAE features, score them."""

    enabled: bool = True
    """Whether the workflow runs the detect stage. Off for tasks whose final model may answer
    every question right (or every one wrong), leaving a detector nothing to tell apart:
    modular arithmetic once grokked."""
    samples: Int = Field(default=64, gt=0)
    """Prompts to answer."""
    num_samples: Int = Field(default=1, gt=0)
    """Answers generated per prompt (more than 1 needs temperature > 0)."""
    temperature: Float = Field(default=0.0, ge=0)
    """Sampling temperature; 0 is greedy decoding."""
    top_k: Int | None = Field(default=None, gt=0)
    """Sample among the k most likely tokens only; null: no cut."""
    max_new_tokens: Int = Field(default=16, gt=0)
    """Tokens generated per answer at most."""
    layers: Selection = "all"
    """SAE layers whose features are tracked: all of sae.layers, or a subset."""
    test_fraction: Float = Field(default=0.3, gt=0, lt=1)
    """Share of prompts held out to test the detector."""
    hypotheses: Int = Field(default=16, gt=0)
    """Active SAE features per layer and generated token kept as that step's hypotheses (largest activations)."""
    link_cosine: Float = Field(default=0.5, gt=0, le=1)
    """Decoder-direction cosine at or above which features of adjacent tracked layers are linked."""
    bootstrap: Int = Field(default=1000, ge=0)
    """Bootstrap resamples for the AUROC confidence intervals in detect/metrics.json; 0: none."""
    seed: Seed = 0
    """Seed for prompt choice, sampling and the split (follows run.seed)."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.num_samples > 1 and self.temperature == 0:
            raise problem(
                "num_samples > 1 with temperature 0 repeats one greedy answer; "
                "set detect.temperature > 0 (e.g. 1.0)",
                "temperature",
            )
        return self


class EvaluateSpec(Section):
    """Scores, confidence intervals and phase matching of the final report."""

    bootstrap: Int = Field(default=200, ge=0)
    """Bootstrap resamples for metric confidence intervals; 0 disables them."""
    threshold: Literal["f1", "youden", "fixed"] = "f1"
    """How the detector's decision threshold is chosen: best F1, Youden's J, or threshold_value."""
    threshold_value: Float = 0.5
    """Decision threshold used by threshold fixed."""
    phase_tolerance: Int = Field(default=1, ge=0)
    """Checkpoints by which a found phase boundary may miss a reference one and still match."""
    seed: Seed = 0
    """Seed for bootstrap resampling (follows run.seed)."""


class HMMSpec(Section):
    """Latent training phases: Gaussian HMMs on training-dynamics features."""

    features: list[DynamicsFeature] = Field(
        default_factory=lambda: list(_DEFAULT_HMM_FEATURES), min_length=1
    )
    """Dynamics metrics (z-scored per run) the HMM observes."""
    max_components: Int = Field(default=8, ge=1)
    """Try 1..max_components hidden states."""
    cov_type: Literal["diag", "full", "spherical", "tied"] = "diag"
    """Covariance of each state's Gaussian."""
    restarts: Int = Field(default=5, ge=1)
    """Random restarts per number of states; the best log-likelihood is kept."""
    n_iter: Int = Field(default=100, ge=1)
    """EM iterations per fit."""
    select_by: Literal["bic", "aic", "loglik"] = "bic"
    """Criterion choosing the number of states (loglik: held-out log-likelihood)."""
    seed: Seed = 0
    """Seed for the restarts (follows run.seed)."""

    @field_validator("features")
    @classmethod
    def _unique_features(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))
