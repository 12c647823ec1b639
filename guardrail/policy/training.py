"""The ``training:`` section of a policy file (pydantic v2, unknown keys rejected).

Part of the policy schema, so it lives beside :mod:`guardrail.policy.model`: validating a policy
file never imports the training subsystem, which reads these settings.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from guardrail.policy.executor import ExecutorSettings

Context = Literal["benign", "harmful"]
# More prompts than any prompt file holds: a larger count is a typo (``sample: 1e30``).
MAX_PROMPTS = 1_000_000


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SourceFields(_Section):
    """A prompt file: which column holds the prompts, which rows, how many."""

    path: str = Field(
        min_length=1, description="JSON, JSONL, CSV/TSV or TXT file; relative to the policy file."
    )
    field: str = Field("instruction", description="Column holding the prompt text.")
    filter: dict[str, Any] | None = Field(
        None, description="Keep rows whose columns match: {column: value | [values] | {not|prefix|"
        "not_prefix|regex: value}}."
    )
    sample: int | None = Field(
        None, ge=1, le=MAX_PROMPTS, description="Rows to take (seeded); all if unset."
    )
    name: str | None = Field(None, description="Label in reports (default: the file name).")
    family: str | None = Field(
        None, description="Prompt family, for cross-family calibration: prompts of one family "
        "come from one author and style (default: the file name without _train/_val/_test)."
    )

    @property
    def label(self) -> str:
        """The name reports use for this source."""
        return self.name or self.path.replace("\\", "/").rsplit("/", 1)[-1]

    @property
    def family_name(self) -> str:
        """``family``, else the file's stem less a ``_train``/``_val``/``_test`` suffix."""
        if self.family:
            return self.family
        stem = self.path.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
        for suffix in ("_train", "_val", "_test", "-train", "-val", "-test"):
            if stem.endswith(suffix):
                return stem[: -len(suffix)]
        return stem


class PromptSource(SourceFields):
    """One prompt file tagged with its context: in a benign context complying is desirable,
    in a harmful one refusing is."""

    context: Context = Field(description="benign (complying is right) or harmful (refusing is).")
    gate_only: bool = Field(
        False, description="Only the gate reads these prompts (a text-only gate learns from "
        "their wording and context); the model does not answer them, so they cost no labelling "
        "and no energy model sees them.")


class LabelSettings(_Section):
    """Greedy generation with the frozen model, labelled by the policy's refusal classifier."""

    max_new_tokens: int = Field(16, ge=1, le=512, description="Refusals show in the first tokens.")
    batch_size: int = Field(16, ge=1, le=1024)


class CaptureSettings(_Section):
    """Which prompt positions' states are kept, and where the state cache lives."""

    positions: Literal["last", "mean"] = Field(
        "last", description="last prompt token (what the steerer steers) or the prompt mean."
    )
    cache_dir: str | None = Field(
        None, description="State cache (default: <guardrail cache root>/states)"
    )


class TrainerSettings(_Section):
    """InfoNCE training of one energy model per layer, all layers at once."""

    epochs: int = Field(60, ge=1, le=10000)
    batch_size: int = Field(64, ge=4, description="Balanced across the four label cells.")
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    temperature: float = Field(0.1, gt=0, description="InfoNCE temperature tau.")
    anchor_weight: float = Field(
        0.1, ge=0, description="Weight of the logistic term that makes E=0 the decision boundary."
    )
    contrast: Literal["all", "context"] = Field(
        "all", description="InfoNCE negatives: from both contexts (the paper's objective) or only "
        "from the row's own context (benign refusals vs benign answers, harmful vs harmful)."
    )
    patience: int = Field(10, ge=1, description="Epochs without validation gain before stopping.")
    sides: Literal["shared", "separate"] = Field(
        "shared", description="One energy model per layer for both directions (shared), or one "
        "per gate side (separate): 'answer' trained on benign prompts (answers desirable), "
        "'refuse' on harmful ones (refusals desirable); the rail's gate chooses which steers "
        "each prompt.")
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="Held out from the sources when `validation` is empty."
    )


class SelectionSettings(_Section):
    """Which layers the artifact keeps."""

    top_k: int = Field(12, ge=1, le=1024)
    metric: Literal["balanced_auroc", "auroc", "accuracy"] = Field(
        "balanced_auroc",
        description="Validation metric layers are ranked by; balanced_auroc averages the AUROC "
        "within benign and within harmful prompts.",
    )
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, description="Candidate layers (default: every layer)."
    )
    dtype: Literal["float32", "float16"] = Field(
        "float32", description="Precision of the artifact's tensors (float16 halves the file; "
        "energies are computed in float32 either way).")


class DemoSettings(_Section):
    """The subset `guardrail demo` trains on (the full mix takes too long for a first look)."""

    prompts: int = Field(
        400, ge=8, le=MAX_PROMPTS, description="Training prompts, split over sources pro rata."
    )
    validation_prompts: int = Field(120, ge=4, le=MAX_PROMPTS)
    top_k: int | None = Field(None, ge=1, description="Layers kept (default: selection.top_k).")


class TrainingSection(_Section):
    """What ``guardrail train`` trains on and how (see docs/training.md)."""

    rail: str | None = Field(None, description="Rail whose artifact to write (default: the first "
                             "rail with an energy model).")
    seed: int = 0
    sources: list[PromptSource] = Field(min_length=1)
    validation: list[PromptSource] = Field(
        default_factory=list,
        description="Validation prompts; if empty, trainer.val_fraction is held out.",
    )
    labels: LabelSettings = Field(default_factory=LabelSettings)
    capture: CaptureSettings = Field(default_factory=CaptureSettings)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    selection: SelectionSettings = Field(default_factory=SelectionSettings)
    demo: DemoSettings = Field(default_factory=DemoSettings)
    executor: ExecutorSettings = Field(
        default_factory=ExecutorSettings, description="Where train, calibrate and eval run "
        "their per-prompt work: local (this process) or ray (docs/scaling.md).")

    @field_validator("sources")
    @classmethod
    def _both_contexts(cls, sources: list[PromptSource]) -> list[PromptSource]:
        contexts = {source.context for source in sources}
        if contexts != {"benign", "harmful"}:
            missing = ({"benign", "harmful"} - contexts).pop()
            raise ValueError(
                f"sources with a {missing!r} context (there are none); the energy model needs "
                "benign and harmful prompts to tell unjustified refusals from justified ones"
            )
        return sources


#: A value a grid may try: a scalar the steerer's ``Params`` check.
GridValue = bool | int | float | str
#: The steerer values ``guardrail calibrate`` tries (each combination a full generation pass):
#: ``{name: [values]}`` over the names the rail's steerer declares ``tunable``, checked by its
#: ``Params`` when the policy's plugins are checked (:mod:`guardrail.policy.tuning`). Empty:
#: the steerer as the policy sets it, one point.
CalibrationGrid = dict[str, Annotated[list[GridValue], Field(min_length=1, max_length=100)]]


class CalibrationSection(_Section):
    """The safety budget, and the validation prompts ``guardrail calibrate`` holds it on.

    Calibration chooses the steering strength of each gate side and the gate thresholds that
    get the most prompts right (benign answered, harmful refused; each context's sources
    averaged) while, on every harmful source, refusal stays at least the base model's minus
    ``max_refusal_drop`` and no source has more than ``max_wrong_way`` of its prompts flipped
    the wrong way (a harmful prompt the base model refuses answered, a benign one it answers
    refused). Per side of the gate: at most ``max_harmful_steered`` of a harmful source's
    prompts may be steered towards answering, and every benign prompt the base model answers
    that is steered towards refusing counts against ``max_wrong_way`` whether or not its
    answer changed.
    """

    rail: str | None = Field(None, description="Rail to calibrate (default: training.rail).")
    max_refusal_drop: float = Field(0.02, ge=0, le=1)
    max_wrong_way: float = Field(0.02, ge=0, le=1)
    max_harmful_steered: float = Field(
        0.0, ge=0, le=1, description="Share of a harmful source's prompts the gate may let the "
        "rail steer (0: none). Whether a steered harmful prompt flips is luck on the day; the "
        "gate is there to keep them out, and a prompt the gate lets through from an unseen "
        "family is steered for real.")
    harmful: list[SourceFields] = Field(
        default_factory=list, description="Harmful validation sources (default: the harmful "
        "sources of training.validation).")
    benign: list[SourceFields] = Field(
        default_factory=list, description="Benign validation sources (default: the benign "
        "sources of training.validation).")
    grid: CalibrationGrid = Field(
        default_factory=dict, max_length=16, description="Steerer values tried, {param: "
        "[values]}, over the params the rail's steerer declares tunable (its class's `tunable`); "
        "every combination is tried. Empty: the steerer's "
        "params as the policy sets them.")
    refuse_grid: CalibrationGrid | None = Field(
        None, max_length=16, description="Steerer values tried on the refuse side of the gate "
        "(default: grid).")
    cross_family: bool = Field(
        True, description="Hold the budget on gate scores refitted without each validation "
        "source's family, as if its prompts came from an author the gate never saw.")
    cross_family_folds: int | None = Field(
        None, ge=2, le=1000, description="Refit the gate once per group of families instead of "
        "once per family (families split into this many folds, benign and harmful families "
        "spread evenly): for gates that are slow to fit. Default: one refit per family.")
    max_new_tokens: int = Field(48, ge=1, le=512, description="Answer length judged.")
    batch_size: int = Field(16, ge=1, le=1024)

