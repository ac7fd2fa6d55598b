"""The privacy plan of an experiment. Sample level (DP-SGD): per client, the noise for the target
under each accountant, the epsilon after each round, and which client binds. Client level
(DP-FedAvg): the epsilon after each round of the server's noised aggregate. ``fedllm plan``,
``fedllm simulate`` and the planning notebook all print this same plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedllm import task
from fedllm.config import ACCOUNTANTS, AccountantName, ExperimentConfig
from fedllm.errors import PrivacyPlanError
from fedllm.privacy.budget import effective_budget
from fedllm.privacy.calibration import DPPlan, epsilon_by_round, plan_client, rounds_within_cap
from fedllm.privacy.client_level import ZERO_OUT, clients_per_round, planned_epsilons


def plan_for(cfg: ExperimentConfig, shard_size: int, accountant: AccountantName | None = None) -> DPPlan:
    """The DP-SGD plan ``cfg`` gives a node that samples at ``shard_size`` records: noise from
    the run's schedule and target (or ``privacy.noise_multiplier``), and the sample rate it runs.

    Args:
        cfg: the experiment.
        shard_size: N, the record count the node's sampling is fixed from: a deployed node's
            public ``sampling-size`` (not its records, whose number the plan would then leak);
            in simulation the shard's size, public to the researcher.
        accountant: plan under this accountant instead of ``privacy.accountant``.

    Raises:
        PrivacyPlanError: the target cannot be met for this shard.
    """
    return plan_client(
        shard_size=shard_size,
        batch_size=cfg.train.batch_size,
        rounds=cfg.federation.num_rounds,
        local_steps=cfg.train.local_steps,
        target_epsilon=cfg.privacy.target_epsilon,
        delta=cfg.privacy.delta,
        accountant=accountant or cfg.privacy.accountant,
        noise_multiplier=cfg.privacy.noise_multiplier,
    )


@dataclass(frozen=True)
class PlanRow:
    """One client's plan under both accountants."""

    client: int
    shard_size: int
    sample_rate: float
    noise: dict[str, float]  # accountant -> noise multiplier meeting the target under it
    planned_epsilon: dict[str, float]  # accountant -> epsilon it certifies after the last round, at its noise
    epsilon_by_round: list[float]
    cap: float  # the node's effective cap (its own, where lower than the target)
    rounds_within_cap: int  # rounds it can join before the next would pass its cap
    unreachable: tuple[str, ...] = ()  # compared accountants that cannot certify the target at any useful noise


def build_plan(cfg: ExperimentConfig, accountants: tuple[AccountantName, ...] = ACCOUNTANTS) -> list[PlanRow]:
    """Plan every client of ``cfg`` (shard sizes come from the real split of the data) under
    ``accountants``; the epsilon curve is the one the configured accountant will report.

    Raises:
        PrivacyPlanError: the target cannot be met for some client.
    """
    shards = task.split_for(cfg).shards
    rows = []
    for client, shard in enumerate(shards):
        chosen = plan_for(cfg, len(shard))  # the plan training runs: it alone must be feasible
        plans, unreachable = _compared(cfg, len(shard), accountants, chosen)
        curve = epsilon_by_round(
            noise_multiplier=chosen.noise_multiplier,
            sample_rate=chosen.sample_rate,
            local_steps=cfg.train.local_steps,
            rounds=cfg.federation.num_rounds,
            delta=cfg.privacy.delta,
            accountant=cfg.privacy.accountant,
        )
        own = cfg.privacy.cap_for(client)
        budget = effective_budget(
            run_target=cfg.privacy.target_epsilon,
            run_delta=cfg.privacy.delta,
            node_max_epsilon=own.max_epsilon if own else None,
            node_delta=own.delta if own else None,
        )
        joinable = rounds_within_cap(
            noise_multiplier=chosen.noise_multiplier,
            sample_rate=chosen.sample_rate,
            local_steps=cfg.train.local_steps,
            max_rounds=cfg.federation.num_rounds,
            cap=budget.max_epsilon,
            delta=budget.delta,
            accountant=cfg.privacy.accountant,
        )
        rows.append(
            PlanRow(
                client=client,
                shard_size=len(shard),
                sample_rate=chosen.sample_rate,
                noise={name: plan.noise_multiplier for name, plan in plans.items()},
                planned_epsilon={name: plan.planned_epsilon for name, plan in plans.items()},
                epsilon_by_round=curve,
                cap=budget.max_epsilon,
                rounds_within_cap=joinable,
                unreachable=unreachable,
            )
        )
    return rows


def _compared(
    cfg: ExperimentConfig, shard_size: int, accountants: tuple[AccountantName, ...], chosen: DPPlan
) -> tuple[dict[str, DPPlan], tuple[str, ...]]:
    """The plan under each of ``accountants`` (the training one: ``chosen``), and those that cannot
    reach the target: a looser accountant (RDP bottoms out near epsilon 0.1 on short schedules) must
    not make a target that training's accountant meets look impossible."""
    plans: dict[str, DPPlan] = {}
    unreachable: list[str] = []
    for name in dict.fromkeys((*accountants, cfg.privacy.accountant)):
        if name == cfg.privacy.accountant:
            plans[name] = chosen
            continue
        try:
            plans[name] = plan_for(cfg, shard_size, name)
        except PrivacyPlanError:
            unreachable.append(name)
    return plans, tuple(unreachable)


def binding_row(rows: list[PlanRow]) -> PlanRow:
    """The client that needs the most noise: highest sampling rate, then smallest shard."""
    return max(rows, key=lambda row: (row.sample_rate, -row.shard_size))


def format_plan(cfg: ExperimentConfig, rows: list[PlanRow]) -> str:
    """The table ``fedllm plan`` prints: per client, the noise for the target under each planned
    accountant and the epsilon after each round under the one training uses; then the binding
    client and, with more than one accountant, how they compare.

    Args:
        cfg: the experiment.
        rows: :func:`build_plan`'s rows (at least one).

    Returns:
        The plan as text.
    """
    used = cfg.privacy.accountant
    found = {name for row in rows for name in (*row.noise, *row.unreachable)}
    columns = [name for name in ACCOUNTANTS if name in found] + sorted(found - set(ACCOUNTANTS))
    lines = [
        f"target epsilon {cfg.privacy.target_epsilon} at delta {cfg.privacy.delta}, "
        f"{cfg.federation.num_rounds} rounds x {cfg.train.local_steps} local steps, expected batch "
        f"{cfg.train.batch_size}, accountant used for training: {used}",
        "client  records  sample_rate  "
        + "  ".join(f"noise({name})" for name in columns)
        + f"    cap  rounds  epsilon({used}) after each round",
    ]
    for row in rows:
        curve = " ".join(f"{value:.3f}" for value in row.epsilon_by_round)
        noise = "  ".join(f"{row.noise[name]:>10.4f}" if name in row.noise else f"{'none':>10}" for name in columns)
        lines.append(
            f"{row.client:>6}  {row.shard_size:>7}  {row.sample_rate:>11.5f}  {noise}  "
            f"{row.cap:>5g}  {row.rounds_within_cap:>6}  {curve}"
        )
    binding = binding_row(rows)
    lines.append(_binding_line(cfg, binding))
    for row in rows:
        if row.rounds_within_cap < cfg.federation.num_rounds:
            lines.append(
                f"binding: client {row.client}'s own cap {row.cap:g} lets it join {row.rounds_within_cap} "
                f"of {cfg.federation.num_rounds} rounds; it refuses the rest"
            )
    if len(binding.noise) > 1:
        lines.append(compare_accountants(binding, used, cfg.privacy.noise_multiplier))
    for name in dict.fromkeys(name for row in rows for name in row.unreachable):
        lines.append(
            f"accountants: {name} cannot certify epsilon {cfg.privacy.target_epsilon:g} on this schedule at any "
            f"useful noise (column 'none'); training uses {used}, which can"
        )
    return "\n".join(lines)


def _binding_line(cfg: ExperimentConfig, binding: PlanRow) -> str:
    """Which client binds, and whether the target holds (with the noise fixed by the config, it may not)."""
    who = f"binding: client {binding.client} (smallest shard, {binding.shard_size} records, highest sampling rate)"
    fixed, target = cfg.privacy.noise_multiplier, cfg.privacy.target_epsilon
    if fixed is None:
        return f"{who} needs the most noise; the target epsilon is met after the last round"
    reached = binding.planned_epsilon[cfg.privacy.accountant]
    verdict = "within" if reached <= target else "ABOVE"
    return (
        f"{who} reaches epsilon {reached:.3f} after the last round at the fixed noise {fixed:g} "
        f"(privacy.noise_multiplier): {verdict} the target {target:g}"
    )


def format_client_plan(cfg: ExperimentConfig) -> str:
    """The client-level (DP-FedAvg) plan: who is sampled, the server's noise, and the epsilon
    after each round if every sampled client contributes (what the server's accountant reports
    then; a round with a silent client gets no sampling credit, so a run can end above it).

    Args:
        cfg: an experiment with ``privacy.mode`` ``client`` or ``both``.

    Returns:
        The plan as text.
    """
    fed, privacy = cfg.federation, cfg.privacy
    per_round = clients_per_round(fed.num_clients, fed.fraction_train, fed.min_train_clients)
    curve = planned_epsilons(
        noise_multiplier=privacy.client_noise_multiplier,
        delta=privacy.client_delta,
        population=fed.num_clients,
        per_round=per_round,
        rounds=fed.num_rounds,
    )
    sampling = (
        f"{per_round} of {fed.num_clients} clients per round, uniformly without replacement"
        if per_round < fed.num_clients
        else f"all {fed.num_clients} clients every round"
    )
    std = privacy.client_noise_multiplier * privacy.client_clip_norm / per_round
    target = privacy.client_target_epsilon
    planned = (
        f" (planned: the smallest meeting client_target_epsilon {target:g} after round {fed.num_rounds}, "
        f"{'within' if curve[-1] <= target else 'ABOVE'} it)"
        if target is not None
        else ""
    )
    return "\n".join(
        [
            f"client level (DP-FedAvg on the server, protects all of one client's records together): {sampling}, "
            f"{fed.num_rounds} rounds",
            f"clip {privacy.client_clip_norm:g} per client update ({privacy.client_clipping}), noise multiplier "
            f"{privacy.client_noise_multiplier:.4g}{planned} (std {std:.4g} on the mean of {per_round}), delta "
            f"{privacy.client_delta:g}; adjacency: {ZERO_OUT}",
            "epsilon after each round: " + " ".join(f"{value:.3f}" for value in curve),
            "if every sampled client contributes; a round in which one sends nothing is accounted without "
            "sampling credit, so the run's epsilon can end above this",
        ]
    )


def compare_accountants(row: PlanRow, used: str, fixed_noise: float | None = None) -> str:
    """One line comparing the accountants for ``row``'s client: the noise each needs for the
    target, and how much less the tightest needs; with the noise fixed by the config
    (``fixed_noise``), the epsilon each certifies after the last round instead.

    Every accountant here certifies an upper bound on the same mechanism's epsilon, so the one
    that needs the least noise is the tightest (PRV: within 0.5% of Google's dp-accounting PLD,
    see ``tests/unit/test_privacy.py``). Training adds the noise of ``used``.

    Args:
        row: the client to compare for (the binding one).
        used: the accountant training uses.
        fixed_noise: ``privacy.noise_multiplier``, if the config fixes it.

    Returns:
        The line.
    """
    if fixed_noise is not None:
        each = ", ".join(f"{name} {value:.3f}" for name, value in row.planned_epsilon.items())
        return (
            f"accountants: noise fixed at {fixed_noise:g} (privacy.noise_multiplier); epsilon after the "
            f"last round at client {row.client}: {each}; training uses {used}"
        )
    noise = row.noise
    tightest, loosest = min(noise, key=noise.__getitem__), max(noise, key=noise.__getitem__)
    each = ", ".join(f"{name} {value:.4f}" for name, value in noise.items())
    saving = 100 * (1 - noise[tightest] / noise[loosest])
    return (
        f"accountants: noise for the target at client {row.client}: {each}; {tightest} is the tightest "
        f"({saving:.1f}% less noise than {loosest}); training uses {used}"
    )
