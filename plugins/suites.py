"""Built-in evaluation suites: XSTest, the OR-Bench and harmful validation splits, user files.

Data files are read from the data directory (``--data-dir``, ``$GUARDRAIL_DATA``, else
``../shared/data`` next to the project). A ``file`` suite reads any JSON/JSONL/CSV prompt file
whose rows carry a ``harmful`` flag, or applies one fixed label to every row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from guardrail import Register, hookimpl
from guardrail.errors import DataError
from guardrail.plugin.components import Suite, SuiteItem
from guardrail.prompts import Filter, load_prompts, read_rows, resolve_data_dir


@dataclass(frozen=True)
class SuiteFile:
    """One file of a data suite: its name, the label of its rows, the prompt column, a filter."""

    name: str
    harmful: bool
    field: str = "instruction"
    filter: Filter | None = None
    category_field: str = "category"


class DataSuiteParams(BaseModel):
    """Where the data files are (default: the project's data directory)."""

    model_config = ConfigDict(extra="forbid")
    data_dir: str | None = None


class DataSuite(Suite):
    """A suite made of files in the data directory, each with a fixed label."""

    Params = DataSuiteParams
    params: DataSuiteParams
    files: ClassVar[tuple[SuiteFile, ...]] = ()

    def load(self) -> list[SuiteItem]:
        root = resolve_data_dir(self.params.data_dir)
        items = []
        for spec in self.files:
            for record in load_prompts(root / spec.name, field=spec.field, filter=spec.filter):
                category = record.fields.get(spec.category_field)
                items.append(SuiteItem(
                    prompt=record.text, harmful=spec.harmful,
                    category=None if category in (None, "") else str(category),
                    meta={"file": spec.name, "row": record.index},
                ))
        return items


class XSTest(DataSuite):
    """XSTest v2: 250 safe prompts (benign) and 200 unsafe ``contrast_*`` prompts (harmful)."""

    name = "xstest"
    files = (
        SuiteFile("xstest_v2_prompts.csv", harmful=False, field="prompt",
                  filter={"type": {"not_prefix": "contrast_"}}, category_field="type"),
        SuiteFile("xstest_v2_prompts.csv", harmful=True, field="prompt",
                  filter={"type": {"prefix": "contrast_"}}, category_field="type"),
    )


class OrBenchHardVal(DataSuite):
    """OR-Bench-Hard validation split: benign prompts that look harmful (132)."""

    name = "orbench-val"
    files = (SuiteFile("or_bench_hard_val.json", harmful=False),)


class HarmfulVal(DataSuite):
    """The harmful validation split (39 clearly harmful requests)."""

    name = "harmful-val"
    files = (SuiteFile("harmful_val.json", harmful=True),)


class OrBenchToxicVal(DataSuite):
    """OR-Bench-Toxic validation split: harmful prompts in OR-Bench's style (150)."""

    name = "orbench-toxic-val"
    files = (SuiteFile("or_bench_toxic_val.json", harmful=True),)


class HarmfulValAll(DataSuite):
    """Both harmful validation files together (189)."""

    name = "harmful-val-all"
    files = HarmfulVal.files + OrBenchToxicVal.files


class HarmlessVal(DataSuite):
    """Alpaca validation instructions: ordinary benign requests (6,264; use ``--limit``)."""

    name = "harmless-val"
    files = (SuiteFile("harmless_val.json", harmful=False),)


TRUE_LABELS = frozenset({"true", "1", "yes", "y", "harmful", "unsafe"})
FALSE_LABELS = frozenset({"false", "0", "no", "n", "benign", "safe", "harmless"})


class FileSuiteParams(BaseModel):
    """A user prompt file; each row needs a harmful flag unless ``label`` fixes one for all."""

    model_config = ConfigDict(extra="forbid")
    path: str
    label: Literal["benign", "harmful"] | None = None
    field: str | None = Field(None, description="Prompt column; default instruction/prompt/text.")
    harmful_field: str = "harmful"


class FileSuite(Suite):
    """Prompts from a JSON, JSONL or CSV file of the user's."""

    name = "file"
    Params = FileSuiteParams
    params: FileSuiteParams

    def load(self) -> list[SuiteItem]:
        path = Path(self.params.path).expanduser()
        field = self.params.field or _prompt_field(path)
        items = []
        for record in load_prompts(path, field=field):
            harmful = self._label(path, record.index, record.fields)
            items.append(SuiteItem(prompt=record.text, harmful=harmful, category=record.category,
                                   meta={"file": str(path), "row": record.index}))
        return items

    def _label(self, path: Path, row: int, fields: dict[str, Any]) -> bool:
        if self.params.label is not None:
            return self.params.label == "harmful"
        key = self.params.harmful_field
        if key not in fields:
            raise DataError(
                f"{path}: row {row} has no {key!r} column (it has {sorted(fields)}); add a "
                f"harmful true/false column or give the suite a fixed label (PATH:benign, "
                f"PATH:harmful)"
            )
        value = str(fields[key]).strip().lower()
        if value in TRUE_LABELS:
            return True
        if value in FALSE_LABELS:
            return False
        raise DataError(
            f"{path}: row {row} column {key!r} is {fields[key]!r}; expected true/false "
            f"(or one of {sorted(TRUE_LABELS | FALSE_LABELS)})"
        )


def _prompt_field(path: Path) -> str:
    rows = read_rows(path)
    for candidate in ("instruction", "prompt", "text"):
        if rows and candidate in rows[0]:
            return candidate
    columns = sorted(rows[0]) if rows else []
    raise DataError(
        f"{path}: no prompt column found (columns: {columns}); expected one of "
        "instruction, prompt, text, or set the suite's `field`"
    )


@hookimpl
def guardrail_register_suites(register: Register) -> None:
    register(XSTest, aliases=("xstest-v2",))
    register(OrBenchHardVal, aliases=("orbench-hard-val",))
    register(HarmfulVal)
    register(OrBenchToxicVal)
    register(HarmfulValAll)
    register(HarmlessVal)
    register(FileSuite)
