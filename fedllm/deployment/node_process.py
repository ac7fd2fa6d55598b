"""``fedllm node run``: the node's own ClientApp process, for a SuperNode in ``--isolation process``.

Flower's ``flwr-clientapp`` (``flwr/supernode/runtime/run_clientapp.py``) unpacks the app bundle
(FAB) the coordinator submitted and imports its ClientApp with the bundle first on ``sys.path``:
whoever submits the bundle runs code on the node. This process talks the same local Runtime
(ClientAppIo) API of the SuperNode, with Flower's own client, messages and conversions, but:

* it loads :data:`fedllm.node.app_check.CLIENTAPP` from the fedllm installed on the node, once, at
  start: no bundle file is extracted, put on ``sys.path`` or imported, and nothing is installed;
* it answers a message only when the bundle is one the node accepts
  (:func:`fedllm.node.app_check.check_app`: the installed code, or an approved hash); otherwise it
  replies a ``policy`` refusal before anything reads the node's data, plan or ledger, and names the
  bundle's hash and first differing file on the node's console and in its audit log.

Messages are answered one at a time, in this one process (the base model stays loaded between
rounds); the node's state across messages travels in Flower's ``Context``, as under ``flwr-clientapp``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedllm.federation import records as keys
from fedllm.federation.audit import PREFLIGHT, audit_round
from fedllm.federation.protocol import preflight_reply, refusal_reply
from fedllm.node.app_check import PINNED_ENV, AppVerdict, Digests, approved_hashes, check_app, installed_digests
from fedllm.node.policy import POLICY, policy_from_node_config
from fedllm.node.release import Refusal

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0  # as Flower's SuperExec polls the Runtime API for a task


def answer(message: Message, context: Context, fab: Fab, installed: Digests) -> Message:
    """The node's reply to one message: the installed ClientApp's, if the bundle is accepted; else a ``policy`` refusal.

    Raises:
        ConfigError: the node config's approved hashes or policy are malformed (the operator's error).
    """
    verdict = check_app(fab.content, installed, approved_hashes(context.node_config))
    if verdict.accepted:
        log.info("run %s: %s", context.run_id, verdict.describe())
        from fedllm.federation.client_app import app  # the installed module: this process never imports a bundle

        return app(message=message, context=context)
    log.warning("run %s: %s (Flower's FAB hash %s)", context.run_id, verdict.describe(), fab.hash_str)
    return refuse(message, context.node_config, verdict)


def refuse(message: Message, node_config: Mapping, verdict: AppVerdict) -> Message:
    """A ``policy`` refusal of ``message`` (nothing read but the node config), recorded in the node's audit log."""
    policy = policy_from_node_config(node_config)
    refusal = Refusal(policy.partition_id, POLICY, cap=policy.max_epsilon)
    kind = message.metadata.message_type
    reply = preflight_reply(message, refusal) if kind == PREFLIGHT else refusal_reply(message, refusal)
    received: Mapping = message.content.config_records.get(keys.CONFIG) or {}
    audit_round(policy.state_dir, received, reply.content, kind=kind, app=verdict.to_dict())
    return reply


def _client(address: str, certificates: bytes | None, *interceptors) -> RuntimeHttpClient:
    """Flower's Runtime API client (TLS when ``certificates`` are given)."""
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=certificates is None,
        root_certificates=certificates,
        interceptors=list(interceptors),
        retry_invoker=make_simple_http_retry_invoker(),
    )


def run_task(address: str, token: str, certificates: bytes | None, installed: Digests) -> None:
    """Pull one task (message, context, run, FAB) with ``token``, answer it, push the reply and the context."""
    client = _client(
        address,
        certificates,
        RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
        RuntimeTokenHttpInterceptor(token),
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context: Context | None = None
    status, details = SubStatus.FAILED, "the node's ClientApp failed; its log has the detail"
    try:
        message, context, _, fab = pull_task_input(client)
        try:
            reply = answer(message, context, fab, installed)
            status, details = SubStatus.COMPLETED, ""
        except Exception:  # noqa: BLE001 - Flower would send the exception's text; it stays in this node's log
            log.exception("run %s: the node failed to answer; the server is told only that it failed", context.run_id)
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        push_message(client, reply, context)
    finally:
        push_task_output(client=client, context=context, sub_status=status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()


def serve(address: str, certificates: bytes | None = None, max_tasks: int | None = None) -> int:
    """Answer the SuperNode's ClientApp tasks until stopped (or ``max_tasks`` have been answered).

    Args:
        address: the SuperNode's Runtime API (``flower-supernode --host``/``--port``).
        certificates: the CA certificate of a Runtime API served over TLS, or None (loopback).
        max_tasks: stop after that many tasks (None: run until the process is stopped).

    Returns:
        The number of tasks answered.
    """
    os.environ[PINNED_ENV] = "1"  # the ClientApp knows it was loaded by this process (no warning)
    from fedllm.federation.client_app import show_node_log

    show_node_log()
    logging.getLogger("fedllm").propagate = False  # Flower's root handler would print every node line twice
    installed = installed_digests()
    log.info("fedllm node run: serving the SuperNode at %s with the installed fedllm", address)
    acquirer = _client(address, certificates, RuntimeVersionHttpInterceptor(component_name="SuperExec"))
    done = 0
    try:
        while max_tasks is None or done < max_tasks:
            acquired = acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if acquired.HasField("task") and acquired.token:
                try:
                    run_task(address, acquired.token, certificates, installed)
                except Exception:  # noqa: BLE001 - one task's broken connection must not stop the node's process
                    log.exception("a task could not be completed (the SuperNode expires it); serving on")
                done += 1
                continue
            time.sleep(POLL_SECONDS)
    finally:
        acquirer.close()
    return done
