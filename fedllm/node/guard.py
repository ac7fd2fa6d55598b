"""The node's privacy boundary for one round: refuse, replay or train, then commit.

Everything in the server's request is untrusted. The node's own policy
(:mod:`fedllm.node.policy`) decides what may run; the server's target and delta can only
lower the node's cap. Under the node's ledger lock (held from the check to the record) the
guard replays an update already released for this round, or checks that the round keeps
the node within its cap, trains, and records the release before the update can leave (a
crash afterwards keeps it counted; a ledger is never reset). DP noise and Poisson batches
come from the node's own OS entropy (``LocalSpec.seed=None``) unless a simulated node runs
the ``seeded`` research mode.

What leaves: the adapter and the accounting metadata, plus what the node declared public;
a refusal says only its category, and the detail goes to this node's log. Flower-free:
:mod:`fedllm.federation.client_app` translates messages to and from it.

Before round 1 the server may ask a pre-flight (:func:`answer_preflight`): the same policy
check, data and plan as a round, then a read-only look at the ledger (under its lock) and a
projection of the planned rounds against the node's cap. It spends nothing and writes nothing.
A node whose config says ``answer-preflight=false`` declines it without looking at anything.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TypeAlias

import torch

from fedllm import task
from fedllm.config import ExperimentConfig
from fedllm.data.formatting import TokenizedDataset, make_collate
from fedllm.errors import ConfigError, DataError, LedgerError, PrivacyPlanError
from fedllm.federation.remote_text import escape_remote_text
from fedllm.model.adapters import adapter_state
from fedllm.node.extension import ShardExtension, SizedDataset
from fedllm.node.policy import (
    ANSWER_PREFLIGHT,
    AUDIT_CANARIES,
    BUDGET,
    DATA,
    DECLINED,
    ERROR,
    POLICY,
    NodePolicy,
    PolicyViolation,
    check_request,
)
from fedllm.node.received import ReceivedAdapterError, check_received_adapter
from fedllm.node.release import Accounting, PreflightAnswer, PublicStats, Refusal, TrainReport
from fedllm.node.reply_cache import ReplyCache, arrays_digest
from fedllm.planning import plan_for
from fedllm.privacy.accounting import History, extend_history
from fedllm.privacy.budget import Budget, BudgetDecision, check_round, effective_budget
from fedllm.privacy.calibration import DPPlan
from fedllm.privacy.dpsgd import SamplingShard
from fedllm.privacy.node_ledger import NodeLedger, Release
from fedllm.privacy.record_keys import ShardContent
from fedllm.training.local import DPSpec, LocalResult, LocalSpec, train_local
from fedllm.training.precision import use_bf16

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundRequest:
    """What the server asked for this round (untrusted)."""

    cfg: ExperimentConfig
    run_id: str
    server_round: int
    received: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Update:
    """The node's update: the adapter arrays and their wire metrics."""

    arrays: dict[str, torch.Tensor]
    metrics: dict


Answer: TypeAlias = Update | Refusal  # the node's answer to a round: an update or a refusal


@dataclass(frozen=True)
class PreflightRequest:
    """The server's pre-flight query (untrusted): the run's task config, before ``first_round``."""

    cfg: ExperimentConfig
    run_id: str
    first_round: int  # the first round still to play (1, or the round a resumed run continues with)

    def __post_init__(self) -> None:
        if not 1 <= self.first_round <= self.cfg.federation.num_rounds:
            raise ConfigError(
                f"pre-flight for round {self.first_round} of a run of {self.cfg.federation.num_rounds} rounds"
            )


# a run training on this node holds the ledger lock for a whole round; a pre-flight answer later than this
# is of no use to a server that waits at most federation.preflight.PREFLIGHT_WAIT_S
PREFLIGHT_LOCK_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class _Prepared:
    """What a round needs before it looks at the ledger: the node's view of the task, its shard and plan."""

    cfg: ExperimentConfig  # the server's config with the node's own data rules
    shard: TokenizedDataset | SizedDataset  # the node's own, or a simulation driver's extension of it
    content: ShardContent  # the node's own records, what the ledger charges
    plan: DPPlan | None  # None: the run trains without DP-SGD (the node's policy allows it)
    sampling_size: int  # N: the public record count the plan and the Poisson batches are fixed from


def answer_round(policy: NodePolicy, request: RoundRequest, extension: ShardExtension | None = None) -> Answer:
    """Decide and carry out one round on this node (see the module docstring).

    ``extension``: a simulated node's extra records (``fedllm audit``'s canaries), or None.
    """
    node, server_round = policy.partition_id, request.server_round
    try:  # before anything reads the node's data: the refusal depends on the tensors and the node config only
        check_received_adapter(request.received, max_abs=policy.max_adapter_abs, max_norm=policy.max_adapter_norm)
    except ReceivedAdapterError as exc:
        log.warning(
            "client %d: refusing round %d (policy): the global adapter %s", node, server_round, escape_remote_text(exc)
        )
        return Refusal(node, POLICY, cap=policy.max_epsilon)
    prepared = _prepare(policy, request.cfg, f"round {server_round}", extension)
    if isinstance(prepared, Refusal):
        return prepared
    cfg, shard = prepared.cfg, prepared.shard
    if prepared.plan is None:
        seed = _seed(cfg, policy, server_round)
        result, arrays = _train(cfg, shard, request, None, [], seed, extension=extension)  # no DP: no Poisson rate
        public = _public(policy, prepared.sampling_size, result)
        return Update(arrays=arrays, metrics=TrainReport(node, None, public).to_metrics())
    data = (shard, prepared.content, extension, prepared.sampling_size)
    return _private_round(policy, cfg, request, data, prepared.plan)


def answer_preflight(
    policy: NodePolicy, request: PreflightRequest, extension: ShardExtension | None = None
) -> PreflightAnswer | Refusal:
    """How many of the rounds still planned (``first_round`` to ``federation.num_rounds``) this
    node can join within its own cap, decided as :func:`answer_round` decides each round.

    The same policy check, data and plan as a round (so the same refusals: ``policy`` or
    ``data``), then the ledger's history is read under its lock and nothing is written: no
    budget is spent, no release recorded, no reply cached, nothing trained. The rounds are
    projected with :func:`~fedllm.privacy.budget.check_round` at the run's mechanism, from the
    history as it is now. What the answer holds is what the train replies and refusals of these
    rounds would send (epsilon, cap, delta; the history they carry determines the rest): see
    :mod:`fedllm.federation.preflight`. A round this node already released before a server
    restart is counted again (the server's update would be replayed at no cost), so after a
    resume the answer may be one round short.
    """
    node, first = policy.partition_id, request.first_round
    run = escape_remote_text(request.run_id)
    if not policy.answer_preflight:
        # the operator's choice: nothing about this run before its rounds (the server's query is
        # not even checked against the policy: a refusal's category would already tell something)
        log.info(
            "client %d: declining the pre-flight of run %s (%s=false in its node config)", node, run, ANSWER_PREFLIGHT
        )
        return Refusal(node, DECLINED)
    prepared = _prepare(policy, request.cfg, f"the pre-flight of run {run}", extension)
    if isinstance(prepared, Refusal):
        return prepared
    planned = prepared.cfg.federation.num_rounds - first + 1
    if prepared.plan is None:
        log.info(
            "client %d: pre-flight of run %s: no DP-SGD in this run, so no budget applies to rounds %d-%d",
            node,
            run,
            first,
            first + planned - 1,
        )
        return PreflightAnswer(node, rounds_planned=planned, rounds_affordable=planned, cap=policy.max_epsilon)
    budget, dp = _mechanism(policy, prepared.cfg, prepared.plan)
    ledger_file = _ledger(policy, prepared.content, policy.state_key())
    with ledger_file.locked(timeout=PREFLIGHT_LOCK_TIMEOUT_S) as ledger:  # read only: never written here
        one_round = (dp.noise_multiplier, prepared.plan.sample_rate, prepared.cfg.train.local_steps)
        history = ledger.worst_history(delta=budget.delta, accountant=dp.accountant, then=one_round)
    affordable, decision = affordable_rounds(
        history,
        dp=dp,
        sample_rate=prepared.plan.sample_rate,
        local_steps=prepared.cfg.train.local_steps,
        budget=budget,
        planned=planned,
    )
    numbers = (
        f"epsilon {decision.spent:.4f} spent, {decision.projected:.4f} after them; cap {budget.max_epsilon:g} "
        f"at delta {budget.delta:g}"
    )
    if affordable < planned:
        log.warning(
            "client %d: pre-flight of run %s: this node's cap lets it train %d of the %d planned rounds; "
            "it will refuse from round %d (%s)",
            node,
            run,
            affordable,
            planned,
            first + affordable,
            numbers,
        )
    else:
        log.info("client %d: pre-flight of run %s: can train all %d planned rounds (%s)", node, run, planned, numbers)
    return PreflightAnswer(
        node,
        rounds_planned=planned,
        rounds_affordable=affordable,
        cap=budget.max_epsilon,
        spent=decision.spent,
        after=decision.projected,
        delta=budget.delta,
    )


def affordable_rounds(
    history: History, *, dp: DPSpec, sample_rate: float, local_steps: int, budget: Budget, planned: int
) -> tuple[int, BudgetDecision]:
    """How many of ``planned`` rounds the guard would allow one after another from ``history``,
    and the budget decision for that many rounds at once (``projected``: the epsilon after them).

    Epsilon grows with every step, so the allowed rounds are a prefix; it is found by bisection
    (a logarithmic number of accountant calls: the server chooses ``planned``). Rounds of one
    mechanism merge into one history entry, so ``k`` rounds at once are exactly ``k`` rounds in turn.
    """

    def decide(rounds: int) -> BudgetDecision:
        return check_round(
            history,
            noise_multiplier=dp.noise_multiplier,
            sample_rate=sample_rate,
            steps=rounds * local_steps,
            budget=budget,
            accountant=dp.accountant,
        )

    low, high = 0, planned
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if decide(middle).allowed else (low, middle - 1)
    return low, decide(low)


def _prepare(
    policy: NodePolicy, server_cfg: ExperimentConfig, what: str, extension: ShardExtension | None
) -> _Prepared | Refusal:
    """The policy check, then the node's shard and DP plan for ``what`` (a round, or the
    pre-flight); a refusal when the policy forbids the task or the data cannot serve it.

    The plan is computed from the node's public sampling size N, never from its record count n,
    so a deployed node's plan refusal (N below the batch, delta >= 1/N, a target out of reach) is
    decided before the data is opened and answered ``policy``, the same for every dataset; only a
    file that cannot be read, holds no record or breaks one of the node's own data rules is refused
    for the data (``data``: a property of the file, an operator's error).
    """
    node = policy.partition_id
    try:
        check_request(policy, server_cfg)
    except PolicyViolation as exc:
        log.warning("client %d: refusing %s (policy): %s", node, what, escape_remote_text(exc))
        return Refusal(node, POLICY, cap=policy.max_epsilon)
    if policy.audit_canaries and extension is None:  # a canary file but no hook to add them: never skip silently
        raise ConfigError(f"node config {AUDIT_CANARIES} is set, but the node was handed no canary extension")
    cfg = node_view(server_cfg, policy)
    plan = None
    if policy.sampling_size is not None and cfg.privacy.sample_level:
        # a deployed node's plan follows public values only (N and the server's numbers): decided
        # before the data is opened, so its refusal cannot depend on the records either
        try:
            plan = plan_for(cfg, policy.sampling_size)
        except PrivacyPlanError as exc:
            log.warning("client %d: refusing %s (policy): %s", node, what, escape_remote_text(exc))
            return Refusal(node, POLICY, cap=policy.max_epsilon)
    try:
        own, content = task.node_shard(cfg, node, policy.data_path, policy.data_format)
        shard = own if extension is None else extension.extend(own, lambda rs: task.tokenize_for_node(cfg, rs))
        if len(shard) == 0:
            raise DataError("the node's data holds no record to train on")
        size = len(shard) if policy.sampling_size is None else policy.sampling_size  # None: simulated only
        if plan is None and cfg.privacy.sample_level:  # a simulated node: its record count is its N
            plan = plan_for(cfg, size)
    except (DataError, PrivacyPlanError) as exc:
        log.error("client %d: declining %s (data): %s", node, what, escape_remote_text(exc))
        return Refusal(node, DATA, cap=policy.max_epsilon)
    return _Prepared(cfg, shard, content, plan, size)


def _mechanism(policy: NodePolicy, cfg: ExperimentConfig, plan: DPPlan) -> tuple[Budget, DPSpec]:
    """The cap this node enforces (the stricter of the run's and its own) and the DP-SGD it runs."""
    budget = effective_budget(
        run_target=cfg.privacy.target_epsilon,
        run_delta=cfg.privacy.delta,
        node_max_epsilon=policy.max_epsilon,
        node_delta=policy.delta,
    )
    dp = DPSpec(
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=cfg.privacy.max_grad_norm,
        accountant=policy.accountant,
        grad_sample_mode=cfg.privacy.grad_sample_mode,
    )
    return budget, dp


def _ledger(policy: NodePolicy, content: ShardContent, key: bytes | None) -> NodeLedger:
    """This node's ledger as it bears on the records of ``content`` (``key``: the node's own storage
    key, from encrypt-state, or None)."""
    return NodeLedger(policy.state_dir, policy.dataset_id, content, key=key, anchor=policy.anchor_path())


def node_view(cfg: ExperimentConfig, policy: NodePolicy) -> ExperimentConfig:
    """The server's config with the node's own data rules in place of the server's."""
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(
            cfg.data,
            overlong=policy.overlong,
            max_record_chars=policy.max_record_chars,
            duplicates=policy.duplicates,
            prompt_field=policy.prompt_field,
            response_field=policy.response_field,
        ),
    )


def _private_round(
    policy: NodePolicy, cfg: ExperimentConfig, request: RoundRequest, data: tuple, plan: DPPlan
) -> Answer:
    shard, content, extension, sampling_size = data
    node, run_id, server_round = policy.partition_id, request.run_id, request.server_round
    budget, dp = _mechanism(policy, cfg, plan)
    steps, rate = cfg.train.local_steps, plan.sample_rate
    key = policy.state_key()  # the node's own storage key (node config encrypt-state), or None
    cache = ReplyCache(policy.state_dir, key)
    # keyed by dataset too: one state directory may hold several datasets' budgets
    received = f"{policy.dataset_id}|{arrays_digest(request.received)}"

    def reply_key(release: int) -> tuple[str, int, str]:  # the reply that the ledger's release number `release` sent
        return (run_id, server_round, f"{received}|release {release}")

    # the lock covers check, training and record: a second run on this node waits, then sees this release
    with _ledger(policy, content, key).locked() as ledger:
        # a reply is replayed only as the release the ledger recorded last: one saved by a run
        # that died before recording it was never released, nor accounted
        if ledger.find(run_id, server_round) and (cached := cache.find(reply_key(ledger.recorded))):
            log.info(
                "client %d round %d: resending the update already released (no new privacy cost)", node, server_round
            )
            return Update(arrays=cached.arrays, metrics=TrainReport.replay_metrics(cached.metrics))
        # the lifetime history of the shard's record that is worst after this round
        round_ = (dp.noise_multiplier, rate, steps)
        history = ledger.worst_history(delta=budget.delta, accountant=dp.accountant, then=round_)
        decision = check_round(
            history,
            noise_multiplier=dp.noise_multiplier,
            sample_rate=rate,
            steps=steps,
            budget=budget,
            accountant=dp.accountant,
        )
        if not decision.allowed:
            log.warning("client %d round %d: %s", node, server_round, escape_remote_text(decision.reason))
            return Refusal(
                node, BUDGET, cap=budget.max_epsilon, spent=decision.spent, delta=budget.delta, history=history
            )
        expected = extend_history(history, noise_multiplier=dp.noise_multiplier, sample_rate=rate, steps=steps)
        seed = _seed(cfg, policy, server_round)
        result, arrays = _train(
            cfg, shard, request, dp, history, seed, extension=extension, sampling_size=sampling_size
        )
        if result.history != expected:  # the ledger must hold exactly what Opacus accounted
            raise LedgerError(f"Opacus accounted {result.history}, the ledger expected {expected}")
        if result.nonfinite:  # counted on the node only: which records, and how many, is nobody else's business
            log.warning(
                "client %d round %d: %d per-sample gradient(s) held inf or NaN and were zeroed before clipping "
                "(they contributed nothing; a crafted global adapter can cause this)",
                node,
                server_round,
                result.nonfinite,
            )
        after = check_round(
            expected,
            noise_multiplier=dp.noise_multiplier,
            sample_rate=rate,
            steps=steps,
            budget=budget,
            accountant=dp.accountant,
        )  # its `spent` is this round's epsilon
        accounting = Accounting(
            epsilon=after.spent,
            cap=budget.max_epsilon,
            delta=budget.delta,
            history=expected,
            can_continue=after.allowed,
        )
        metrics = TrainReport(node, accounting, _public(policy, sampling_size, result)).to_metrics()
        finite = all_finite(arrays)
        if finite:
            # the reply is saved before the release is recorded: a crash between the two leaves a reply
            # naming a release the ledger never got (never replayed: the round is trained and counted
            # once); the other order left a counted release without its reply, so it was counted twice
            cache.save(reply_key(ledger.recorded + 1), arrays, metrics)
        # persisted before the update can leave: a crash from here on keeps the release counted
        ledger.record(
            Release(
                run_id=run_id,
                server_round=server_round,
                noise_multiplier=dp.noise_multiplier,
                sample_rate=rate,
                steps=steps,
                fingerprint=content.fingerprint,
            )  # charged to the shard's records
        )
    if not finite:
        # Never sent. The update is a function of the received adapter, the run's public settings and
        # the noised gradient sums (each clipped per record, non-finite per-sample gradients zeroed),
        # so whether it is finite is post-processing of the DP output this release recorded: the
        # 'error' cannot tell more about a record than the update itself would have.
        log.error(
            "client %d round %d: the update is not finite (the server's adapter or learning rate?); "
            "its release is recorded (epsilon %.4f) and the server is told only 'error'",
            node,
            server_round,
            after.spent,
        )
        return Refusal(node, ERROR, cap=budget.max_epsilon, spent=after.spent, delta=budget.delta, history=expected)
    log.info(
        "client %d round %d: train loss %.4f (kept on this node), epsilon %.4f of cap %g",
        node,
        server_round,
        result.mean_loss,
        after.spent,
        budget.max_epsilon,
    )
    return Update(arrays=arrays, metrics=metrics)


def all_finite(arrays: dict[str, torch.Tensor]) -> bool:
    """Whether every value of every tensor is finite."""
    return all(bool(torch.isfinite(tensor).all()) for tensor in arrays.values())


def _seed(cfg: ExperimentConfig, policy: NodePolicy, server_round: int) -> int | None:
    """None: fresh OS entropy (the default, and always on a deployed node). A seed only in the
    ``seeded`` research mode of a simulated node: then anyone who knows ``cfg.seed`` can
    reproduce the noise, which the run's summary and console say."""
    if cfg.privacy.noise == "seeded" and policy.seeded_noise:
        return research_seed(cfg, policy.partition_id, server_round)
    return None


def research_seed(cfg: ExperimentConfig, partition_id: int, server_round: int) -> int:
    """The seed of a ``seeded`` node's round: a public function of the run's seed, so anyone who
    knows ``cfg.seed`` (the coordinator sent it) regenerates the node's noise (``fedllm audit`` does)."""
    return cfg.seed * 1_000_003 + partition_id * 1_009 + server_round


def _train(
    cfg: ExperimentConfig,
    shard,
    request: RoundRequest,
    dp: DPSpec | None,
    history: History,
    seed: int | None,
    *,
    extension: ShardExtension | None = None,
    sampling_size: int | None = None,
) -> tuple[LocalResult, dict[str, torch.Tensor]]:
    """Train one round; under DP the Poisson batches are fixed from ``sampling_size`` (N), not ``len(shard)``."""
    bundle = task.model_bundle(cfg.model, cfg.lora, cfg.seed)
    collate = make_collate(bundle.pad_id, prompt_only=cfg.train.objective == "choices")
    if extension is not None:
        collate = extension.collate(collate)
    spec = LocalSpec(
        steps=cfg.train.local_steps,
        batch_size=cfg.train.batch_size,
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        objective=cfg.train.objective,
        bf16=use_bf16(cfg.train.precision),
        micro_batches=cfg.train.micro_batches,
        max_length=cfg.data.max_length,  # DP steps pad every record to it (data-independent compute)
        seed=seed,
        optimizer=cfg.train.optimizer,
    )
    with bundle.adapter(request.received) as model:
        override = extension.override(model) if extension is not None else None
        records = shard if sampling_size is None else SamplingShard(shard, sampling_size)
        result = train_local(model, records, collate, spec, task.choice_ids_for(cfg), dp, history, override)
        return result, adapter_state(model)


def _public(policy: NodePolicy, sampling_size: int, result: LocalResult) -> PublicStats:
    """What the node's config declares public besides the adapter (nothing by default). A public
    size is N, the sampling size the DP plan already made public, never the records' number
    (its FedAvg weight then needs no release the accountant does not cover)."""
    return PublicStats(
        num_examples=sampling_size if policy.public_size else None,
        train_loss=float(result.mean_loss) if policy.public_metrics else None,
        train_seconds=float(result.seconds) if policy.public_metrics else None,
        examples_seen=int(result.examples_seen) if policy.public_metrics else None,
    )
