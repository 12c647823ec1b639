"""``Guardrail``: a policy's model, rails and classifier, with steered generation.

The model is the policy's (``Guardrail.from_policy(policy)``) or one the caller loaded
(``from_policy(policy, model=..., tokenizer=...)``); ``attach()`` steers a model object's own
``generate`` and forward calls, and ``stream()`` yields an answer's text as it is generated.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from guardrail.artifact.energy import EnergyArtifact
from guardrail.errors import GuardrailError, PluginError, PolicyError
from guardrail.models.fingerprint import model_fingerprint
from guardrail.plugin.components import OutputRail, RefusalClassifier, Verdict
from guardrail.plugin.manager import Registry, get_plugin_manager
from guardrail.policy.checks import check_plugins
from guardrail.policy.model import GenerationSection, Policy, load_policy
from guardrail.steering.capture import mean_prompt_states
from guardrail.steering.gating import gate_sides
from guardrail.steering.generation import (
    Conversation,
    UserMessageParser,
    cut_at_eos,
    eos_ids,
    generate_kwargs,
    last_user,
    merge_settings,
)
from guardrail.steering.hooks import SHARED, Rail, SteeringSession, log_nonfinite
from guardrail.steering.output_rails import review_answers
from guardrail.steering.prerequisites import check_installed, fetch_command, resource_installed
from guardrail.steering.rails import build_rail, with_steerer
from guardrail.steering.streams import GenerationStream, refuse_right_padding
from guardrail.telemetry import (
    GateTelemetry,
    GenerationTelemetry,
    ensure_logging,
    progress_bar,
)

log = structlog.get_logger("guardrail")


@dataclass
class GenerationResult:
    """One answer: its text, token ids, why it stopped, and what steering did."""

    text: str
    token_ids: list[int]
    finish_reason: str
    telemetry: GenerationTelemetry


class Guardrail:
    """A loaded policy: model, tokenizer, steering rails and refusal classifier.

    ``fingerprint`` identifies the loaded model's architecture (what artifacts must match).
    """

    def __init__(
        self,
        policy: Policy,
        loaded: Any,
        rails: list[Rail],
        classifier: RefusalClassifier,
        registry: Registry,
        plugin_manager: Any,
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
        self._strengths: dict[float, list[Rail]] = {}
        #: The policy's output rails, in order (:mod:`guardrail.steering.output_rails`).
        self.output_rails = list(output_rails)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_policy(
        cls,
        policy: Policy | str | Path,
        *,
        model: Any = None,
        tokenizer: Any = None,
        loaded: Any = None,
        device: str | None = None,
        plugin_manager: Any = None,
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
        pm = plugin_manager or get_plugin_manager()
        registry = Registry.from_plugin_manager(pm)
        where = str(policy.path or policy.name)
        problems = check_plugins(policy, registry)
        if problems:
            raise PolicyError(where, problems)
        # Everything the policy needs installed, before the (slow) model load: one error
        # naming each missing piece and the command that fetches them all.
        check_installed(policy, registry, model=loaded is None,
                        dtype=None if policy.model.dtype == "auto" else policy.model.dtype)
        classifier = _classifier(policy, registry)  # its configuration errors, before loading
        output_rails = [_output_rail(spec, registry) for spec in policy.output_rails]
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
        out = []
        for rail in self.rails:
            for i, member in enumerate(rail.gate.members if rail.gate is not None else []):
                for name in member.gate.resources():
                    if not resource_installed(name):
                        out.append(f"rail {rail.name!r} gate member {i} ({member.plugin}): "
                                   f"{name!r} is not installed; install it with "
                                   f"{fetch_command(self.policy)}")
        return out

    def with_policy(self, policy: Policy) -> Guardrail:
        """This guardrail under a variant of its policy that changes steerer params only.

        A sweep point, say: the loaded model, plugin manager, registry, classifier and every
        rail's source and energy models are shared; only the changed steerers are new.
        """
        where = str(policy.path or policy.name)
        if _but_steerer_params(policy) != _but_steerer_params(self.policy):
            raise PolicyError(where, ["a variant of a loaded policy may change steerer params "
                                      "only; load any other policy with Guardrail.from_policy"])
        problems = check_plugins(policy, self.registry)
        if problems:
            raise PolicyError(where, problems)
        pairs = zip([s for s in policy.rails if s.enabled],
                    [s for s in self.policy.rails if s.enabled], self.rails, strict=True)
        rails = [rail if new == old else with_steerer(rail, new.steerer, self.registry)
                 for new, old, rail in pairs]
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
            self.tokenizer.apply_chat_template(
                self.prepare(c, steer=steer), tokenize=False, add_generation_prompt=True
            )
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
                model: Any = None, strength: float | None = None) -> SteeringSession:
        """A steering session over this guardrail's rails (no rails when ``steer`` is false) on
        ``model`` (default: the guardrail's); ``rows`` limits a rail to the batch rows its gate
        let through, per side; ``strength`` multiplies every rail's step size
        (:meth:`rails_at`)."""
        on_step = None
        if self.plugin_manager.hook.guardrail_on_step.get_hookimpls():

            def on_step(event: Any) -> None:
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
        if strength is None:
            return self.rails
        if type(strength) is float and strength in self._strengths:
            return self._strengths[strength]
        check_strength(strength, self.rails)
        if strength == 1:
            return self.rails
        strength = float(strength)
        rails = [rail.with_strength(strength) if _steers(rail) else rail
                 for rail in self.rails]
        if len(self._strengths) >= 32:  # a few strengths in use; never an unbounded cache
            self._strengths.pop(next(iter(self._strengths)))
        self._strengths[strength] = rails
        return rails

    @property
    def strength_limit(self) -> float:
        """The largest strength every rail allows (:meth:`rails_at`)."""
        return min((rail.strength_limit for rail in self.rails if _steers(rail)), default=1.0)

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
        deciding) and may have some answered again (:mod:`guardrail.steering.output_rails`); their
        doings are in each answer's ``telemetry.output_rails``. :meth:`generate_batch`,
        :meth:`stream` and :meth:`attach` answer once and run no output rail.
        """
        settings = merge_settings(self.policy.generation, overrides)
        if steer:
            self.rails_at(strength)  # a bad strength fails before anything runs
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
        for result in final:
            self.plugin_manager.hook.guardrail_on_generation(
                telemetry=result.telemetry, extra={"policy": self.policy.name}
            )
            log.debug("generation", policy=self.policy.name, **result.telemetry.summary())
        return final

    def answer(self, conversations: Sequence[Conversation], *, steer: bool,
               settings: GenerationSection, streamer: Any = None, gates: bool | str = True,
               strength: float | None = None, progress: bool = False
               ) -> list[GenerationResult]:
        """One answer per conversation, batched longest first (what :meth:`generate` runs
        before its output rails, classifier and hooks)."""
        texts = self.render(conversations, steer=steer)
        lengths = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        results: list[GenerationResult | None] = [None] * len(texts)
        batches = [
            order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)
        ]
        desc = "generate (steered)" if steer else "generate (base)"
        bar = progress_bar(len(texts), progress, desc)
        for batch in batches:
            started = time.perf_counter()
            outs = self._generate_batch([texts[i] for i in batch], steer, settings, streamer,
                                        prompts=[last_user(conversations[i]) for i in batch],
                                        gates=gates, strength=strength)
            seconds = time.perf_counter() - started
            for i, out in zip(batch, outs, strict=True):
                out.telemetry.seconds = seconds / len(batch)
                results[i] = out
            bar.update(len(batch))
        bar.close()
        return [r for r in results if r is not None]

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
        settings = merge_settings(self.policy.generation, overrides)
        texts = self.render(conversations, steer=steer)
        started = time.perf_counter()
        results = self._generate_batch(texts, steer, settings, streamer, stopping_criteria,
                                       prompts=[last_user(c) for c in conversations], gates=gates,
                                       strength=strength)
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
        settings: GenerationSection,
        streamer: Any,
        stopping_criteria: Any = None,
        *,
        prompts: Sequence[str],
        gates: bool | str = True,
        strength: float | None = None,
    ) -> list[GenerationResult]:
        enc = self.encode(texts)
        decisions = self.gate(prompts, enc) if steer and gates is True else {}
        rows = self.forced_rows(gates, len(texts)) if steer and gates is not True else {
            name: sides for name, (_, sides) in decisions.items()}
        prompt_len = enc["input_ids"].shape[1]
        kwargs = generate_kwargs(settings, self.tokenizer.pad_token_id)
        if settings.do_sample and settings.seed is not None:
            torch.manual_seed(settings.seed)
        if streamer is not None:
            kwargs["streamer"] = streamer
        if stopping_criteria is not None:
            kwargs["stopping_criteria"] = stopping_criteria
        with self.session(steer=steer, rows=rows, strength=strength) as session, \
                torch.no_grad():
            output = self.model.generate(**enc, **kwargs)
        eos = eos_ids(self.model, self.tokenizer)
        answers = [cut_at_eos(row, eos) for row in output[:, prompt_len:].tolist()]
        # A row that stopped fed its end-of-sequence token back like any other.
        per_row = session.telemetry([len(ids) + (finish == "stop") for ids, finish in answers])
        log_nonfinite(per_row, policy=self.policy.name)
        prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
        sides = {rail.name: session.sides_of(rail.name, len(answers)) for rail in session.rails}
        return [
            GenerationResult(
                text=self.tokenizer.decode(ids, skip_special_tokens=True),
                token_ids=ids,
                finish_reason=finish,
                telemetry=GenerationTelemetry(
                    steered=any(per_rail[row] is not None for per_rail in sides.values()),
                    policy=self.policy.name,
                    prompt_tokens=int(prompt_tokens[row]),
                    completion_tokens=len(ids),
                    layers=per_row[row],
                    gates=self._gate_telemetry(decisions, row),
                    strength=strength if steer and strength is not None else None,
                ),
            )
            for row, (ids, finish) in enumerate(answers)
        ]

    # --- gates --------------------------------------------------------------------------------
    def gate(self, prompts: Sequence[str], enc: dict[str, torch.Tensor], *, model: Any = None
             ) -> dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Per gated rail: the batch's harm scores ``[n]`` and, per side, the rows the rail
        steers towards it (``answer``: below the rail's ``below``; ``refuse``: above ``above``).

        ``prompts`` are the user messages (what text gates read), ``enc`` the encoded batch
        (what state gates read, mean-pooled in one forward pass that stops after the deepest
        layer any gate needs; of ``model``, default the guardrail's). A gate shared by several
        rails is scored once.
        """
        gated = [rail for rail in self.rails if rail.gate is not None]
        if not gated:
            return {}
        num_layers = int(self.fingerprint.get("num_layers") or 0)
        layers = sorted({layer for rail in gated
                         for layer in rail.gate.state_layers(num_layers)})  # type: ignore[union-attr]
        states = (mean_prompt_states(self.model if model is None else model, gated[0].source,
                                     enc, layers) if layers else None)
        scores: dict[int, torch.Tensor] = {}
        out = {}
        device = enc["input_ids"].device
        for rail in gated:
            assert rail.gate is not None
            if id(rail.gate) not in scores:
                scores[id(rail.gate)] = rail.gate.score(prompts, states, num_layers)
            score = scores[id(rail.gate)]
            sides = gate_sides(score, rail.below, rail.above)
            out[rail.name] = (score, {side: mask.to(device) for side, mask in sides.items()})
        return out

    def forced_rows(self, gates: bool | str, batch: int) -> dict[str, dict[str, torch.Tensor]]:
        """Every row of every rail on one side, whatever the gates say: ``gates=False`` the
        rail's default side, ``"answer"`` / ``"refuse"`` that side."""
        if gates is True:
            raise GuardrailError("forced_rows: gates=True lets the gates decide")
        if gates is not False and gates not in ("answer", "refuse"):
            raise GuardrailError(f"gates: got {gates!r}; expected True, False, 'answer' or "
                                 "'refuse'")
        every = torch.ones(batch, dtype=torch.bool, device=self.loaded.device)
        out = {}
        for rail in self.rails:
            side = gates if isinstance(gates, str) else (
                SHARED if rail.energies or not rail.directions else next(iter(rail.directions)))
            out[rail.name] = {side: every}
        return out

    def gate_scores(self, conversations: Sequence[Conversation], *,
                    batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """Per gated rail, the harm score ``[n]`` of each conversation (nothing generated)."""
        texts = self.render(conversations, steer=True)
        prompts = [last_user(c) for c in conversations]
        size = batch_size or self.policy.generation.batch_size
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(texts), size):
            enc = self.encode(texts[start : start + size])
            for name, (score, _) in self.gate(prompts[start : start + size], enc).items():
                parts.setdefault(name, []).append(score.cpu())
        return {name: torch.cat(chunks) for name, chunks in parts.items()}

    def _gate_telemetry(self, decisions: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]],
                        row: int) -> list[GateTelemetry]:
        by_name = {rail.name: rail for rail in self.rails}
        out = []
        for name, (score, sides) in decisions.items():
            side = next((s for s, mask in sides.items() if bool(mask[row])), None)
            out.append(GateTelemetry(rail=name, score=round(float(score[row]), 4),
                                     steered=side is not None, below=by_name[name].below,
                                     above=by_name[name].above, side=side))
        return out

    # --- scoring ------------------------------------------------------------------------------
    def energies(
        self, conversations: Sequence[Conversation], *, batch_size: int | None = None
    ) -> list[GenerationTelemetry]:
        """Energies at the last prompt token per rail and layer, without generating or steering."""
        texts = self.render(conversations, steer=True)
        prompts = [last_user(c) for c in conversations]
        size = batch_size or self.policy.generation.batch_size
        out: list[GenerationTelemetry] = []
        for start in range(0, len(texts), size):
            enc = self.encode(texts[start : start + size])
            # Each row is measured with the energy models of the side its gate puts it on.
            decisions = self.gate(prompts[start : start + size], enc)
            rows = {name: sides for name, (_, sides) in decisions.items()}
            with self.session(measure_only=True, rows=rows) as session, torch.no_grad():
                self.model(**enc, use_cache=False)
            per_row = session.telemetry([0] * enc["input_ids"].shape[0])
            log_nonfinite(per_row, policy=self.policy.name)
            for row, layers in enumerate(per_row):
                out.append(
                    GenerationTelemetry(steered=False, policy=self.policy.name, layers=layers,
                                        gates=self._gate_telemetry(decisions, row))
                )
        return out

    def classify(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        """The policy's refusal classifier C(X, Y)."""
        try:
            return self.classifier.classify(prompts, responses)
        except Exception as exc:
            raise PluginError(
                f"refusal classifier {self.policy.classifier.plugin!r} raised in classify: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

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

        merge_settings(self.policy.generation, overrides)
        if steer:
            self.rails_at(strength)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True,
                                        skip_special_tokens=True)
        return GenerationStream(
            streamer,
            lambda: self.generate_batch([conversation], steer=steer, streamer=streamer,
                                        strength=strength, **overrides)[0],
        )

    @contextlib.contextmanager
    def attach(self, model: Any = None, *, strength: float | None = None
               ) -> Iterator[SteeringSession]:
        """Steer ``model.generate(...)`` / forward calls on a model object of your own.

        The model must be the one the artifacts were trained for (checked by fingerprint).
        Prompts must be left-padded, as Hugging Face generation wants them: a row's last
        prompt token is then the last position, which the rails steer. A right-padded batch
        (an attention mask ending in 0) is refused with :class:`PaddingError`, since its
        last position would be padding.

        Gated rails apply their gates exactly as :meth:`generate` does: on each new prompt
        (a forward pass that starts a sequence) the user's last message is read back from the
        token ids through the chat template, scored, and each row is steered towards the side
        its gate chooses, or not at all. A row whose user message cannot be found (a prompt
        not rendered with this tokenizer's chat template, or ``inputs_embeds``) is not steered.

        ``strength`` multiplies each rail's calibrated step size while attached, up to what
        its calibration allows (:meth:`rails_at`).
        """
        target = model if model is not None else self.model
        if target is not self.model:
            fingerprint = model_fingerprint(target, self.loaded.name)
            for rail in self.rails:
                if rail.energies or rail.directions:
                    EnergyArtifact.compare(rail.fingerprint, fingerprint, f"rail {rail.name!r}")
        check = target.register_forward_pre_hook(refuse_right_padding, with_kwargs=True)
        handles = [check]
        try:
            with self.session(model=target, strength=strength) as session:
                if any(rail.gate is not None for rail in self.rails):
                    handles.append(target.register_forward_pre_hook(
                        _AttachGate(self, session, target), with_kwargs=True))
                yield session
        finally:
            for handle in handles:
                handle.remove()


class _AttachGate:
    """A forward pre-hook that runs the rails' gates on each new prompt under ``attach()``."""

    def __init__(self, guard: Guardrail, session: SteeringSession, model: Any) -> None:
        self.guard = guard
        self.session = session
        self.model = model
        self.parse = UserMessageParser(guard.tokenizer)

    def __call__(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.session.paused:
            return  # the gate's own forward pass
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            # No token ids (inputs_embeds): nothing to read the prompt from. Fail closed.
            if _starts_sequence(kwargs, None):
                self.session.set_rows(self._nothing())
                log.warning("attach.gate_unreadable", reason="no input_ids",
                            action="gated rails steer no row")
            return
        if not _starts_sequence(kwargs, input_ids):
            return
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape:
            mask = torch.ones_like(input_ids)
        prompts = [self.parse.from_ids(row[m.bool()].tolist())
                   for row, m in zip(input_ids, mask, strict=True)]
        readable = torch.tensor([p is not None for p in prompts], device=input_ids.device)
        if not bool(readable.all()):
            log.warning("attach.gate_unreadable", rows=(~readable).nonzero().flatten().tolist(),
                        reason="no user message found through the chat template",
                        action="those rows are not steered")
        self.session.paused = True
        try:
            decisions = self.guard.gate([p or "" for p in prompts],
                                        {"input_ids": input_ids, "attention_mask": mask},
                                        model=self.model)
        finally:
            self.session.paused = False
        rows = {name: {side: rows & readable for side, rows in sides.items()}
                for name, (_, sides) in decisions.items()}
        self.session.set_rows(rows)
        self.session.gate_decisions = decisions

    def _nothing(self) -> dict[str, dict[str, torch.Tensor]]:
        return {rail.name: {} for rail in self.guard.rails if rail.gate is not None}


def _starts_sequence(kwargs: dict[str, Any], input_ids: torch.Tensor | None) -> bool:
    """Whether a forward call starts a new sequence (a prompt) rather than continuing one."""
    position = kwargs.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel():
        return int(position.reshape(-1)[0]) == 0
    # transformers 5 passes the cache as ``cache``, 4.x as ``past_key_values``.
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return True
    length = getattr(cache, "get_seq_length", None)
    if callable(length):
        return int(length()) == 0
    return input_ids is not None and input_ids.shape[1] > 1


def _steers(rail: Rail) -> bool:
    """Whether a rail moves hidden states (a strength applies to it)."""
    return bool(rail.energies or rail.directions) or rail.steerer.strength_param is not None


def check_strength(strength: Any, rails: Sequence[Rail]) -> None:
    """Raise :class:`GuardrailError` unless ``strength`` is a number in ``(0, limit]`` for
    every rail that moves states, and each such rail's steerers have a strength to scale."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not (
            strength > 0 and strength != float("inf")):
        raise GuardrailError(f"strength: got {strength!r}; expected a number > 0 (a "
                             "multiplier on the calibrated step size; 1 is as calibrated)")
    for rail in rails:
        if not _steers(rail):
            continue
        fixed = [s.name for s in rail.steerers if s.strength_param is None]
        if fixed:
            raise GuardrailError(f"strength: got {strength!r}; rail {rail.name!r} steers with "
                                 f"{fixed}, which have no strength to scale")
        if strength > rail.strength_limit + 1e-9:
            raise GuardrailError(
                f"strength: got {strength!r}; rail {rail.name!r} allows at most "
                f"{rail.strength_limit:g} (the largest step size its artifact's calibration "
                "found within the safety budget, over the calibrated one; run `guardrail "
                "calibrate` with a wider grid to allow more)")


def _but_steerer_params(policy: Policy) -> dict[str, Any]:
    """The policy as data, less its name and its rails' steerer params."""
    return policy.model_dump(exclude={"name": True, "rails": {"__all__": {"steerer": {"params"}}}})


def _output_rail(spec: Any, registry: Registry) -> OutputRail:
    rail = registry.create("output_rail", spec.plugin, spec.params)
    assert isinstance(rail, OutputRail)
    return rail


def _classifier(policy: Policy, registry: Registry) -> RefusalClassifier:
    classifier = registry.create(
        "refusal_classifier", policy.classifier.plugin, policy.classifier.params
    )
    assert isinstance(classifier, RefusalClassifier)
    return classifier
