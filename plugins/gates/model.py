"""The gate classes (they import torch); :mod:`guardrail_plugins.gates` registers them by path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from guardrail_plugins.gates import ProbeGateParams, SentenceEmbeddingGateParams, encoder_path
from pydantic import BaseModel

from guardrail.errors import PluginError
from guardrail.plugin.components import Gate
from guardrail.steering.capture import mean_over_prompt


class LogisticHead:
    """Class-balanced, L2-regularised logistic regression on standardised features (LBFGS).

    Deterministic: the same features give the same weights.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor) -> None:
        self.mean, self.std, self.weight, self.bias = mean, std, weight, bias

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor, l2: float,
            max_iter: int = 200) -> LogisticHead:
        """Fit on ``[n, d]`` features and boolean labels (both classes must be present)."""
        x = features.float()
        y = labels.float()
        positives = float(y.sum())
        if positives == 0 or positives == len(y):
            raise ValueError("a gate needs prompts of both contexts (benign and harmful) to fit")
        mean, std = x.mean(0), x.std(0).clamp_min(1e-4)
        z = (x - mean) / std
        # Each class carries half the loss, whatever the mix of prompts.
        sample = torch.where(y > 0.5, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
        weight = torch.zeros(z.shape[1], requires_grad=True)
        bias = torch.zeros(1, requires_grad=True)
        optimiser = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter,
                                      line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimiser.zero_grad()
            logits = z @ weight + bias
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, y, weight=sample, reduction="sum") / sample.sum()
            loss = loss + l2 * (weight * weight).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimiser.step(closure)
        return cls(mean, std, weight.detach(), bias.detach())

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return ((features.float() - self.mean) / self.std) @ self.weight + self.bias

    def tensors(self) -> dict[str, torch.Tensor]:
        """What an artifact stores."""
        return {"mean": self.mean, "std": self.std, "weight": self.weight, "bias": self.bias}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], where: str) -> LogisticHead:
        """Rebuild from :meth:`tensors` output."""
        missing = sorted({"mean", "std", "weight", "bias"} - set(tensors))
        if missing:
            raise PluginError(f"{where}: tensors {missing} missing")
        mean, std, weight, bias = (tensors[k].float() for k in ("mean", "std", "weight", "bias"))
        if (mean.dim() != 1 or std.shape != mean.shape or weight.shape != mean.shape
                or bias.numel() != 1):
            raise PluginError(f"{where}: tensor shapes mean {list(mean.shape)}, std "
                              f"{list(std.shape)}, weight {list(weight.shape)}, bias "
                              f"{list(bias.shape)}; expected three of one length and one bias")
        bad = [k for k, t in (("mean", mean), ("std", std), ("weight", weight), ("bias", bias))
               if not bool(torch.isfinite(t).all())]
        if bad or not bool((std > 0).all()):
            raise PluginError(f"{where}: tensors {bad or ['std']} hold NaN, infinite or (std) "
                              "non-positive values")
        return cls(mean, std, weight, bias.reshape(1))


class _HeadGate(Gate):
    """A gate that is a :class:`LogisticHead` on features of its own (:meth:`features`)."""

    params: ProbeGateParams | SentenceEmbeddingGateParams

    def __init__(self, params: BaseModel | None = None) -> None:
        super().__init__(params)
        self.head: LogisticHead | None = None

    def features(self, prompts: Sequence[str], states: torch.Tensor | None) -> torch.Tensor:
        """``[n, dim]`` features of the prompts (raise :class:`PluginError` if unusable)."""
        raise NotImplementedError

    def fit(self, prompts: Sequence[str], states: torch.Tensor | None,
            harmful: torch.Tensor) -> None:
        self.head = LogisticHead.fit(self.features(prompts, states), harmful, self.params.l2)

    def score(self, prompts: Sequence[str], states: torch.Tensor | None) -> torch.Tensor:
        if self.head is None:
            raise PluginError(f"gate {self.name!r} scored before it was fitted")
        return self.head(self.features(prompts, states))

    def tensors(self) -> dict[str, torch.Tensor]:
        assert self.head is not None
        return self.head.tensors()

    @classmethod
    def from_artifact(cls, params: BaseModel, config: dict[str, Any],
                      tensors: dict[str, torch.Tensor]) -> Gate:
        gate = cls(params)
        gate.restore(config)
        gate.head = LogisticHead.from_tensors(tensors, f"gate {cls.name!r}")
        return gate

    def restore(self, config: dict[str, Any]) -> None:
        """Take back what :meth:`config` stored (default: nothing)."""

    def fitted_mean(self) -> float | None:
        # The head standardises features on the training prompts, so their mean logit is
        # the bias.
        return float(self.head.bias.reshape(-1)[0]) if self.head is not None else None


class ProbeGate(_HeadGate):
    """A linear probe on the model's mean-pooled prompt states at several layers."""

    name = "probe"
    Params = ProbeGateParams
    params: ProbeGateParams

    def __init__(self, params: BaseModel | None = None) -> None:
        super().__init__(params)
        self._layers: list[int] | None = None

    def state_layers(self, num_layers: int) -> list[int]:
        # Fixed by the first call (the model's depth): a fitted probe reads these layers only.
        wanted = self._wanted(num_layers)
        if self._layers is None:
            self._layers = wanted
        elif self._layers != wanted:
            raise PluginError(f"gate 'probe': fitted on layers {self._layers}, but its params "
                              f"(layers: {self.params.layers!r}) name {wanted} in a "
                              f"{num_layers}-layer model")
        return self._layers

    def _wanted(self, num_layers: int) -> list[int]:
        if self.params.layers == "middle":
            return list(range(num_layers // 3, (4 * num_layers) // 5 + 1))
        bad = [layer for layer in self.params.layers if not 0 <= layer < num_layers]
        if bad or not self.params.layers:
            raise PluginError(f"gate 'probe': layers {self.params.layers!r}; expected "
                              f"indices in 0..{num_layers - 1}")
        return sorted(set(self.params.layers))

    def features(self, prompts: Sequence[str], states: torch.Tensor | None) -> torch.Tensor:
        if states is None or self._layers is None:
            raise PluginError("gate 'probe' reads prompt states; none were given")
        return states.flatten(1)

    def config(self) -> dict[str, Any]:
        return {"layers": self._layers}

    def restore(self, config: dict[str, Any]) -> None:
        layers = config.get("layers")
        if (not isinstance(layers, list) or not layers or len(set(layers)) != len(layers)
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                           for v in layers)):
            raise PluginError(f"gate 'probe': config 'layers' is {str(layers)[:80]}; expected "
                              "the distinct layer indices it was fitted on")
        self._layers = list(layers)


class SentenceEmbeddingGate(_HeadGate):
    """A linear probe on an external encoder's mean-pooled, normalised embedding of the prompt."""

    name = "sentence-embedding"
    Params = SentenceEmbeddingGateParams
    params: SentenceEmbeddingGateParams

    def __init__(self, params: BaseModel | None = None) -> None:
        super().__init__(params)
        self._encoder: Any = None

    def features(self, prompts: Sequence[str], states: torch.Tensor | None) -> torch.Tensor:
        return self.embed(prompts)

    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[n, dim]`` unit embeddings of ``prompts`` (remembered per encoder and text, so a
        refit on the same prompts, as cross-family calibration does, encodes nothing twice)."""
        memo = _EMBEDDINGS.setdefault((self.params.model, self.params.max_length), {})
        todo = list(dict.fromkeys(p for p in prompts if p not in memo))
        if todo:
            tokenizer, model = self._load()
            with torch.no_grad():
                for start in range(0, len(todo), self.params.batch_size):
                    batch = todo[start : start + self.params.batch_size]
                    enc = tokenizer(batch, padding=True, truncation=True,
                                    max_length=self.params.max_length, return_tensors="pt")
                    pooled = mean_over_prompt(model(**enc).last_hidden_state,
                                              enc["attention_mask"])
                    for text, row in zip(batch, torch.nn.functional.normalize(pooled, dim=-1),
                                         strict=True):
                        memo[text] = row
        if not prompts:
            return torch.zeros(0, 1)
        out = torch.stack([memo[p] for p in prompts])
        if len(memo) > _MEMO_LIMIT:
            for text in list(memo)[: len(memo) - _MEMO_LIMIT]:
                del memo[text]
        return out

    def _load(self) -> Any:
        if self._encoder is None:
            from transformers import AutoModel, AutoTokenizer

            path = encoder_path(self.params.model, gate=self.name)
            self._encoder = (AutoTokenizer.from_pretrained(str(path)),
                             AutoModel.from_pretrained(str(path)).eval())
        return self._encoder

    def config(self) -> dict[str, Any]:
        return {"model": self.params.model}

    def resources(self) -> list[str]:
        return [self.params.model]

    def restore(self, config: dict[str, Any]) -> None:
        if config.get("model", self.params.model) != self.params.model:
            raise PluginError(f"gate {self.name!r}: fitted with encoder "
                              f"{str(config.get('model'))[:80]!r}, but its params name "
                              f"{self.params.model[:80]!r}")
        encoder_path(self.params.model, gate=self.name)  # a missing encoder fails at load


_EMBEDDINGS: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
_MEMO_LIMIT = 50_000
