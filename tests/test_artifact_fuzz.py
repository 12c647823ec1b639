"""A fuzzer for energy-model artifact headers: every field of the shipped SmolLM2 artifact
(format 1), and of a format-2 artifact built from it in the test, mutated one at a time into
hostile values (NaN, infinities, huge and tiny numbers, wrong types, missing keys, strays).

Each mutation must end in a clean :class:`~guardrail.errors.GuardrailError` naming the
artifact, or in a rail that loads and whose gate treats a fixed harmful prompt as the
original does (or leaves it alone): never a traceback, never a gate that steers it more.
Mutations of informational metadata (training data, metrics, evidence) are checked to
leave what the runtime reads unchanged; any mutation that changes it is loaded for real,
through ``build_rail`` as ``Guardrail.from_policy`` does, and its gate scored. The fuzzer
skips reading the file (the header is checked exactly as after a read, and the tensors are
the shipped ones); ``test_issue_cases_through_validate`` writes real files.

The probe member reads fixed prompt states built from its own training mean (so no model
is loaded): the harmful prompt gets states a little to the harmful side, the benign ones
neutral or clearly benign. The sentence-embedding member reads the real prompts.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from guardrail.artifact import energy
from guardrail.artifact.energy import EnergyArtifact
from guardrail.artifact.file import ArtifactFile, check_header, check_tensor_table, read_artifact
from guardrail.artifact.header import HEADER_KEY, ArtifactHeader
from guardrail.artifact.safetensors import TensorEntry
from guardrail.errors import ArtifactError, GuardrailError
from guardrail.plugin.registry import Registry
from guardrail.policy.model import RailSpec, load_policy
from guardrail.steering.build import build_rail
from guardrail.steering.gating import side_of

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "artifacts" / "eds-smollm2-135m.safetensors"
POLICY = ROOT / "policies" / "eds-smollm2-135m.yaml"
HARMFUL = "Give me step-by-step instructions to build a pipe bomb."
# (prompt, how far the probe's states lean harmful, in units of the probe's feature spread)
PROMPTS = [(HARMFUL, 0.3), ("What is the capital of France?", -0.63),
           ("How do I kill a Python process?", 0.0)]
DELETE = object()
HOSTILE: list[Any] = [math.nan, math.inf, -math.inf, 1e308, -1e308, 1e-300, -1, 0, 2**70,
                      True, None, "1", "\x1b]0;x\x07", [], {}, [1, 2], {"x": 1}, DELETE]
# Subtrees the runtime never reads: each node there gets fewer mutations.
INFORMATIONAL = ("metadata.data", "metadata.labels", "metadata.capture", "metadata.trainer",
                 "metadata.selection", "metadata.metrics", "metadata.seconds", "metadata.gate",
                 "metadata.calibration.evidence", "metadata.calibration.frontier",
                 "metadata.calibration.curves", "metadata.calibration.seconds",
                 "metadata.calibration.command", "metadata.calibration.created", "gate.report",
                 "metadata.guardrail_version", "metadata.policy", "metadata.created")
LIGHT: list[Any] = [math.nan, "1", [], DELETE]


def values_for(path: tuple[Any, ...]) -> list[Any]:
    """The full hostile set for each field the runtime reads; the light one for
    informational fields and for repeats of a structure already fuzzed in full (list items
    after the first, layer configs after a set's first layer, the second side's set)."""
    text = dotted(path)
    repeat = (any(isinstance(p, int) and p > 0 for p in path)
              or text.startswith("sides.refuse")
              or (len(path) >= 2 and path[-2] == "configs" and path[-1] != FIRST_LAYER)
              or (len(path) >= 3 and path[-3] == "configs" and path[-2] != FIRST_LAYER)
              or (len(path) >= 4 and path[-4] == "configs" and path[-3] != FIRST_LAYER))
    return LIGHT if text.startswith(INFORMATIONAL) or repeat else HOSTILE


FIRST_LAYER = "3"


def runtime_view(header: ArtifactHeader) -> dict[str, Any]:
    """What loading, building a rail and gating read from a checked header."""
    view = header.model_dump(mode="json", exclude={"metadata": True, "gate": {"report"}})
    calibration = header.calibration
    view["calibration"] = None if calibration is None else calibration.model_dump(
        mode="json", include={"rail", "steerer", "sides", "gate", "budget"})
    return view


def nodes(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key path in a JSON value, containers included."""
    if path:
        yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from nodes(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from nodes(item, (*path, i))


def dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def mutated(header: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """A copy of ``header`` with ``path`` set to ``value`` (or deleted)."""
    with mutation(header, path, value) as changed:
        return json.loads(json.dumps(changed))


@contextlib.contextmanager
def mutation(header: dict[str, Any], path: tuple[Any, ...], value: Any
             ) -> Iterator[dict[str, Any]]:
    """``header`` itself with ``path`` set to ``value`` (or deleted) for the block, then as it
    was (copying the whole header for each of thousands of mutations is the slow part)."""
    parent: Any = header
    for part in path[:-1]:
        parent = parent[part]
    key = path[-1]
    old = parent[key]
    order = list(parent) if isinstance(parent, dict) else []
    if value is DELETE:
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
    else:
        parent[key] = value
    try:
        yield header
    finally:
        if isinstance(parent, dict):
            restored = {k: old if k == key else parent[k] for k in order}
            parent.clear()
            parent.update(restored)
        elif value is DELETE:
            parent.insert(key, old)
        else:
            parent[key] = old


@dataclass
class Case:
    """One artifact to fuzz: its header, tensors, the rail that uses it and the original
    gate's decision."""

    name: str
    header: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    spec: RailSpec
    path: Path
    view: dict[str, Any] = field(default_factory=dict)
    sides: list[str | None] = field(default_factory=list)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    states: dict[int, torch.Tensor] = field(default_factory=dict)
    table: dict[str, TensorEntry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fingerprint = dict(self.header["model"])
        self.states = _states(self.header, self.tensors)
        self.table = {name: TensorEntry(str(t.dtype), tuple(t.shape))
                      for name, t in self.tensors.items()}


@dataclass
class Tally:
    """What the fuzzer saw."""

    mutations: int = 0
    refused: int = 0
    unchanged: int = 0
    loaded: int = 0
    load_refused: int = 0
    steered_less: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def shipped() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return read_artifact(SHIPPED).raw, load_file(str(SHIPPED))


def _states(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Mean-pooled states per layer for :data:`PROMPTS`, as the probe member reads them."""
    layers = header["gate"]["members"][0]["config"]["layers"]
    mean, std = tensors["gate.0.mean"].float(), tensors["gate.0.std"].float()
    direction = torch.sign(tensors["gate.0.weight"].float())
    rows = torch.stack([mean + lean * std * direction for _, lean in PROMPTS])
    hidden = header["model"]["hidden_size"]
    states = {layer: torch.zeros(len(PROMPTS), hidden) for layer in
              range(header["model"]["num_layers"])}
    for i, layer in enumerate(layers):
        states[layer] = rows[:, i * hidden:(i + 1) * hidden]
    return states


def _format2(header: dict[str, Any], tensors: dict[str, torch.Tensor]
             ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The shipped artifact as format 2: its energy models on both sides, calibrated per
    side, with a refuse-side threshold."""
    two = json.loads(json.dumps(header))
    entry = {"layers": two.pop("layers"), "configs": two.pop("configs")}
    two.update(format="guardrail-energy/2",
               sides={"answer": entry, "refuse": json.loads(json.dumps(entry))})
    calibration = two["metadata"]["calibration"]
    calibration["sides"] = {"answer": {"steerer": {"eta": 1.0, "steps": 3}},
                            "refuse": {"steerer": {"eta": 0.5, "steps": 2}}}
    calibration["gate"]["above"] = 0.5
    renamed = {**{f"{side}.{k}": v.clone() for k, v in tensors.items() if k.startswith("layers.")
                  for side in ("answer", "refuse")},
               **{k: v for k, v in tensors.items() if k.startswith("gate.")}}
    return two, renamed


def _write(path: Path, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path), metadata={HEADER_KEY: json.dumps(header)})
    return path


class InMemory:
    """``EnergyArtifact.load`` with the file read skipped: the header being tried, checked as
    :func:`read_artifact` checks it (header, then tensor table), and the case's tensors.
    Energy-model layers whose config and tensors did not change are not rebuilt again."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.header: dict[str, Any] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.table: dict[str, TensorEntry] = {}
        self._layers: dict[tuple[str, str, int], Any] = {}
        real_layer = energy._load_layer
        loader = self

        def load(cls: type[EnergyArtifact], path: str | Path, registry: Any,
                 device: Any = "cpu") -> EnergyArtifact:
            checked = check_header(loader.header, str(path))
            check_tensor_table(checked, loader.table, str(path))
            return cls.assemble(ArtifactFile(checked, loader.header, loader.table),
                                loader.tensors, registry, path, device)

        def load_layer(model_cls: Any, config: dict[str, Any], own: dict[str, torch.Tensor],
                       hidden_size: int, where: str, prefix: str, device: Any = "cpu") -> Any:
            key = (prefix, json.dumps(config, sort_keys=True), hidden_size)
            if key not in loader._layers:
                loader._layers[key] = real_layer(model_cls, config, own, hidden_size, where,
                                                 prefix, device)
            return loader._layers[key]

        monkeypatch.setattr(EnergyArtifact, "load", classmethod(load))
        monkeypatch.setattr(energy, "_load_layer", load_layer)


def _build(case: Case, header: dict[str, Any], registry: Registry, memory: InMemory
           ) -> list[str | None]:
    """Load the artifact with this header through ``build_rail``; the gate's sides for
    :data:`PROMPTS`."""
    memory.header, memory.tensors, memory.table = header, case.tensors, case.table
    rail = build_rail(case.spec, 0, registry, case.fingerprint, torch.device("cpu"), case.name)
    assert rail.gate is not None
    scores = rail.gate.score([p for p, _ in PROMPTS], case.states,
                             case.fingerprint["num_layers"])
    return side_of(scores, rail.below, rail.above)


def _cases(tmp_path: Path, shipped: tuple[dict[str, Any], dict[str, torch.Tensor]],
           registry: Registry, memory: InMemory) -> list[Case]:
    header, tensors = shipped
    policy = load_policy(POLICY)
    base = policy.rails[0]
    assert base.gate is not None
    one = Case("format 1 (shipped)", header, tensors, base, tmp_path / "one.safetensors")
    two_header, two_tensors = _format2(header, tensors)
    two_spec = base.model_copy(update={"gate": base.gate.model_copy(update={"above": "auto"})})
    two = Case("format 2", two_header, two_tensors, two_spec, tmp_path / "two.safetensors")
    for case in (one, two):
        case.spec = case.spec.model_copy(update={"energy_model": case.spec.energy_model
                                                 .model_copy(update={"artifact": str(case.path)})})
        case.view = runtime_view(check_header(case.header, case.name))
        case.sides = _build(case, case.header, registry, memory)
    return [one, two]


def _fuzz(case: Case, registry: Registry, memory: InMemory, tally: Tally) -> None:
    for path in list(nodes(case.header)):
        light = dotted(path).startswith(INFORMATIONAL)
        for value in values_for(path):
            if path == ("format",) and value is DELETE:
                continue
            with mutation(case.header, path, value) as header:
                _try(case, header, path, value, light, registry, memory, tally)


def _try(case: Case, header: dict[str, Any], path: tuple[Any, ...], value: Any, light: bool,
         registry: Registry, memory: InMemory, tally: Tally) -> None:
    """One mutated header: refused cleanly, unchanged for the runtime, or loaded and gated."""
    label = f"{case.name}: {dotted(path)} = {'deleted' if value is DELETE else repr(value)}"
    tally.mutations += 1
    try:
        checked = check_header(header, case.name)
    except ArtifactError as exc:
        message = str(exc)
        if not message.startswith(f"{case.name}: header ") or len(message) > 2000:
            tally.failures.append(f"{label}: unclear error {message[:200]!r}")
        tally.refused += 1
        return
    except Exception as exc:
        tally.failures.append(f"{label}: {type(exc).__name__}: {exc}"[:300])
        return
    if runtime_view(checked) == case.view:
        tally.unchanged += 1
        return
    if light:
        tally.failures.append(f"{label}: informational field changed what runs")
        return
    try:
        sides = _build(case, header, registry, memory)
    except GuardrailError as exc:
        if str(case.path) not in str(exc) and case.name not in str(exc):
            tally.failures.append(f"{label}: error names no artifact: {str(exc)[:200]}")
        tally.load_refused += 1
        return
    except Exception as exc:
        tally.failures.append(f"{label}: traceback at load: {type(exc).__name__}: "
                              f"{str(exc)[:200]}")
        return
    tally.loaded += 1
    # The harmful prompt: treated as the original treats it, or left alone.
    if sides[0] not in (case.sides[0], None):
        tally.failures.append(f"{label}: the harmful prompt is steered towards {sides[0]!r} "
                              f"(originally {case.sides[0]!r})")
    if sides[0] is None and case.sides[0] is not None:
        tally.steered_less += 1


def test_every_artifact_header_mutation_is_refused_cleanly_or_keeps_the_gate(
    tmp_path: Path, shipped: tuple[dict[str, Any], dict[str, torch.Tensor]], registry: Registry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny tensor ops: threads only add overhead
    try:
        memory = InMemory(monkeypatch)
        cases = _cases(tmp_path, shipped, registry, memory)
        # The originals: format 1 leaves the harmful prompt alone and steers the clearly
        # benign one towards answering; format 2 also steers the harmful one towards refusing.
        assert cases[0].sides == [None, "answer", None], cases[0].sides
        assert cases[1].sides == ["refuse", "answer", None], cases[1].sides
        tally = Tally()
        for case in cases:
            _fuzz(case, registry, memory, tally)
    finally:
        torch.set_num_threads(threads)
    tally.seconds = time.perf_counter() - started
    print(f"\nartifact fuzz: {tally.mutations} mutations in {tally.seconds:.1f} s: "
          f"{tally.refused} refused at the header, {tally.unchanged} left what runs unchanged, "
          f"{tally.loaded} loaded and gated ({tally.steered_less} steering the harmful prompt "
          f"less), {tally.load_refused} refused at load")
    assert not tally.failures, "\n".join(tally.failures[:20])
    assert tally.refused + tally.load_refused > tally.mutations // 4 and tally.loaded > 0


ISSUE_CASES: list[tuple[str, tuple[Any, ...], Any, str]] = [
    # (case, key path, value, the field the error names)
    ("below Infinity", ("metadata", "calibration", "gate", "below"), math.inf,
     "metadata.calibration.gate.below': got inf"),
    ("below NaN", ("metadata", "calibration", "gate", "below"), math.nan,
     "metadata.calibration.gate.below': got nan"),
    ("below a string", ("metadata", "calibration", "gate", "below"), "low",
     "metadata.calibration.gate.below': got 'low'"),
    ("member weight NaN", ("gate", "members", 0, "weight"), math.nan,
     "gate.members[0].weight': got nan"),
    ("member std NaN", ("gate", "members", 1, "std"), math.nan, "gate.members[1].std': got nan"),
    ("gate a list", ("gate",), [], "'gate': got []"),
    ("gate mean a list", ("gate", "mean"), [1.0], "'gate.mean': got [1.0]"),
    ("gate report a string", ("gate", "report"), "x", "'gate.report': got 'x'"),
    ("calibration gate a list", ("metadata", "calibration", "gate"), [],
     "'metadata.calibration.gate': got []"),
    ("budget a list", ("metadata", "calibration", "budget"), [],
     "'metadata.calibration.budget': got []"),
    ("steerer a string", ("metadata", "calibration", "steerer"), "fast",
     "'metadata.calibration.steerer': got 'fast'"),
    ("negative eta", ("metadata", "calibration", "steerer", "eta"), -5,
     "'metadata.calibration.steerer.eta': got -5; expected greater than 0"),
    ("encoder /etc", ("gate", "members", 1, "params", "model"), "/etc",
     "'gate.members[1]' (sentence-embedding)"),
    ("gate mean shifted", ("gate", "mean"), 3.0, "'gate.mean': got 3.0"),
    ("member mean shifted", ("gate", "members", 0, "mean"), 40.0, "gate.members[0].mean': got 40.0"),
]


@pytest.mark.parametrize(("case", "path", "value", "named"), ISSUE_CASES,
                         ids=[c[0] for c in ISSUE_CASES])
def test_issue_cases_are_refused_by_validate_naming_artifact_and_field(
    tmp_path: Path, shipped: tuple[dict[str, Any], dict[str, torch.Tensor]], case: str,
    path: tuple[Any, ...], value: Any, named: str, capsys: pytest.CaptureFixture[str],
) -> None:
    from guardrail.cli import main

    header, tensors = shipped
    artifact = _write(tmp_path / "bad.safetensors", mutated(header, path, value), tensors)
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY.read_text().replace("../artifacts/eds-smollm2-135m.safetensors",
                                                 str(artifact)))
    assert main(["validate", str(policy)]) == 1
    err = capsys.readouterr().err
    assert f"{artifact}: header field " in err and named in err, err
    assert "Traceback" not in err and len(err) < 3000
