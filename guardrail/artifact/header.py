"""An energy-model artifact's header, read without torch and checked field by field.

An artifact is untrusted input, like a policy file: a download, a colleague's run, a file
edited by hand. Everything the runtime reads from its JSON header is described here by one
pydantic model per part, so a value is either the type and range the runtime expects or an
:class:`~guardrail.errors.ArtifactError` naming the file and the field path
(``gate.members[1].std``), never a traceback later and never a silently different guardrail:

- the energy-model sets (``layers``/``configs`` in format 1, ``sides`` in format 2), each
  layer inside the fingerprint's depth, every number in a layer config finite;
- the fitted gate: members with a positive weight and spread, and a combined mean and spread
  that a fit can produce (the combined score is a weighted sum of standardised member scores,
  so its mean over the training prompts is 0 and its spread at most the sum of the weights);
- ``metadata.calibration``, what ``guardrail calibrate`` chose: finite gate thresholds in
  order and in range, steerer values that are plain finite values (checked against the rail's
  steerer ``Params`` when a rail uses them), a budget of rates in [0, 1];
- and (:mod:`guardrail.artifact.file`) the safetensors tensor table: every tensor belongs to
  a layer or gate member the header lists, and every listed layer has tensors.

The rest of ``metadata`` (training data, metrics, evidence, curves) is informational and
stays free-form. The safetensors container is read by :mod:`guardrail.artifact.safetensors`
(no torch), so ``guardrail validate`` checks an artifact's header before importing torch.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

FORMAT_SHARED = "guardrail-energy/1"
FORMAT = "guardrail-energy/2"
FORMATS = (FORMAT_SHARED, FORMAT)
HEADER_KEY = "guardrail"
#: The sides of a gate a side-specific energy-model set steers towards.
SIDES = ("answer", "refuse")
#: The fingerprint fields an artifact must match, each where both the artifact and the model
#: record it (artifacts written before a field existed are checked on the fields they have).
#: Not ``config_sha256``: it hashes the raw config, whose keys change between transformers
#: releases, so it would refuse an artifact that still fits.
FINGERPRINT_KEYS = ("model_type", "hidden_size", "num_layers", "num_attention_heads",
                    "num_key_value_heads", "intermediate_size", "vocab_size", "tokenizer_sha256")
GATE_TENSOR_PREFIX = "gate."

#: No transformer has more layers or a wider residual stream; a header claiming so is broken.
MAX_LAYERS = 4096
MAX_HIDDEN = 1 << 20
#: A gate's combined score is in standard deviations of its training prompts' scores, so by
#: Chebyshev's inequality at most 1% of those prompts score beyond +-10. ``below`` higher than
#: this (or ``above`` lower) would steer nearly every prompt: it is refused, not honoured.
MAX_GATE_THRESHOLD = 10.0
MAX_GATE_MEMBERS = 16
MAX_GATE_WEIGHT = 1000.0
# How far the stored combined mean may sit from 0 (rounding), per unit of summed weight.
_MEAN_TOLERANCE = 1e-2



# --- the header's parts -----------------------------------------------------------------------
class _Part(BaseModel):
    """A header part the runtime reads: exact types, unknown keys refused, numbers finite."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


LayerIndex = Annotated[int, Field(ge=0, lt=MAX_LAYERS)]
Side = Literal["answer", "refuse"]


def _finite_values(value: Any) -> Any:
    """Refuse NaN and infinities anywhere inside a free-form mapping the runtime reads."""
    found = _nonfinite(value)
    if found is not None:
        path, number = found
        message = f"got {number!r}; expected a finite number"
        raise FieldProblem(path, message) if path else ValueError(message)
    return value


class Fingerprint(BaseModel):
    """The model an artifact was trained for (other keys are kept, and compared by nobody)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    name: str | None = None
    model_type: str
    hidden_size: int = Field(ge=1, le=MAX_HIDDEN)
    num_layers: int = Field(ge=1, le=MAX_LAYERS)
    config_sha256: str | None = None


def _layers_once(layers: list[int] | None) -> list[int] | None:
    if layers is not None and len(set(layers)) != len(layers):
        raise ValueError("each layer once (a layer is listed twice)")
    return layers


def _configs_finite(configs: dict[str, dict[str, Any]] | None
                    ) -> dict[str, dict[str, Any]] | None:
    return _finite_values(configs)


def _config_per_layer(layers: list[int], configs: dict[str, Any], where: str) -> None:
    wanted = {str(layer) for layer in layers}
    missing = sorted(int(key) for key in wanted - set(configs))
    extra = sorted(set(configs) - wanted)
    if missing:
        raise FieldProblem(f"{where}configs", f"has no config for layers {missing}; expected "
                            f"one config per layer in '{where}layers'")
    if extra:
        raise FieldProblem(f"{where}configs", f"has configs for {shown(extra)}, which are "
                            f"not in '{where}layers'; expected one config per listed layer")


class EnergySet(_Part):
    """One set of per-layer energy models: the layers and each layer's plugin config."""

    layers: list[LayerIndex] = Field(min_length=1, max_length=MAX_LAYERS)
    configs: dict[str, dict[str, Any]]

    _once = field_validator("layers")(_layers_once)
    _finite = field_validator("configs")(_configs_finite)

    @model_validator(mode="after")
    def _one_config_per_layer(self) -> EnergySet:
        _config_per_layer(self.layers, self.configs, "")
        return self


class GateMemberHeader(_Part):
    """One fitted gate component: plugin, params, fitted config, weight, training mean and
    spread of its scores."""

    plugin: str = Field(min_length=1, max_length=200)
    params: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    weight: float = Field(1.0, gt=0, le=MAX_GATE_WEIGHT)
    mean: float
    std: float = Field(gt=0)

    @field_validator("params", "config")
    @classmethod
    def _finite(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _finite_values(value)


class GateHeader(_Part):
    """A rail's fitted gate: its members, and the mean and spread of their combined score."""

    mean: float
    std: float = Field(gt=0)
    report: dict[str, Any] = Field(default_factory=dict)
    members: list[GateMemberHeader] = Field(min_length=1, max_length=MAX_GATE_MEMBERS)

    @model_validator(mode="after")
    def _fitted_standardisation(self) -> GateHeader:
        # Each member's score is standardised on the training prompts (mean 0, spread at most
        # 1); the combined score is their weighted sum, standardised on the same prompts. So
        # its mean is 0 up to rounding, and its spread at most the sum of the weights; a
        # spread under a quarter of the largest weight would need members scoring against
        # each other. Anything else did not come from a fit, and would move every row's
        # score (a shifted mean can push a harmful prompt under ``below``).
        total = sum(m.weight for m in self.members)
        largest = max(m.weight for m in self.members)
        if abs(self.mean) > _MEAN_TOLERANCE * total:
            raise FieldProblem("mean", f"got {self.mean!r}; expected 0, the combined mean of "
                                f"a fitted gate (at most {_MEAN_TOLERANCE * total:g} off by "
                                "rounding)")
        if self.std > total * (1 + 1e-3):
            raise FieldProblem("std", f"got {self.std!r}; expected at most the sum of the "
                                f"members' weights ({total:g}), as for any fitted gate")
        if self.std < largest / 4:
            raise FieldProblem("std", f"got {self.std!r}; expected at least a quarter of the "
                                f"largest member weight ({largest:g}), as for any fitted gate "
                                "whose members do not score against each other")
        return self


class SteererValues(BaseModel):
    """Steerer params calibration chose (checked against the rail's steerer when used)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _plain(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                if not isinstance(value, (str, int, float, bool, type(None))):
                    raise FieldProblem(key, f"got a {type(value).__name__}; expected a "
                                        "number, string or boolean")
                if isinstance(value, float) and not math.isfinite(value):
                    raise FieldProblem(key, f"got {value!r}; expected a finite number")
        return data

    def values(self) -> dict[str, Any]:
        """The values as a mapping."""
        return dict(self.__pydantic_extra__ or {})


class CalibratedSide(_Part):
    """What calibration chose for one side of the gate."""

    steerer: SteererValues | None = None


class CalibratedGate(_Part):
    """The gate thresholds calibration chose, in training standard deviations."""

    below: float | None = None
    above: float | None = None

    @model_validator(mode="after")
    def _in_range(self) -> CalibratedGate:
        if self.below is not None and self.below > MAX_GATE_THRESHOLD:
            raise FieldProblem("below", f"got {self.below!r}; expected at most "
                                f"{MAX_GATE_THRESHOLD:g} (a higher threshold steers nearly "
                                "every prompt towards answering)")
        if self.above is not None and self.above < -MAX_GATE_THRESHOLD:
            raise FieldProblem("above", f"got {self.above!r}; expected at least "
                                f"{-MAX_GATE_THRESHOLD:g} (a lower threshold steers nearly "
                                "every prompt towards refusing)")
        if self.below is not None and self.above is not None and not self.below < self.above:
            raise FieldProblem("below", f"got {self.below!r}; expected a threshold under "
                                f"'above' ({self.above!r})")
        return self


class Budget(BaseModel):
    """The safety budget calibration held (rates of a suite, in [0, 1])."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    max_refusal_drop: float | None = Field(None, ge=0, le=1)
    max_wrong_way: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _finite(cls, data: Any) -> Any:
        return _finite_values(data)


class Calibration(BaseModel):
    """``metadata.calibration``: what ``guardrail calibrate`` chose for one rail. Evidence,
    curves and timings beside it are informational."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    rail: str | None = None
    #: The steerer plugin ``steerer`` and each side's values are for; a rail that names
    #: another steerer ignores them (None: written before this field, values always apply).
    steerer_plugin: str | None = Field(default=None, max_length=200)
    steerer: SteererValues | None = None
    sides: dict[Side, CalibratedSide] = Field(default_factory=dict)
    gate: CalibratedGate | None = None
    budget: Budget = Field(default_factory=Budget)

    def steerer_values(self, side: str | None = None) -> dict[str, Any]:
        """The calibrated steerer values shared by both sides, or of ``side``."""
        found = self.steerer if side is None else (
            self.sides[side].steerer if side in self.sides else None)
        return found.values() if found is not None else {}


class Metadata(BaseModel):
    """How the artifact was made; only ``calibration`` is read at run time."""

    model_config = ConfigDict(extra="allow", strict=True)
    calibration: Calibration | None = None


class ArtifactHeader(_Part):
    """The whole header of either format (``layers``/``configs`` or ``sides``)."""

    format: Literal["guardrail-energy/1", "guardrail-energy/2"]
    energy_model: str = Field(min_length=1, max_length=200)
    model: Fingerprint
    layers: list[LayerIndex] | None = None
    configs: dict[str, dict[str, Any]] | None = None
    sides: dict[Side, EnergySet] | None = None
    metadata: Metadata = Field(default_factory=Metadata)
    gate: GateHeader | None = None

    _once = field_validator("layers")(_layers_once)
    _finite = field_validator("configs")(_configs_finite)

    @model_validator(mode="before")
    @classmethod
    def _one_layout(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("format") == FORMAT_SHARED:
            for key in ("layers", "configs"):
                if key not in data:
                    raise FieldProblem(key, "missing")
            if "sides" in data:
                raise FieldProblem("sides", "belongs to format guardrail-energy/2; this "
                                    "artifact is guardrail-energy/1 (one shared set: 'layers' "
                                    "and 'configs')")
        elif data.get("format") == FORMAT:
            if "sides" not in data:
                raise FieldProblem("sides", "missing")
            for key in ("layers", "configs"):
                if key in data:
                    raise FieldProblem(key, "belongs to format guardrail-energy/1; this "
                                        "artifact is guardrail-energy/2 (one set per side "
                                        "under 'sides')")
        return data

    @field_validator("sides")
    @classmethod
    def _some_side(cls, sides: dict[str, EnergySet] | None) -> dict[str, EnergySet] | None:
        if sides is not None and not sides:
            raise ValueError(f"one or more of {list(SIDES)}")
        return sides

    @model_validator(mode="after")
    def _layers_exist(self) -> ArtifactHeader:
        if self.format == FORMAT_SHARED:
            assert self.layers is not None and self.configs is not None
            if not self.layers:
                raise FieldProblem("layers", "got []; expected at least one layer index")
        depth = self.model.num_layers
        for side, entry in self.sets().items():
            beyond = [layer for layer in entry.layers if layer >= depth]
            if beyond:
                field = "layers" if side == "shared" else f"sides.{side}.layers"
                raise FieldProblem(field, f"lists {beyond}, which do not exist in the "
                                    f"fingerprint's {depth}-layer model (model.num_layers)")
        if self.format == FORMAT_SHARED:
            assert self.layers is not None and self.configs is not None
            _config_per_layer(self.layers, self.configs, "")
        return self

    def sets(self) -> dict[str, EnergySet]:
        """The energy-model sets by side: ``{"shared": ...}`` or ``answer``/``refuse``."""
        if self.format == FORMAT_SHARED:
            assert self.layers is not None and self.configs is not None
            return {"shared": EnergySet.model_construct(layers=self.layers, configs=self.configs)}
        return {str(side): entry for side, entry in (self.sides or {}).items()}

    @property
    def calibration(self) -> Calibration | None:
        """``metadata.calibration``, checked (None: never calibrated)."""
        return self.metadata.calibration


class FieldProblem(ValueError):
    """A problem a validator found with one field below the part it checks."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


# --- checking ---------------------------------------------------------------------------------
# --- small pieces ----------------------------------------------------------------------------
def _nonfinite(value: Any, path: str = "") -> tuple[str, float] | None:
    """The key path and value of the first NaN or infinity inside ``value`` (None: none)."""
    if not path:
        try:  # the usual case, in C: nothing to find
            json.dumps(value, allow_nan=False)
            return None
        except (ValueError, TypeError, RecursionError):
            pass
    if isinstance(value, float) and not math.isfinite(value):
        return path, value
    if isinstance(value, dict):
        for key, item in value.items():
            found = _nonfinite(item, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _nonfinite(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def shown(value: Any, limit: int = 80) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int too large to print
        return f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[:limit] + "..."
