"""``Guardrail``: a policy's model, rails and classifier, with steered generation.

The model is the policy's (``Guardrail.from_policy(policy)``) or one the caller loaded
(``from_policy(policy, model=..., tokenizer=...)``); ``attach()`` steers a model object's own
``generate`` and forward calls, and ``stream()`` yields an answer's text as it is generated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import torch

from guardrail.console import ensure_logging
from guardrail.errors import GuardrailError, PluginError, PolicyError
from guardrail.models.fingerprint import model_fingerprint
from guardrail.plugin.components import ActivationSource, OutputRail, RefusalClassifier, Verdict
from guardrail.plugin.manager import PluginManager, get_plugin_manager
from guardrail.plugin.registry import Registry
from guardrail.policy.checks import check_plugins
from guardrail.policy.model import GenerationSection, Policy, load_policy
from guardrail.steering.attach import attached
from guardrail.steering.batches import answer_in_batches, batches, energies, prompt_states
from guardrail.steering.build import (
    build_rail,
    create_classifier,
    create_output_rails,
    variant_rails,
)
from guardrail.steering.gating import Decisions, decide
from guardrail.steering.generation import (
    Conversation,
    GenerationResult,
    last_user,
    merge_settings,
)
from guardrail.steering.hooks import SteeringSession
from guardrail.steering.output_rails import review_answers
from guardrail.steering.prerequisites import check_installed, missing_resources
from guardrail.steering.rails import Rail, RailsByStrength
from guardrail.steering.streams import GenerationStream
from guardrail.telemetry import GenerationTelemetry, StepEvent

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from guardrail.models.loading import LoadedModel

__all__ = ["GenerationResult", "Guardrail"]

log = structlog.get_logger("guardrail")


class Guardrail:
    """A loaded policy: model, tokenizer, steering rails and refusal classifier.

    ``fingerprint`` identifies the loaded model's architecture (what artifacts must match).
    """

    def __init__(
        self,
        policy: Policy,
        loaded: LoadedModel,
        rails: list[Rail],
        classifier: RefusalClassifier,
        registry: Registry,
        plugin_manager: PluginManager,
        fingerprint: dict[str, Any],
        output_rails: Sequence[OutputRail] = (),
    ) -> None:
        self.policy = policy
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.rails = rails
        self.classifier = classifier
        self.registry = registry
        self.plugin_manager = plugin_manager
        self.fingerprint = fingerprint
        self._strengths = RailsByStrength(rails)
        #: The policy's output rails, in order (:mod:`guardrail.steering.output_rails`).
        self.output_rails = list(output_rails)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_policy(
        cls,
        policy: Policy | str | Path,
        *,
        model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        loaded: LoadedModel | None = None,
        device: str | None = None,
        plugin_manager: PluginManager | None = None,
    ) -> Guardrail:
        """Load a policy (a file, a shipped policy's name, or a :class:`Policy`), its rails'
        artifacts and, unless given, its model.

        ``model`` and ``tokenizer``: a Hugging Face causal LM and its tokenizer that you
        loaded yourself (any dtype, quantised or not, on any device); the policy's
        ``model:`` section is then not used, and neither object is changed. The artifacts
        must have been trained for this model's architecture (checked by fingerprint).
        ``loaded`` is a :class:`~guardrail.models.LoadedModel` from ``load_model``.
        """
        ensure_logging()
        if not isinstance(policy, Policy):
            policy = load_policy(policy)
        if model is not None or tokenizer is not None:
            if loaded is not None:
                raise GuardrailError("from_policy: pass model= and tokenizer=, or loaded=, "
                                     "not both")
            from guardrail.models.loading import adopt_model

            loaded = adopt_model(model, tokenizer)
        pm: PluginManager = plugin_manager or get_plugin_manager()
        registry = Registry.from_plugin_manager(pm)
        where = str(policy.path or policy.name)
        problems = check_plugins(policy, registry)
        if problems:
            raise PolicyError(where, problems)
        # Everything the policy needs installed, before the (slow) model load: one error
        # naming each missing piece and the command that fetches them all.
        check_installed(policy, registry, model=loaded is None,
                        dtype=None if policy.model.dtype == "auto" else policy.model.dtype)
        classifier = create_classifier(policy, registry)  # its configuration errors, before loading
        output_rails = create_output_rails(policy, registry)
        if loaded is None:
            from guardrail.models import load_model

            loaded = load_model(
                policy.model.source, device=device or policy.model.device, dtype=policy.model.dtype
            )
        fingerprint = model_fingerprint(loaded.model, loaded.name, loaded.tokenizer)
        rails = [
            build_rail(spec, index, registry, fingerprint, loaded.device, where)
            for index, spec in enumerate(policy.rails)
            if spec.enabled
        ]
        log.info(
            "guardrail.loaded",
            policy=policy.name,
            model=loaded.name,
            rails=[{"name": r.name, "layers": r.layers, **({"disabled": r.disabled}
                                                           if r.disabled else {})}
                   for r in rails],
        )
        return cls(policy, loaded, rails, classifier, registry, pm, fingerprint, output_rails)

    def missing(self) -> list[str]:
        """What a loaded rail's gate needs but cannot find now (an encoder package removed
        since load, say), one line each; empty when everything is there. The server's
        ``/readyz`` reports these."""
        return missing_resources(self.policy, self.rails)

    def with_policy(self, policy: Policy) -> Guardrail:
        """This guardrail under a variant of its policy that changes steerer params only.

        A sweep point, say: the loaded model, plugin manager, registry, classifier and every
        rail's source and energy models are shared; only the changed steerers are new.
        """
        rails = variant_rails(self.policy, policy, self.rails, self.registry)
        return Guardrail(policy, self.loaded, rails, self.classifier, self.registry,
                         self.plugin_manager, self.fingerprint, self.output_rails)

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
            str(self.tokenizer.apply_chat_template(
                self.prepare(c, steer=steer), tokenize=False, add_generation_prompt=True
            ))
            for c in conversations
        ]

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise rendered prompts with left padding, on the model's device."""
        enc = self.tokenizer(
            list(texts), return_tensors="pt", padding=True, padding_side="left",
            add_special_tokens=False,
        )
        # Only what a causal LM takes: transformers 4.x's generate() refuses the
        # token_type_ids some tokenizers add.
        return {k: enc[k].to(self.loaded.device) for k in ("input_ids", "attention_mask")}

    # --- generation ---------------------------------------------------------------------------
    def session(self, *, steer: bool = True, measure_only: bool = False,
                rows: dict[str, dict[str, torch.Tensor]] | None = None,
                model: PreTrainedModel | None = None, strength: float | None = None
                ) -> SteeringSession:
        """A steering session over this guardrail's rails (no rails when ``steer`` is false) on
        ``model`` (default: the guardrail's); ``rows`` limits a rail to the batch rows its gate
        let through, per side; ``strength`` multiplies every rail's step size
        (:meth:`rails_at`)."""
        on_step = None
        if self.plugin_manager.hook.guardrail_on_step.get_hookimpls():

            def on_step(event: StepEvent) -> None:
                self.plugin_manager.hook.guardrail_on_step(event=event)

        return SteeringSession(
            self.model if model is None else model,
            self.rails_at(strength) if steer or measure_only else [],
            measure_only=measure_only,
            on_step=on_step,
            rows=rows,
        )

    def rails_at(self, strength: float | None) -> list[Rail]:
        """The rails steering ``strength`` times as hard as calibrated (None or 1: as they
        are). Raises :class:`GuardrailError` for a strength that is not a number in
        ``(0, limit]``, where each rail's limit is the largest strength its artifact's
        calibration found within the safety budget (1 without that evidence)."""
        return self._strengths.at(strength)

    @property
    def strength_limit(self) -> float:
        """The largest strength every rail allows (:meth:`rails_at`)."""
        return min((rail.strength_limit for rail in self.rails if rail.moves_states),
                   default=1.0)

    def settings(self, overrides: dict[str, Any], *, steer: bool = True,
                 strength: float | None = None) -> GenerationSection:
        """The policy's generation settings with a call's ``overrides``; a bad override or
        strength fails here, before anything runs."""
        settings = merge_settings(self.policy.generation, overrides)
        if steer:
            self.rails_at(strength)
        return settings

    def generate(
        self,
        conversations: Sequence[Conversation],
        *,
        steer: bool = True,
        classify: bool = False,
        progress: bool = False,
        streamer: Any = None,
        gates: bool | str = True,
        strength: float | None = None,
        **overrides: Any,
    ) -> list[GenerationResult]:
        """Generate an answer per conversation; ``steer=False`` gives the unsteered model.

        ``overrides`` replace the policy's generation defaults (max_new_tokens, do_sample,
        temperature, top_p, top_k, repetition_penalty, batch_size, seed). ``gates=False``
        steers every row, whatever the rails' gates say, on each rail's default side;
        ``gates="answer"`` or ``"refuse"`` steers every row towards that side (calibration
        compares them with the base model's answers). ``strength`` multiplies each rail's
        calibrated step size, up to what its calibration allows (:meth:`rails_at`).

        A policy's ``output_rails`` review the answers of a steered call (with the gates
        deciding) and may have some answered again (:mod:`guardrail.steering.output_rails`);
        their doings are in each answer's ``telemetry.output_rails``. :meth:`generate_batch`,
        :meth:`stream` and :meth:`attach` answer once and run no output rail.
        """
        settings = self.settings(overrides, steer=steer, strength=strength)
        reviewed = steer and gates is True and bool(self.output_rails)
        first = steer and not (reviewed and any(r.first_pass == "base" for r in self.output_rails))
        final = self.answer(conversations, steer=first, settings=settings, streamer=streamer,
                            gates=gates, strength=strength, progress=progress)
        if reviewed:
            final = review_answers(self, conversations, final, settings=settings,
                                   strength=strength, first_steered=first)
        if classify:
            verdicts = self.classify([last_user(c) for c in conversations], [r.text for r in final])
            for result, verdict in zip(final, verdicts, strict=True):
                result.telemetry.verdict = {
                    "refused": verdict.refused,
                    "score": verdict.score,
                    "reason": verdict.reason,
                }
        for result in self._announce(final):
            log.debug("generation", policy=self.policy.name, **result.telemetry.summary())
        return final

    def generate_batch(
        self,
        conversations: Sequence[Conversation],
        *,
        steer: bool = True,
        streamer: Any = None,
        stopping_criteria: Any = None,
        gates: bool | str = True,
        strength: float | None = None,
        **overrides: Any,
    ) -> list[GenerationResult]:
        """Generate for exactly these conversations as ONE batch, in the order given (serving).

        Unlike :meth:`generate` nothing is sorted or split by ``batch_size`` and nothing is
        classified. ``stopping_criteria`` (a transformers ``StoppingCriteriaList``) may end rows
        early; their results then still read as the tokens up to the first end-of-sequence.
        """
        settings = self.settings(overrides, steer=steer, strength=strength)
        return self._announce(self.answer(
            conversations, steer=steer, settings=settings, streamer=streamer, gates=gates,
            strength=strength, stopping_criteria=stopping_criteria, one_batch=True))

    def _announce(self, results: list[GenerationResult]) -> list[GenerationResult]:
        """Hand each finished answer to the ``guardrail_on_generation`` hook."""
        for result in results:
            self.plugin_manager.hook.guardrail_on_generation(
                telemetry=result.telemetry, extra={"policy": self.policy.name}
            )
        return results

    def answer(self, conversations: Sequence[Conversation], *, steer: bool,
               settings: GenerationSection, streamer: Any = None, gates: bool | str = True,
               strength: float | None = None, progress: bool = False,
               stopping_criteria: Any = None, one_batch: bool = False
               ) -> list[GenerationResult]:
        """One answer per conversation, batched longest first (what :meth:`generate` runs
        before its output rails, classifier and hooks), or as one batch in the order given:
        :func:`guardrail.steering.batches.answer_in_batches`."""
        return answer_in_batches(
            self, conversations, steer=steer, settings=settings, streamer=streamer,
            gates=gates, strength=strength, progress=progress,
            stopping_criteria=stopping_criteria, one_batch=one_batch)

    # --- gates and states, without generating -------------------------------------------------
    def gate(self, prompts: Sequence[str], enc: dict[str, torch.Tensor], *,
             model: PreTrainedModel | None = None) -> Decisions:
        """Per gated rail: the batch's harm scores and, per side, the rows the rail steers
        towards it (:func:`guardrail.steering.gating.decide`, on ``model``, default the
        guardrail's)."""
        return decide(self.rails, self.model if model is None else model,
                      int(self.fingerprint.get("num_layers") or 0), prompts, enc)

    def gate_scores(self, conversations: Sequence[Conversation], *,
                    batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """Per gated rail, the harm score ``[n]`` of each conversation (nothing generated)."""
        parts: dict[str, list[torch.Tensor]] = {}
        for batch in batches(self, conversations,
                             size=batch_size or self.policy.generation.batch_size):
            for name, (score, _) in self.gate(batch.prompts, batch.enc).items():
                parts.setdefault(name, []).append(score.cpu())
        return {name: torch.cat(chunks) for name, chunks in parts.items()}

    def energies(
        self, conversations: Sequence[Conversation], *, batch_size: int | None = None
    ) -> list[GenerationTelemetry]:
        """Energies at the last prompt token per rail and layer, without generating or steering
        (each row measured with the energy models of the side its gate puts it on)."""
        return energies(self, conversations,
                        batch_size=batch_size or self.policy.generation.batch_size)

    def prompt_states(self, conversations: Sequence[Conversation], source: ActivationSource,
                      layers: Sequence[int], *, positions: str = "last",
                      batch_size: int | None = None, progress: bool = False
                      ) -> dict[int, torch.Tensor]:
        """Per layer, ``[n, hidden]`` unsteered prompt states of ``conversations`` read through
        ``source`` (``positions``: the last prompt token, or the mean over the prompt), in the
        order given."""
        return prompt_states(self, conversations, source, layers, positions=positions,
                             batch_size=batch_size or self.policy.generation.batch_size,
                             progress=progress)

    def classify(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        """The policy's refusal classifier C(X, Y)."""
        try:
            return self.classifier.classify(prompts, responses)
        except Exception as exc:
            raise PluginError(
                f"refusal classifier {self.policy.classifier.plugin!r} raised in classify: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    # --- other ways in ------------------------------------------------------------------------
    def stream(
        self, conversation: Conversation, *, steer: bool = True,
        strength: float | None = None, **overrides: Any
    ) -> GenerationStream:
        """Generate one answer and yield its text as it is produced.

        Iterate the returned :class:`GenerationStream` for text pieces; once it is exhausted
        its ``result`` is the finished :class:`GenerationResult`, telemetry included.
        ``overrides`` are those of :meth:`generate` (checked before anything runs).
        """
        from transformers import TextIteratorStreamer

        self.settings(overrides, steer=steer, strength=strength)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True,
                                        skip_special_tokens=True)
        return GenerationStream(
            streamer,
            lambda: self.generate_batch([conversation], steer=steer, streamer=streamer,
                                        strength=strength, **overrides)[0],
        )

    def attach(self, model: PreTrainedModel | None = None, *, strength: float | None = None
               ) -> contextlib.AbstractContextManager[SteeringSession]:
        """Steer ``model.generate(...)`` / forward calls on a model object of your own (default:
        this guardrail's), gates included: see :func:`guardrail.steering.attach.attached`."""
        return attached(self, model, strength=strength)
