"""The aggregation strategy: Flower's, over adapter arrays, weighted by the one weight the server sets
(:data:`~fedllm.federation.records.FEDAVG_WEIGHT`) on each validated update.

Flower draws the train sample from the global ``random`` module and client-level DP noise from
the global ``np.random``; the subclasses here draw both from a
:class:`~fedllm.privacy.server_noise.ServerRandomness` instead (OS entropy unless the run is a
seeded research simulation), and otherwise leave Flower's logic as it is.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Strategy,
)
from flwr.supercore.differential_privacy import compute_stdv

from fedllm.config import Aggregation, ClientClipping, NoiseSource
from fedllm.federation import records as keys
from fedllm.privacy.client_level import clients_per_round
from fedllm.privacy.server_noise import ServerRandomness

log = logging.getLogger(__name__)

NODE_POLL_SECONDS = 1.0


def connected_nodes(
    grid: Grid, minimum: int, timeout: float = math.inf, poll_seconds: float = NODE_POLL_SECONDS
) -> list[int]:
    """The ids of the nodes connected to ``grid``, once at least ``minimum`` are or ``timeout``
    seconds have passed (a node that left for good must not stall the run).

    Args:
        grid: the Flower grid.
        minimum: how many nodes to wait for.
        timeout: the longest wait, in seconds; then whatever is connected.
        poll_seconds: how long to wait between two looks.

    Returns:
        Every connected node id (possibly fewer than ``minimum`` after the timeout).
    """
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.monotonic() >= deadline:
            log.warning("only %d of %d nodes connected after %g s: going on with them", len(nodes), minimum, timeout)
            break
        log.info("waiting for nodes to connect: %d connected, %d needed", len(nodes), minimum)
        time.sleep(min(poll_seconds, max(deadline - time.monotonic(), 0.0)))
    return nodes


class _ServerSampling(FedAvg):
    """Mixin for Flower's FedAvg family (listed before the Flower class, so its
    ``configure_train`` wins): the train sample comes from :attr:`randomness`.

    This is ``FedAvg.configure_train`` (same sample size, same wait for nodes, same messages)
    with our draw in place of Flower's ``random.sample``. Evaluation messages are never sent
    (``fraction_evaluate=0``), so evaluation sampling is left to Flower.
    """

    def __init__(self, *, randomness: ServerRandomness, node_wait: float = math.inf, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.randomness = randomness
        self.node_wait = node_wait

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One train message for each node sampled for ``server_round``."""
        if self.fraction_train == 0.0:
            return []
        nodes = connected_nodes(grid, max(self.min_available_nodes, self.min_train_nodes), self.node_wait)
        size = clients_per_round(len(nodes), self.fraction_train, self.min_train_nodes)
        sampled = self.randomness.sample(nodes, size, server_round)
        log.info("round %d: sampled %d of %d nodes", server_round, len(sampled), len(nodes))
        config["server-round"] = server_round  # as Flower does: clients read the round from it
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, sampled, MessageType.TRAIN)


class AdapterFedAvg(_ServerSampling, FedAvg):
    """Flower's FedAvg with the train sample drawn from a :class:`ServerRandomness`."""


class AdapterFedTrimmedAvg(_ServerSampling, FedTrimmedAvg):
    """Flower's FedTrimmedAvg with the train sample drawn from a :class:`ServerRandomness`."""


class AdapterFedMedian(_ServerSampling, FedMedian):
    """Flower's FedMedian with the train sample drawn from a :class:`ServerRandomness`."""


class ClientSideClipping(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping (nodes run ``fixedclipping_mod``), with the Gaussian
    noise on the aggregate drawn from :attr:`randomness` (Flower's ``add_gaussian_noise_inplace``
    uses the global ``np.random``).

    The standard deviation is Flower's (``compute_stdv``: ``z * C / k``); only the source changes.
    No Flower accountant is attached: :class:`~fedllm.privacy.client_level.ClientLevelAccountant`
    accounts each released aggregate.
    """

    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        clipping_norm: float,
        num_sampled_clients: int,
        *,
        randomness: ServerRandomness,
    ):
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        self.randomness = randomness
        self._noise_round: int | None = None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's aggregation and noise, remembering the round the noise is drawn for.

        The noise is calibrated to the updates that arrived: its standard deviation is
        ``z * C / k`` for the mean of ``k`` updates, so their sum always gets ``z * C``.
        """
        replies = list(replies)
        # Flower 1.42 has no per-round setter: ``num_sampled_clients`` is the public attribute its
        # wrapper reads both for the noise (compute_stdv) and for the count check in
        # validate_replies, so it is set here, the one place, to the updates actually aggregated
        self.num_sampled_clients = max(1, len(replies))
        self._noise_round = server_round
        try:
            return super().aggregate_train(server_round, replies)
        finally:
            self._noise_round = None

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        # overrides Flower's (same name, same contract), which draws from the global np.random
        if self._noise_round is None:
            raise RuntimeError("client-level noise is only added inside aggregate_train")
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
        noised = self.randomness.add_noise(aggregated_arrays.to_numpy_ndarrays(), std, self._noise_round)
        log.info("round %d: client-level DP noise with standard deviation %.4g added", self._noise_round, std)
        return ArrayRecord({name: Array(value) for name, value in zip(aggregated_arrays.keys(), noised, strict=True)})


class ServerSideClipping(ClientSideClipping):
    """Server-side fixed clipping: each update is clipped here as it arrives, then aggregated and
    noised exactly as with client-side clipping.

    Not Flower's ``DifferentialPrivacyServerSideFixedClipping``: its clip divides by the norm of
    each update, so one node that returned the global adapter unchanged (norm 0) raised
    ``ZeroDivisionError`` in ``aggregate_train`` and ended the run. Here a zero update stays zero.
    """

    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        clipping_norm: float,
        num_sampled_clients: int,
        *,
        randomness: ServerRandomness,
    ):
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients, randomness=randomness)
        self.current_arrays = ArrayRecord()

    def __repr__(self) -> str:
        return "Differential Privacy Strategy Wrapper (Server-Side Fixed Clipping, OS-entropy noise)"

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's messages; remembers the global adapter updates are measured from."""
        self.current_arrays = arrays
        return self._prepare_accounting(server_round, self.strategy.configure_train(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip every update to :attr:`clipping_norm`, then aggregate and add the noise."""
        reference = {key: array.numpy() for key, array in self.current_arrays.items()}
        clipped = [clip_reply(reply, reference, self.clipping_norm) for reply in replies]
        log.info("round %d: updates clipped to norm %g", server_round, self.clipping_norm)
        return super().aggregate_train(server_round, clipped)


def clip_reply(reply: Message, reference: dict[str, np.ndarray], clip_norm: float) -> Message:
    """``reply`` with each of its array records moved to within ``clip_norm`` (L2, over all its
    arrays together) of ``reference``; an update of norm 0 is left as it is.

    Args:
        reply: a node's reply (one with an error is returned unchanged, for Flower to count).
        reference: the global arrays the update is measured from, by name (never by position:
            a reply listing its arrays in another order must not escape the clip).
        clip_norm: C, the largest update norm kept.

    Returns:
        The same message, its array records replaced.
    """
    if reply.has_error():
        return reply
    for name, record in list(reply.content.array_records.items()):
        arrays = {key: array.numpy() for key, array in record.items()}
        updates = {key: value.astype(np.float64) - reference[key] for key, value in arrays.items()}
        norm = math.sqrt(sum(float(np.vdot(u, u)) for u in updates.values()))
        scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
        reply.content[name] = ArrayRecord(
            {key: Array((reference[key] + updates[key] * scale).astype(arrays[key].dtype)) for key in reference}
        )
    return reply


def adapter_strategy(
    *,
    aggregation: Aggregation,
    trim_fraction: float,
    fraction_train: float,
    min_train_nodes: int,
    min_available_nodes: int,
    weighted_by_key: str,
    randomness: ServerRandomness | None = None,
    node_wait: float = math.inf,
) -> FedAvg:
    """Flower's FedAvg, FedTrimmedAvg or FedMedian over adapter arrays with our wire keys.

    Evaluation is centralised on the server's held-out split, so no evaluate messages are sent.

    Args:
        aggregation: ``fedavg``, ``trimmed_mean`` or ``median``.
        trim_fraction: the fraction trimmed at each end (``trimmed_mean`` only).
        fraction_train: the fraction of connected nodes sampled each round.
        min_train_nodes: the fewest nodes sampled each round.
        min_available_nodes: the nodes to wait for before sampling.
        weighted_by_key: the metric FedAvg weights updates by.
        randomness: where the train sample comes from (default: OS entropy).
        node_wait: the longest wait for ``min_available_nodes`` each round, in seconds.

    Returns:
        The strategy.
    """
    strategy: type[_ServerSampling] = AdapterFedAvg
    extra: dict[str, float] = {}
    if aggregation == "trimmed_mean":
        strategy, extra = AdapterFedTrimmedAvg, {"beta": trim_fraction}
    elif aggregation == "median":
        strategy = AdapterFedMedian
    return strategy(
        fraction_train=fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=min_train_nodes,
        min_evaluate_nodes=0,
        min_available_nodes=min_available_nodes,
        weighted_by_key=weighted_by_key,
        arrayrecord_key=keys.ARRAYS,
        configrecord_key=keys.CONFIG,
        randomness=randomness or ServerRandomness(),
        node_wait=node_wait,
        **extra,
    )


def build_strategy(
    *,
    aggregation: Aggregation,
    trim_fraction: float,
    fraction_train: float,
    num_clients: int,
    client_level: bool,
    client_clipping: ClientClipping,
    client_noise_multiplier: float,
    client_clip_norm: float,
    noise: NoiseSource = "secure",
    seed: int = 0,
    node_wait: float = math.inf,
) -> Strategy:
    """The run's strategy; with client-level DP, wrapped in a fixed-clipping DP strategy.

    Client-level DP clips each client's whole update (on the server, or on the node with
    Flower's ``fixedclipping_mod``) and adds Gaussian noise to the uniform mean.

    Args:
        aggregation, trim_fraction, fraction_train: as in :func:`adapter_strategy`.
        num_clients: the federation's size (all are waited for).
        client_level: whether client-level DP runs.
        client_clipping: ``server`` or ``client``: who clips each update.
        client_noise_multiplier: z, the noise multiplier of the sum of clipped updates.
        client_clip_norm: C, the clipping bound of one client's update.
        noise: ``privacy.noise``: ``secure`` draws client sampling and noise from OS entropy;
            ``seeded`` derives them from ``seed`` (research simulations only).
        seed: the run's seed (used only by ``seeded``).
        node_wait: the longest wait for every node each round (``federation.round_timeout``).

    Returns:
        The strategy.

    Raises:
        ConfigError: ``noise`` is unknown.
    """
    randomness = ServerRandomness.from_noise(noise, seed)
    sampled = max(1, round(fraction_train * num_clients))
    inner = adapter_strategy(
        aggregation=aggregation,
        trim_fraction=trim_fraction,
        fraction_train=fraction_train,
        min_train_nodes=sampled,
        min_available_nodes=num_clients,
        weighted_by_key=keys.FEDAVG_WEIGHT,
        randomness=randomness,
        node_wait=node_wait,
    )
    if not client_level:
        return inner
    wrapper = ServerSideClipping if client_clipping == "server" else ClientSideClipping
    return wrapper(
        inner,
        noise_multiplier=client_noise_multiplier,
        clipping_norm=client_clip_norm,
        num_sampled_clients=sampled,
        randomness=randomness,
    )
