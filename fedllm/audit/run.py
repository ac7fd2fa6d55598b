"""``fedllm audit``: one federated run with canaries, then each adversary's epsilon lower bound.

The run is the experiment as configured (same model, data, plan, noise, accountant) with the
audit's canaries added to the nodes' data (:mod:`fedllm.audit.canaries`), executed by the
in-process engine (:mod:`fedllm.federation.inprocess`): the real ServerApp round loop and the
real ClientApp, with every reply recorded on its way to the server, which is exactly what the
coordinator sees. Afterwards each adversary (:mod:`fedllm.audit.adversaries`) scores the
canaries, guesses, and :mod:`fedllm.audit.bound` turns its correct guesses into the largest
epsilon the run's outcome rejects at the stated confidence.

Outputs, next to the run's own: ``audit.json``, ``audit_scores.png``, an ``audit`` entry in
``summary.json``, and a table on the console.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import Message, MessageType

from fedllm import task
from fedllm.audit.adversaries import (
    Observed,
    SeededNoise,
    aggregate_scores,
    coordinator_scores,
    reader_gradient_scores,
    reader_loss_scores,
)
from fedllm.audit.bound import audit_bound, epsilon_lower_bound, rules_count
from fedllm.audit.canaries import CanaryDesign, Layout, design_canaries
from fedllm.audit.client_canaries import (
    canary_client_app,
    place_on_canary_clients,
    real_client_files,
    with_canary_clients,
)
from fedllm.audit.injection import SAMPLED_SUFFIX, adapter_parameters, canary_items, sampled_canaries
from fedllm.audit.side_channels import TWO_SIDED, RepliesSeen, ReplyClock, side_channel_scores, view_of
from fedllm.config import AuditConfig, ExperimentConfig
from fedllm.data.formatting import make_collate
from fedllm.errors import ConfigError
from fedllm.federation import records as keys
from fedllm.federation.checkpoint import Checkpointer
from fedllm.federation.inprocess import FIRST_NODE_ID, run_inprocess
from fedllm.federation.outputs import run_storage_key
from fedllm.federation.server_app import prepare_run
from fedllm.federation.simulation import load_object
from fedllm.model.adapters import adapter_state, load_adapter_state
from fedllm.node.guard import research_seed
from fedllm.node.policy import AUDIT_CANARIES, SAMPLING_SIZE
from fedllm.planning import plan_for
from fedllm.storage import load_key, write_json
from fedllm.tracking.plots import plot_audit
from fedllm.tracking.run_files import RunSummary, write_summary
from fedllm.tracking.run_manifest import write_run_manifest
from fedllm.training.objectives import per_example_loss

log = logging.getLogger(__name__)

AUDIT_JSON = "audit.json"
COORDINATOR, AGGREGATE_READER, READER = "coordinator", "aggregate_reader", "output_reader"
WHAT_IT_MEANS = (
    "a lower bound on the run's epsilon from one attack, at the stated confidence: not a proof of "
    "privacy, and capped by the number of canaries (see 'ceiling'); it must never exceed the accounted "
    "epsilon"
)


def run_audit(cfg: ExperimentConfig, settings: AuditConfig, run_dir: Path) -> dict:
    """Run ``cfg`` with canaries in ``run_dir``, attack it, and write the audit.

    Under ``privacy=client`` the canaries are whole clients (:mod:`fedllm.audit.client_canaries`);
    otherwise they are records in the real clients' data.

    Returns:
        The contents of ``audit.json``.

    Raises:
        ConfigError: record canaries asked for a client-level audit.
    """
    started = time.perf_counter()
    client_level = cfg.privacy.mode == "client"
    if client_level and settings.kind != "gradient":
        raise ConfigError(
            "audit.kind=record: a client-level audit's canaries are whole clients with designed "
            "updates; use audit.kind=gradient"
        )
    bundle = task.model_bundle(cfg.model, cfg.lora, cfg.seed)
    initial = {k: v.clone() for k, v in bundle.initial_adapter.items()}
    real_clients = cfg.federation.num_clients
    design = design_canaries(
        count=settings.canaries,
        kind=settings.kind,
        clients=real_clients,
        clip_norm=cfg.privacy.client_clip_norm if client_level else cfg.privacy.max_grad_norm,
        layout=Layout.of(initial),
        choices=cfg.data.choices,
        seed=settings.seed,
    )
    folder = run_dir / "audit"
    folder.mkdir(parents=True, exist_ok=True)
    app = load_object(cfg.federation.client_app)
    if client_level:
        place_on_canary_clients(design, real_clients)
        run_cfg = with_canary_clients(cfg, settings.canaries)
        extra = real_client_files(cfg, folder / "data")
        app = canary_client_app(app, real_clients, design)
    else:
        run_cfg = cfg
        files = {k: str(design.node_file(k, folder / f"canaries-client-{k}.json")) for k in range(real_clients)}
        for path in files.values():  # a rerun in the same folder starts its count afresh
            Path(f"{path}{SAMPLED_SUFFIX}").unlink(missing_ok=True)
        sizes = sampling_sizes(cfg, design)
        extra = lambda k: {AUDIT_CANARIES: files[k], SAMPLING_SIZE: sizes[k]}  # noqa: E731 - keys per node
    (folder / "design.json").write_text(design.to_json(), encoding="utf-8")
    prepare_run(run_cfg, run_dir)
    observed, seen, clock = Observed(), RepliesSeen(), ReplyClock(app)
    summary = run_inprocess(
        run_cfg,
        run_dir,
        client_app=clock,
        observer=_recorder(observed, design.layout, seen, clock),
        extra_node_config=extra,
    )
    with bundle.adapter(_final_adapter(run_dir, run_cfg, initial)) as model:
        final = adapter_state(model)  # as the model holds it (names and shapes checked on loading)
    scores = {COORDINATOR: _coordinator(cfg, design, observed, bundle)}
    if client_level:
        scores[AGGREGATE_READER] = aggregate_scores(design, observed, design.layout.flatten(final))
    scores[READER] = _reader(cfg, design, bundle, initial, final)
    if not client_level:  # a canary client's reply is the audit's own making: no side channel to read
        scores.update(side_channel_scores(design, seen, peers=sizes))
        write_json(folder / "replies.json", seen.to_dict())  # what the side-channel adversaries read
    sampled = None if client_level else sampled_canaries([Path(f"{p}{SAMPLED_SUFFIX}") for p in files.values()])
    audit = _results(cfg, settings, design, scores, summary, time.perf_counter() - started)
    audit.update(_power(design, sampled, audit["delta"], settings.confidence))
    write_json(run_dir / AUDIT_JSON, audit)
    np.savez(
        folder / "scores.npz", allow_pickle=False, included=np.array([c.included for c in design.canaries]), **scores
    )
    write_summary(run_dir, with_audit(summary, audit))
    figure = plot_audit(
        run_dir,
        scores,
        [c.included for c in design.canaries],
        bounds=audit["epsilon_lower_bound"],
        accounted=audit["epsilon_accounted"],
    )
    write_run_manifest(run_dir, run_storage_key(run_cfg))  # the summary and audit.json changed: vouch again
    log.info("privacy audit (%d canaries, %s):\n%s", settings.canaries, settings.kind, format_audit(audit))
    log.info("audit written: %s, %s (canary scores: %s)", run_dir / AUDIT_JSON, figure, folder / "scores.npz")
    return audit


def sampling_sizes(cfg: ExperimentConfig, design: CanaryDesign) -> dict[int, int]:
    """Each simulated node's public sampling size N: its shard and every canary dealt to it,
    included or not. A node's N is public (its sample rate and epsilon follow from it), so it must
    not follow which canaries are in: N = n would tell the metadata adversary how many are."""
    shards = task.split_for(cfg).shards
    return {k: len(shards[k]) + len(design.placed_on(k)) for k in range(len(shards))}


def _recorder(
    observed: Observed, layout: Layout, seen: RepliesSeen, clock: ReplyClock
) -> Callable[[Message, Message], None]:
    """The coordinator's view: the adapter it sent each round, every adapter a node sent back, and
    every train reply's side channels (its other fields and its time)."""

    def record(message: Message, reply: Message) -> None:
        if message.metadata.message_type != MessageType.TRAIN:
            return  # a pre-flight query: no round, no record used
        server_round = message.content.config_records[keys.CONFIG][keys.SERVER_ROUND]
        if not isinstance(server_round, int):  # the strategy's own message: always an int
            raise TypeError(f"{keys.SERVER_ROUND} is {server_round!r}, not a whole number")
        client = message.metadata.dst_node_id - FIRST_NODE_ID
        view = view_of(reply, clock.seconds.pop(message.metadata.message_id, 0.0))
        seen.views[(server_round, client)] = view
        if view.broken or keys.ARRAYS not in reply.content.array_records:
            return  # an error, a refusal or a non-finite update: no values to score (the nonfinite adversary's)
        if server_round not in observed.sent:
            observed.sent[server_round] = layout.flatten(_numpy(message.content[keys.ARRAYS]))
        try:
            observed.replies[(server_round, client)] = layout.flatten(_numpy(reply.content[keys.ARRAYS]))
        except (KeyError, ValueError):
            pass  # a malformed reply: the server rejects it, and there is nothing to score

    return record


def _numpy(arrays) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in arrays.items()}


def _final_adapter(run_dir: Path, cfg: ExperimentConfig, initial: dict) -> dict:
    """The run's final global adapter (its last checkpoint)."""
    key = load_key(cfg.storage.key_file, cfg.storage.key_env) if cfg.storage.encrypt else None
    checkpoints = Checkpointer(run_dir / "checkpoint", key)
    return checkpoints.load().arrays if checkpoints.exists() else initial


def _coordinator(cfg: ExperimentConfig, design: CanaryDesign, observed: Observed, bundle) -> np.ndarray:
    denoise = _seeded_noise(cfg, design, bundle)
    if denoise is not None:
        log.warning(
            "audit: privacy.noise=seeded and the seed is in the task config the coordinator sent: the "
            "coordinator regenerates every node's noise and removes it before scoring"
        )
    if design.kind == "gradient":
        return coordinator_scores(design, observed, denoise=denoise)
    return coordinator_scores(
        design, observed, directions=_RecordDirections(cfg, design, observed, bundle), denoise=denoise
    )


def _seeded_noise(cfg: ExperimentConfig, design: CanaryDesign, bundle) -> SeededNoise | None:
    """The seeded-noise attack, where it applies: DP-SGD whose noise anyone with the run's seed
    regenerates, and plain SGD (the update is then linear in the noise)."""
    train = cfg.train
    if not (
        cfg.privacy.sample_level
        and cfg.privacy.noise == "seeded"
        and train.optimizer == "sgd"
        and train.weight_decay == 0
    ):
        return None
    sizes = sampling_sizes(cfg, design)
    order = [(name, tuple(p.shape)) for name, p in adapter_parameters(bundle.model).items()]
    return SeededNoise(
        seed_for=lambda r, k: research_seed(cfg, k, r),
        param_order=order,
        layout=design.layout,
        steps=train.local_steps,
        lr=train.lr,
        std_for=lambda k: plan_for(cfg, sizes[k]).noise_multiplier * cfg.privacy.max_grad_norm,
    )


class _RecordDirections:
    """A record canary's unit gradient direction at a round's global adapter (what the coordinator
    computes itself: it holds the model and, as the designer of the canaries, their text)."""

    def __init__(self, cfg: ExperimentConfig, design: CanaryDesign, observed: Observed, bundle):
        self.cfg, self.design, self.observed, self.bundle = cfg, design, observed, bundle
        self.items = canary_items(design, None, lambda records: task.tokenize_for_node(cfg, records))
        self.collate = make_collate(bundle.pad_id, prompt_only=cfg.train.objective == "choices")
        self.params = adapter_parameters(bundle.model)
        self.loaded_round: int | None = None

    def __call__(self, index: int, server_round: int) -> np.ndarray:
        if self.loaded_round != server_round:
            state = self.design.layout.unflatten(self.observed.sent[server_round])
            load_adapter_state(self.bundle.model, state)
            self.loaded_round = server_round
        model = self.bundle.model
        model.zero_grad(set_to_none=True)
        batch = self.collate([self.items[index]])
        per_example_loss(model, batch, self.cfg.train.objective, task.choice_ids_for(self.cfg)).sum().backward()
        grads = {
            name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().cpu().numpy()
            for name, p in self.params.items()
        }
        model.zero_grad(set_to_none=True)
        vector = self.design.layout.flatten(grads)
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm > 0 else vector


def _reader(cfg: ExperimentConfig, design: CanaryDesign, bundle, initial: dict, final: dict) -> np.ndarray:
    if design.kind == "gradient":
        return reader_gradient_scores(design, design.layout.flatten(initial), design.layout.flatten(final))
    items = canary_items(design, None, lambda records: task.tokenize_for_node(cfg, records))
    return reader_loss_scores(_losses(cfg, bundle, items, initial), _losses(cfg, bundle, items, final))


@torch.no_grad()
def _losses(cfg: ExperimentConfig, bundle, items: list, adapter: dict) -> np.ndarray:
    collate = make_collate(bundle.pad_id, prompt_only=cfg.train.objective == "choices")
    losses = []
    with bundle.adapter(adapter) as model:
        model.eval()
        for start in range(0, len(items), 32):
            batch = collate(items[start : start + 32])
            losses.append(per_example_loss(model, batch, cfg.train.objective, task.choice_ids_for(cfg)))
    return torch.cat(losses).double().numpy()


def _results(
    cfg: ExperimentConfig,
    settings: AuditConfig,
    design: CanaryDesign,
    scores: dict[str, np.ndarray],
    summary: RunSummary,
    seconds: float,
) -> dict:
    included = [c.included for c in design.canaries]
    client_level = cfg.privacy.mode == "client"
    delta = cfg.privacy.client_delta if client_level else cfg.privacy.delta
    accounted = (
        summary.client_level_epsilon
        if client_level
        else summary.final_max_epsilon
        if cfg.privacy.sample_level
        else None
    )
    # every adversary scores the same canaries and the audit reports the largest bound: each is
    # tested at the family-wise corrected confidence (bound.audit_bound), so that maximum holds
    family = sum(rules_count(len(included), two_sided=name in TWO_SIDED) for name in scores)
    adversaries = {
        name: audit_bound(
            values.tolist(),
            included,
            delta=delta,
            confidence=settings.confidence,
            two_sided=name in TWO_SIDED,
            family=family,
        ).to_dict()
        for name, values in scores.items()
    }
    bounded = [name for name in adversaries if not (client_level and name == COORDINATOR)]
    best = max(bounded, key=lambda name: adversaries[name]["epsilon_lower_bound"])
    return {
        "epsilon_accounted": accounted,
        "delta": delta,
        "level": "client" if client_level else "sample",
        "privacy_mode": cfg.privacy.mode,
        "noise": cfg.privacy.noise,
        "canaries": len(design.canaries),
        "canaries_included": int(sum(included)),
        "kind": "client" if client_level else design.kind,
        "confidence": settings.confidence,
        "adversaries": adversaries,
        "epsilon_lower_bound": {name: result["epsilon_lower_bound"] for name, result in adversaries.items()},
        # the adversaries the accounted epsilon speaks about: client-level DP's noise is added by the
        # coordinator, who sees each update before it (docs/threat-model.md)
        "bounded_by_accounting": bounded,
        # the audit's result: the largest bound of those adversaries (valid at `confidence` as a whole)
        "epsilon_lower_bound_max": adversaries[best]["epsilon_lower_bound"],
        "best_adversary": best,
        "what_it_means": WHAT_IT_MEANS,
        "seconds": round(seconds, 1),
    }


def _power(design: CanaryDesign, sampled: set[int] | None, delta: float, confidence: float) -> dict:
    """The audit's power: how many included canaries any Poisson batch ever held, and the bound an
    adversary who guessed exactly those, all correctly, would show (with as many canaries). It is
    computed at the stated confidence with no correction for the guessing grid or the number of
    adversaries, so no adversary's corrected bound can exceed it by more than luck on canaries
    never sampled: an upper end of what this run could show.

    A canary never sampled left no trace in any release, so under DP-SGD's subsampling it is a coin
    flip for every adversary: with few sampled, no attack can show a large epsilon, however leaky
    the mechanism (FIELD_NOTES: ~18% are ever sampled at rate 1/77 over 15 steps). A bound well
    below the accounted epsilon means little when the power is below it too. None for a
    client-level audit (its canary clients take part in every round).
    """
    if sampled is None:
        return {"canaries_sampled": None, "power": None}
    included = {c.index for c in design.canaries if c.included}
    count = len(included & sampled)
    power = (
        epsilon_lower_bound(
            canaries=len(design.canaries), guesses=count, correct=count, delta=delta, confidence=confidence
        )
        if count
        else 0.0
    )
    return {"canaries_sampled": count, "power": power}


def with_audit(summary: RunSummary, audit: dict) -> RunSummary:
    """The run's summary with its ``audit`` entry: each adversary's lower bound and how it was measured."""
    return dataclasses.replace(
        summary,
        audit={
            "epsilon_lower_bound": audit["epsilon_lower_bound"],
            "epsilon_lower_bound_max": audit["epsilon_lower_bound_max"],
            "best_adversary": audit["best_adversary"],
            "power": audit["power"],
            "canaries": audit["canaries"],
            "confidence": audit["confidence"],
            "kind": audit["kind"],
        },
    )


def format_audit(audit: dict) -> str:
    """The console table: each adversary's guesses, correct guesses, bound and ceiling."""
    accounted = audit["epsilon_accounted"]
    lines = [
        f"accounted {audit['level']}-level epsilon {accounted:.4g} at delta {audit['delta']:g} (bounds "
        f"{', '.join(audit['bounded_by_accounting'])})"
        if accounted is not None
        else f"no DP accounted (privacy={audit['privacy_mode']})",
        f"{'adversary':<14} {'guesses':>7} {'correct':>7} {'eps lower bound':>15} {'ceiling':>8}",
    ]
    for name, result in audit["adversaries"].items():
        lines.append(
            f"{name:<14} {result['guesses']:>7} {result['correct']:>7} "
            f"{result['epsilon_lower_bound']:>15.3f} {result['ceiling']:>8.3f}"
        )
    lines.append(
        f"audit's lower bound {audit['epsilon_lower_bound_max']:.3f} ({audit['best_adversary']}: the largest over "
        f"{', '.join(audit['bounded_by_accounting'])}, all tested together at confidence {audit['confidence']:g})"
    )
    if audit.get("power") is not None:
        lines.append(
            f"power {audit['power']:.3f}: {audit['canaries_sampled']} of the {audit['canaries_included']} included "
            "canaries were ever sampled; no adversary can show much more than this bound with them"
        )
    lines.append(
        f"({audit['canaries']} canaries, {audit['canaries_included']} included; confidence "
        f"{audit['confidence']:g}: {audit['what_it_means']})"
    )
    return "\n".join(lines)
