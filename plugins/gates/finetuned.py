"""The ``fine-tuned-encoder`` gate: a sentence encoder fine-tuned end to end to tell harmful
requests from benign ones, with low-rank adapters (LoRA) on every linear layer of its
transformer and a linear head on the mean-pooled output.

A logistic probe on frozen embeddings cannot learn what the encoder never separated (a
request for a weapon vs a question about one); fine-tuning the encoder can. Adapters keep the
fitted gate small: the base encoder comes from its package, the artifact stores only the
adapters' ``A``/``B`` matrices and the head (about 1 MB in float16 for all-MiniLM-L6-v2 at
rank 16), plus a digest of the base weights so an artifact is never applied to another encoder.

Training is deterministic for a seed: length-bucketed batches in a seeded order, class-weighted
binary cross-entropy (each class carries half the loss), AdamW with linear warm-up and decay.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from typing import Any

import structlog
import torch
from guardrail_plugins.gates import FineTunedEncoderGateParams
from guardrail_plugins.gates.model import encoder_path
from pydantic import BaseModel
from torch import nn

from guardrail.console import progress_bar
from guardrail.errors import PluginError
from guardrail.plugin.components import Gate
from guardrail.steering.capture import mean_over_prompt

log = structlog.get_logger("guardrail.gates")


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(dropout(x)))``; the base layer stays frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.A = nn.Parameter(torch.empty(rank, base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))
        bound = 1.0 / math.sqrt(base.in_features)
        with torch.no_grad():
            self.A.uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.A.t() @ self.B.t()) * self.scale


def _targets(model: nn.Module, suffixes: Sequence[str]) -> list[str]:
    """Names of the encoder's linear layers whose name ends with one of ``suffixes``."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith("encoder.")
            and any(name.endswith(s) for s in suffixes)]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def base_digest(model: nn.Module) -> str:
    """A digest of the encoder's weights: which base an adapter set was trained on."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().reshape(-1)[:2048].numpy().tobytes())
    return digest.hexdigest()[:16]


class FineTunedEncoderGate(Gate):
    """A sentence encoder with LoRA adapters and a linear head; see the module docstring."""

    name = "fine-tuned-encoder"
    Params = FineTunedEncoderGateParams
    params: FineTunedEncoderGateParams

    def __init__(self, params: BaseModel | None = None) -> None:
        super().__init__(params)
        self._tokenizer: Any = None
        self._encoder: nn.Module | None = None
        self._adapters: dict[str, torch.Tensor] = {}
        self._head: dict[str, torch.Tensor] = {}
        self._digest: str | None = None
        self.report: dict[str, Any] = {}

    # --- the base encoder -----------------------------------------------------------------------
    def _load_base(self) -> tuple[Any, nn.Module]:
        from transformers import AutoModel, AutoTokenizer

        path = encoder_path(self.params.model, gate=self.name)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModel.from_pretrained(str(path)).float().eval().requires_grad_(False)
        return tokenizer, model

    def _tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        assert self._tokenizer is not None
        enc = self._tokenizer(list(prompts), truncation=True, max_length=self.params.max_length)
        return list(enc["input_ids"])

    def _batch(self, ids: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(row) for row in ids)
        pad = self._tokenizer.pad_token_id or 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    @staticmethod
    def _pooled(encoder: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = encoder(**batch).last_hidden_state
        return mean_over_prompt(out, batch["attention_mask"])

    # --- fitting --------------------------------------------------------------------------------
    def fit(self, prompts: Sequence[str], states: torch.Tensor | None,
            harmful: torch.Tensor) -> None:
        p = self.params
        y = harmful.float()
        positives = float(y.sum())
        if positives == 0 or positives == len(y):
            raise ValueError("a gate needs prompts of both contexts (benign and harmful) to fit")
        started = time.perf_counter()
        previous_threads = torch.get_num_threads()
        if p.threads:
            torch.set_num_threads(p.threads)
        try:
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                torch.manual_seed(p.seed)
                self._train(prompts, y)
        finally:
            torch.set_num_threads(previous_threads)
        self.report = {"prompts": len(prompts), "harmful": int(positives),
                       "epochs": p.epochs, "seconds": round(time.perf_counter() - started, 1)}
        log.info("gate.fine_tuned", gate=self.name, **self.report)

    def _train(self, prompts: Sequence[str], y: torch.Tensor) -> None:
        p = self.params
        generator = torch.Generator().manual_seed(p.seed)
        self._tokenizer, encoder = self._load_base()
        self._digest = base_digest(encoder)
        names = _targets(encoder, p.targets)
        if not names:
            raise PluginError(f"gate {self.name!r}: no linear layer of {p.model!r} matches "
                              f"targets {p.targets}")
        wrapped = {}
        for name in names:
            linear = encoder.get_submodule(name)
            assert isinstance(linear, nn.Linear)  # _targets names linear layers only
            layer = LoRALinear(linear, p.rank, p.alpha, p.dropout, generator)
            _set(encoder, name, layer)
            wrapped[name] = layer
        hidden = int(encoder.config.hidden_size)  # type: ignore[union-attr,arg-type]
        head = nn.Linear(hidden, 1)
        with torch.no_grad():
            head.weight.normal_(0.0, 0.02, generator=generator)
            head.bias.zero_()
        adapter_params = [t for layer in wrapped.values() for t in (layer.A, layer.B)]
        optimiser = torch.optim.AdamW(
            [{"params": adapter_params, "lr": p.lr},
             {"params": list(head.parameters()), "lr": p.head_lr}],
            weight_decay=p.weight_decay)
        ids = self._tokenize(prompts)
        batches = _length_batches(ids, p.batch_size)
        total = p.epochs * len(batches)
        warmup = max(1, total // 10)
        def rate(step: int) -> float:  # linear warm-up, then linear decay to 0
            return min((step + 1) / warmup, max(0.0, (total - step) / max(total - warmup, 1)))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, rate)
        # Each class carries half the loss, whatever the mix of prompts.
        weights = torch.where(y > 0.5, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
        encoder.train()
        bar = progress_bar(total, p.progress, f"fine-tune gate ({p.model})", "batch")
        try:
            for _ in range(p.epochs):
                for b in torch.randperm(len(batches), generator=generator).tolist():
                    rows = batches[b]
                    batch = self._batch([ids[i] for i in rows])
                    logits = head(self._pooled(encoder, batch)).squeeze(-1)
                    index = torch.tensor(rows)
                    loss = nn.functional.binary_cross_entropy_with_logits(
                        logits, y[index], weight=weights[index], reduction="sum"
                    ) / weights[index].sum()
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    schedule.step()
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
        finally:
            bar.close()
        self._adapters = {}
        for name, layer in wrapped.items():
            self._adapters[f"{name}.A"] = layer.A.detach().clone()
            self._adapters[f"{name}.B"] = layer.B.detach().clone()
        self._head = {"weight": head.weight.detach().reshape(-1).clone(),
                      "bias": head.bias.detach().clone()}
        self._encoder = None  # rebuilt from the base with the adapters merged, on first score

    # --- scoring ----------------------------------------------------------------------------------
    def _merged(self) -> nn.Module:
        """The base encoder with the adapters merged into its weights (no extra cost per call)."""
        if self._encoder is None:
            tokenizer, encoder = self._load_base()
            if self._digest is not None and base_digest(encoder) != self._digest:
                raise PluginError(
                    f"gate {self.name!r}: the encoder {self.params.model!r} installed here is "
                    f"not the one the adapters were trained on (weights digest "
                    f"{base_digest(encoder)} vs {self._digest}); retrain the gate")
            scale = self.params.alpha / self.params.rank
            with torch.no_grad():
                for key, a in self._adapters.items():
                    if not key.endswith(".A"):
                        continue
                    name = key[: -len(".A")]
                    b = self._adapters[f"{name}.B"]
                    linear = encoder.get_submodule(name)
                    linear.weight += scale * (b.float() @ a.float())
            self._tokenizer, self._encoder = tokenizer, encoder.eval()
        return self._encoder

    def score(self, prompts: Sequence[str], states: torch.Tensor | None) -> torch.Tensor:
        if not self._head:
            raise PluginError(f"gate {self.name!r} scored before it was fitted")
        if not prompts:
            return torch.zeros(0)
        encoder = self._merged()
        ids = self._tokenize(prompts)
        out = torch.zeros(len(prompts))
        weight, bias = self._head["weight"].float(), self._head["bias"].float()
        with torch.no_grad():
            for rows in _length_batches(ids, self.params.batch_size * 2):
                pooled = self._pooled(encoder, self._batch([ids[i] for i in rows]))
                out[torch.tensor(rows)] = pooled @ weight + bias
        return out

    # --- artifacts --------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"model": self.params.model, "base_digest": self._digest,
                "adapters": sorted(k[: -len(".A")] for k in self._adapters if k.endswith(".A")),
                "report": self.report}

    def resources(self) -> list[str]:
        return [self.params.model]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"adapter.{k}": v for k, v in self._adapters.items()},
                **{f"head.{k}": v for k, v in self._head.items()}}

    @classmethod
    def from_artifact(cls, params: BaseModel, config: dict[str, Any],
                      tensors: dict[str, torch.Tensor]) -> Gate:
        gate = cls(params)
        encoder_path(gate.params.model, gate=cls.name)  # a missing encoder fails at load
        names = config.get("adapters")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise PluginError(f"gate {cls.name!r}: config 'adapters' must be a list of layer "
                              f"names; got {names!r}")
        wanted = {f"adapter.{n}.{m}" for n in names for m in ("A", "B")} | {"head.weight",
                                                                             "head.bias"}
        missing = sorted(wanted - set(tensors))
        extra = sorted(set(tensors) - wanted)
        if missing or extra:
            raise PluginError(f"gate {cls.name!r}: tensors missing {missing[:4]} or unexpected "
                              f"{extra[:4]}")
        for name in names:
            a, b = tensors[f"adapter.{name}.A"], tensors[f"adapter.{name}.B"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != gate.params.rank \
                    or b.shape[1] != gate.params.rank:
                raise PluginError(f"gate {cls.name!r}: adapter {name} has shapes "
                                  f"{list(a.shape)} / {list(b.shape)}; expected rank "
                                  f"{gate.params.rank}")
        gate._adapters = {k[len("adapter."):]: v.float() for k, v in tensors.items()
                          if k.startswith("adapter.")}
        gate._head = {"weight": tensors["head.weight"].float().reshape(-1),
                      "bias": tensors["head.bias"].float().reshape(-1)}
        digest = config.get("base_digest")
        gate._digest = digest if isinstance(digest, str) else None
        gate.report = dict(config.get("report") or {})
        return gate


def _length_batches(ids: Sequence[list[int]], size: int) -> list[list[int]]:
    """Row indices in batches of similar length (little padding), in length order."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    return [order[i : i + size] for i in range(0, len(order), size)]
