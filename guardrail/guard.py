"""``Guardrail``: a policy's model, rails and classifier, with steered generation."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from guardrail.components import ActivationSource, RefusalClassifier, Steerer, Verdict
from guardrail.energy import EnergyArtifact
from guardrail.errors import ArtifactError, PolicyError
from guardrail.plugins import Registry, get_plugin_manager
from guardrail.policy import Policy, RailSpec, check_plugins, load_policy
from guardrail.steering import Rail, SteeringSession, log_nonfinite
from guardrail.telemetry import GenerationTelemetry, ensure_logging

log = structlog.get_logger("guardrail")

Conversation = list[dict[str, str]]


@dataclass
class GenerationResult:
    """One answer: its text, token ids, why it stopped, and what steering did."""

    text: str
    token_ids: list[int]
    finish_reason: str
    telemetry: GenerationTelemetry


class Guardrail:
    """A loaded policy: model, tokenizer, steering rails and refusal classifier."""

    def __init__(
        self,
        policy: Policy,
        loaded: Any,
        rails: list[Rail],
        classifier: RefusalClassifier,
        registry: Registry,
        plugin_manager: Any,
    ) -> None:
        self.policy = policy
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.rails = rails
        self.classifier = classifier
        self.registry = registry
        self.plugin_manager = plugin_manager

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_policy(
        cls,
        policy: Policy | str | Path,
        *,
        loaded: Any = None,
        device: str | None = None,
        plugin_manager: Any = None,
    ) -> Guardrail:
        """Load a policy file (or object), its model (unless ``loaded`` is given) and artifacts."""
        ensure_logging()
        if not isinstance(policy, Policy):
            policy = load_policy(policy)
        pm = plugin_manager or get_plugin_manager()
        registry = Registry.from_plugin_manager(pm)
        where = str(policy.path or policy.name)
        problems = check_plugins(policy, registry)
        if problems:
            raise PolicyError(where, problems)
        if loaded is None:
            from guardrail.models import load_model

            loaded = load_model(
                policy.model.source, device=device or policy.model.device, dtype=policy.model.dtype
            )
        from guardrail.models import model_fingerprint

        fingerprint = model_fingerprint(loaded.model, loaded.name)
        rails = [
            build_rail(spec, index, registry, fingerprint, loaded.device, where)
            for index, spec in enumerate(policy.rails)
            if spec.enabled
        ]
        classifier = registry.create(
            "refusal_classifier", policy.classifier.plugin, policy.classifier.params
        )
        assert isinstance(classifier, RefusalClassifier)
        log.info(
            "guardrail.loaded",
            policy=policy.name,
            model=loaded.name,
            rails=[{"name": r.name, "layers": r.layers, **({"disabled": r.disabled}
                                                           if r.disabled else {})}
                   for r in rails],
        )
        return cls(policy, loaded, rails, classifier, registry, pm)

    # --- prompts ------------------------------------------------------------------------------
    def prepare(self, conversation: Conversation, *, steer: bool = True) -> Conversation:
        """Apply the policy's system prompt and prompt-level steerers to a conversation."""
        conversation = [dict(m) for m in conversation]
        system = self.policy.model.system_prompt
        if system is not None and not any(m.get("role") == "system" for m in conversation):
            conversation.insert(0, {"role": "system", "content": system})
        if steer:
            for rail in self.rails:
                conversation = rail.steerer.prepare_conversation(conversation)
        return conversation

    def render(self, conversations: Sequence[Conversation], *, steer: bool = True) -> list[str]:
        """Chat-template each conversation into the prompt text the model sees."""
        return [
            self.tokenizer.apply_chat_template(
                self.prepare(c, steer=steer), tokenize=False, add_generation_prompt=True
            )
            for c in conversations
        ]

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise rendered prompts with left padding, on the model's device."""
        enc = self.tokenizer(
            list(texts), return_tensors="pt", padding=True, add_special_tokens=False
        )
        return {k: v.to(self.loaded.device) for k, v in enc.items()}

    # --- generation ---------------------------------------------------------------------------
    def session(self, *, steer: bool = True, measure_only: bool = False) -> SteeringSession:
        """A steering session over this guardrail's rails (no rails when ``steer`` is false)."""
        on_step = None
        if self.plugin_manager.hook.guardrail_on_step.get_hookimpls():

            def on_step(event: Any) -> None:
                self.plugin_manager.hook.guardrail_on_step(event=event)

        return SteeringSession(
            self.model,
            self.rails if steer or measure_only else [],
            measure_only=measure_only,
            on_step=on_step,
        )

    def generate(
        self,
        conversations: Sequence[Conversation],
        *,
        steer: bool = True,
        classify: bool = False,
        progress: bool = False,
        streamer: Any = None,
        **overrides: Any,
    ) -> list[GenerationResult]:
        """Generate an answer per conversation; ``steer=False`` gives the unsteered model.

        ``overrides`` replace the policy's generation defaults (max_new_tokens, do_sample,
        temperature, top_p, top_k, repetition_penalty, batch_size, seed).
        """
        settings = self.policy.generation.model_copy(
            update={k: v for k, v in overrides.items() if v is not None}
        )
        texts = self.render(conversations, steer=steer)
        lengths = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        results: list[GenerationResult | None] = [None] * len(texts)
        batches = [
            order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)
        ]
        bar = _progress(len(texts), progress, "generate (steered)" if steer else "generate (base)")
        for batch in batches:
            started = time.perf_counter()
            outs = self._generate_batch([texts[i] for i in batch], steer, settings, streamer)
            seconds = time.perf_counter() - started
            for i, out in zip(batch, outs, strict=True):
                out.telemetry.seconds = seconds / len(batch)
                results[i] = out
            bar.update(len(batch))
        bar.close()
        final = [r for r in results if r is not None]
        if classify:
            verdicts = self.classify(
                [_last_user(c) for c in conversations], [r.text for r in final]
            )
            for result, verdict in zip(final, verdicts, strict=True):
                result.telemetry.verdict = {
                    "refused": verdict.refused,
                    "score": verdict.score,
                    "reason": verdict.reason,
                }
        for result in final:
            self.plugin_manager.hook.guardrail_on_generation(
                telemetry=result.telemetry, extra={"policy": self.policy.name}
            )
            log.debug("generation", policy=self.policy.name, **result.telemetry.summary())
        return final

    def generate_batch(
        self,
        conversations: Sequence[Conversation],
        *,
        steer: bool = True,
        streamer: Any = None,
        stopping_criteria: Any = None,
        **overrides: Any,
    ) -> list[GenerationResult]:
        """Generate for exactly these conversations as ONE batch, in the order given (serving).

        Unlike :meth:`generate` nothing is sorted or split by ``batch_size`` and nothing is
        classified. ``stopping_criteria`` (a transformers ``StoppingCriteriaList``) may end rows
        early; their results then still read as the tokens up to the first end-of-sequence.
        """
        settings = self.policy.generation.model_copy(
            update={k: v for k, v in overrides.items() if v is not None}
        )
        texts = self.render(conversations, steer=steer)
        started = time.perf_counter()
        results = self._generate_batch(texts, steer, settings, streamer, stopping_criteria)
        seconds = time.perf_counter() - started
        for result in results:
            result.telemetry.seconds = seconds / max(len(results), 1)
            self.plugin_manager.hook.guardrail_on_generation(
                telemetry=result.telemetry, extra={"policy": self.policy.name}
            )
        return results

    def _generate_batch(
        self,
        texts: list[str],
        steer: bool,
        settings: Any,
        streamer: Any,
        stopping_criteria: Any = None,
    ) -> list[GenerationResult]:
        enc = self.encode(texts)
        prompt_len = enc["input_ids"].shape[1]
        kwargs: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": settings.do_sample,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if settings.do_sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
            if settings.top_k is not None:
                kwargs["top_k"] = settings.top_k
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
        else:
            # Silence sampling defaults from the model's generation_config under greedy decoding.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if settings.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = settings.repetition_penalty
        if streamer is not None:
            kwargs["streamer"] = streamer
        if stopping_criteria is not None:
            kwargs["stopping_criteria"] = stopping_criteria
        with self.session(steer=steer) as session, torch.no_grad():
            output = self.model.generate(**enc, **kwargs)
        eos = eos_ids(self.model, self.tokenizer)
        results = []
        lengths = []
        for row in output[:, prompt_len:].tolist():
            ids = []
            finish = "length"
            for token in row:
                if token in eos:
                    finish = "stop"
                    break
                ids.append(token)
            lengths.append(len(ids) + (1 if finish == "stop" else 0))
            results.append((ids, finish))
        per_row = session.telemetry(lengths)
        log_nonfinite(per_row, policy=self.policy.name)
        prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
        return [
            GenerationResult(
                text=self.tokenizer.decode(ids, skip_special_tokens=True),
                token_ids=ids,
                finish_reason=finish,
                telemetry=GenerationTelemetry(
                    steered=steer and bool(self.rails),
                    policy=self.policy.name,
                    prompt_tokens=int(prompt_tokens[row]),
                    completion_tokens=len(ids),
                    layers=per_row[row],
                ),
            )
            for row, (ids, finish) in enumerate(results)
        ]

    # --- scoring ------------------------------------------------------------------------------
    def energies(
        self, conversations: Sequence[Conversation], *, batch_size: int | None = None
    ) -> list[GenerationTelemetry]:
        """Energies at the last prompt token per rail and layer, without generating or steering."""
        texts = self.render(conversations, steer=True)
        size = batch_size or self.policy.generation.batch_size
        out: list[GenerationTelemetry] = []
        for start in range(0, len(texts), size):
            enc = self.encode(texts[start : start + size])
            with self.session(measure_only=True) as session, torch.no_grad():
                self.model(**enc, use_cache=False)
            rows = session.telemetry([0] * enc["input_ids"].shape[0])
            log_nonfinite(rows, policy=self.policy.name)
            for layers in rows:
                out.append(
                    GenerationTelemetry(steered=False, policy=self.policy.name, layers=layers)
                )
        return out

    def classify(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        """The policy's refusal classifier C(X, Y)."""
        try:
            return self.classifier.classify(prompts, responses)
        except Exception as exc:
            from guardrail.errors import PluginError

            raise PluginError(
                f"refusal classifier {self.policy.classifier.plugin!r} raised in classify: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    @contextlib.contextmanager
    def attach(self, model: Any = None) -> Iterator[SteeringSession]:
        """Steer ``model.generate(...)`` / forward calls on a model object of your own.

        The model must be the one the artifacts were trained for (checked by fingerprint).
        """
        target = model if model is not None else self.model
        if target is not self.model:
            from guardrail.models import model_fingerprint

            fingerprint = model_fingerprint(target, self.loaded.name)
            for rail in self.rails:
                if rail.energies:
                    EnergyArtifact.compare(rail.fingerprint, fingerprint, f"rail {rail.name!r}")
        session = SteeringSession(target, self.rails)
        with session:
            yield session


def build_rail(
    spec: RailSpec,
    index: int,
    registry: Registry,
    fingerprint: dict[str, Any],
    device: torch.device,
    where: str,
) -> Rail:
    """Instantiate one rail's components and load its energy-model artifact."""
    key = f"rails[{index}]"
    source = registry.create(
        "activation_source", spec.activation_source.plugin, spec.activation_source.params
    )
    steerer = registry.create("steerer", spec.steerer.plugin, spec.steerer.params)
    energies = {}
    disabled: dict[int, str] = {}
    layers: list[int] = [] if spec.layers == "auto" else list(spec.layers)
    if spec.energy_model is not None:
        if spec.energy_model.artifact is None:
            raise PolicyError(where, [f"{key}.energy_model.artifact: missing; train one first"])
        artifact_path = spec.energy_model.artifact
        try:
            artifact = EnergyArtifact.load(artifact_path, registry, device=device)
        except ArtifactError as exc:
            raise ArtifactError(f"{where}: {key}.energy_model.artifact: {exc}") from exc
        artifact.check_model(fingerprint, f"{where}: {key}.energy_model.artifact {artifact_path}")
        if spec.layers == "auto":
            layers = sorted({*artifact.layers, *artifact.disabled})
        stored = sorted({*artifact.layers, *artifact.disabled})
        missing = [layer for layer in layers if layer not in stored]
        if missing:
            raise PolicyError(
                where,
                [f"{key}.layers: {missing} are not in the artifact {artifact_path} "
                 f"(it has {stored})"],
            )
        disabled = {layer: artifact.disabled[layer] for layer in layers
                    if layer in artifact.disabled}
        layers = [layer for layer in layers if layer not in disabled]
        if not layers:
            raise ArtifactError(
                f"{where}: {key}.energy_model.artifact {artifact_path}: every layer the rail "
                f"steers is disabled ({', '.join(f'{k}: {v}' for k, v in disabled.items())})"
            )
        energies = {layer: artifact.models[layer] for layer in layers}
    elif spec.layers == "auto":
        layers = list(range(int(fingerprint.get("num_layers") or 0)))
    assert isinstance(source, ActivationSource) and isinstance(steerer, Steerer)
    rail = Rail(
        name=spec.name,
        layers=layers,
        source=source,
        steerer=steerer,
        energies=energies,
        plugins={
            "activation_source": spec.activation_source.plugin,
            "steerer": spec.steerer.plugin,
        },
        fingerprint=fingerprint,
        disabled=disabled,
    )
    return rail


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Token ids that end an answer (the generation config's and the tokenizer's)."""
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(value)
    return ids


def _last_user(conversation: Conversation) -> str:
    users = [m.get("content", "") for m in conversation if m.get("role") == "user"]
    return users[-1] if users else ""


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="prompt")
