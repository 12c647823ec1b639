"""The ``training.executor`` section of a policy file (pydantic only: no Ray, no torch)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

EXECUTORS = ("local", "ray")


class ExecutorSettings(BaseModel):
    """Where the per-prompt work of ``train``, ``calibrate`` and ``eval`` runs.

    ``local`` (the default) runs it in the command's own process. ``ray`` splits the
    prompts into shards and runs each on a Ray actor holding one model replica; the
    command-line options ``--executor``, ``--ray-address``, ``--ray-workers``,
    ``--ray-cpus-per-worker`` and ``--ray-gpus-per-worker`` override these values.
    ``executor: ray`` is short for ``executor: {kind: ray}``.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Literal["local", "ray"] = Field("local", description="local or ray.")
    address: str | None = Field(
        None, description="Ray cluster address ('auto', 'ray://host:10001', 'host:6379'); "
        "unset: start a Ray instance on this machine for the run.")
    workers: int = Field(2, ge=1, le=4096, description="Actors, each holding one model replica.")
    cpus_per_worker: float = Field(1.0, gt=0, le=1024,
                                   description="CPUs each actor reserves (and torch threads).")
    gpus_per_worker: float = Field(0.0, ge=0, le=64,
                                   description="GPUs each actor reserves (0: the model on CPU).")
    max_retries: int = Field(
        3, ge=0, le=100, description="Restarts of a lost actor, and retries of the shard it "
        "was working on, before the run stops (what finished stays cached).")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"kind": data} if isinstance(data, str) else data
