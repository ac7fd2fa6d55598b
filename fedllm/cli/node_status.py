"""``fedllm node-status``: what a node has spent and what it has sent, for its operator.

Takes the same ``--node-config`` string the SuperNode runs with, reads the node's own ledger
(decrypting it with the node's key when ``encrypt-state`` is on) and its audit log, and prints
the spent epsilon (by the node's accountant, at its delta), the cap, what remains, and the
last rounds the node answered. The spent epsilon is the worst over the records of the node's
data file now (each record's own lifetime history, whatever file it was in before). Nothing
is sent anywhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flwr.common.config import parse_config_args

from fedllm.data.sources import load_records
from fedllm.errors import DataError, FedLLMError
from fedllm.federation import records as keys
from fedllm.federation.audit import AUDIT_FILE, PREFLIGHT, read_entries
from fedllm.federation.remote_text import escape_remote_text
from fedllm.node.policy import ANSWER_PREFLIGHT, DECLINED, NodePolicy, policy_from_node_config
from fedllm.privacy.node_ledger import NodeLedger, RecordGroup
from fedllm.privacy.record_keys import ShardContent


def node_status(policy: NodePolicy, last: int = 5) -> str:
    """A short report of the node's ledger and its last ``last`` audited rounds.

    The spent epsilon is the one the node's guard checks: the worst, over the records of the
    node's data file now, of the releases each record took part in. A simulated node (no data
    file) is shown by name: the releases filed under its dataset id and those naming no records.
    """
    content = _content(policy)
    ledger = NodeLedger(
        policy.state_dir, policy.dataset_id, content, key=policy.state_key(), anchor=policy.anchor_path()
    )
    spent = ledger.epsilon(delta=policy.delta, accountant=policy.accountant)
    runs = sorted({r.run_id for r in ledger.releases})
    lines = [
        f"state dir   {policy.state_dir}",
        f"dataset     {policy.dataset_id}",
        f"releases    {len(ledger.releases)} DP-SGD rounds in {len(runs)} run(s)",
        f"records     {_records_line(content, ledger.groups())}",
        f"epsilon     {_budget_line(spent, policy)}",
    ]
    lines += [f"            {line}" for line in _recent_rounds(policy.state_dir / AUDIT_FILE, last)]
    return "\n".join(lines)


def _records_line(content: ShardContent | None, groups: list[RecordGroup]) -> str:
    """How many distinct records the data file holds and how many of them no release touched yet."""
    if content is None:
        return "not read (no readable data file): epsilon by dataset id"
    fresh = sum(g.records for g in groups if not g.history)
    return f"{len(content.digests)} distinct in the data file, {fresh} never trained on (epsilon: the worst record's)"


def _content(policy: NodePolicy) -> ShardContent | None:
    """The node's records as its guard reads them (None when there is no readable file)."""
    if policy.data_path is None:
        return None  # a simulated node: its records are its shard of the experiment's data
    try:
        records = load_records(
            policy.data_path,
            policy.data_format,
            policy.prompt_field,
            policy.response_field,
            max_record_chars=policy.max_record_chars,
            duplicates=policy.duplicates,
        )
    except DataError:
        return None
    return ShardContent.of((r.prompt, r.response) for r in records)


def _preflight_answer(category: str | None, metrics: dict) -> str:
    """What the node answered a pre-flight, as ``node-status`` shows it."""
    if category == DECLINED:
        return f"declined ({ANSWER_PREFLIGHT}=false)"
    if category:
        return f"refused ({category})"
    return f"can train {metrics.get(keys.ROUNDS_AFFORDABLE)} of {metrics.get(keys.ROUNDS_PLANNED)} rounds"


def _recent_rounds(audit: Path, last: int) -> list[str]:
    if not audit.exists() and not audit.is_symlink():
        return ["no round answered yet (no audit log)"]
    entries, unreadable = read_entries(audit)
    out = [f"{unreadable} unreadable line(s) in {audit} skipped (torn by a crash, or edited)"] if unreadable else []
    for entry in entries[-last:]:
        received, sent = _mapping(entry.get("received")), _mapping(entry.get("sent"))
        metrics = _mapping(sent.get("metrics"))
        category = _mapping(_mapping(sent.get("config")).get(keys.STATUS)).get(keys.CATEGORY)
        if entry.get("kind") == PREFLIGHT:  # a question answered, nothing released
            what = _preflight_answer(category, metrics)
            where = f"pre-flight before round {escape_remote_text(received.get('round'))}"
        else:
            what = (
                f"refused ({category})"
                if category
                else f"sent {_count(sent.get('tensors'))} tensors, epsilon {_epsilon(metrics.get(keys.EPSILON))}"
            )
            where = f"round {escape_remote_text(received.get('round'))}"
        # the run id and round are what the coordinator sent: escaped, as in the node's log lines
        out.append(f"{entry.get('time')} run {escape_remote_text(received.get('run_id'))} {where}: {what}")
    return out


def _budget_line(spent: float, policy: NodePolicy) -> str:
    """Spent against the cap; a cap lowered below what was already spent is said, not shown as 0 left."""
    where = f"at delta {policy.delta:g} ({policy.accountant})"
    if spent > policy.max_epsilon:
        return (
            f"{spent:.4f} spent {where}: ABOVE the cap {policy.max_epsilon:g} (lowered after it was spent); "
            "this node refuses every round until max-epsilon is above what it spent"
        )
    return f"{spent:.4f} spent of cap {policy.max_epsilon:g} {where}; {policy.max_epsilon - spent:.4f} left"


def _epsilon(value: object) -> str:
    """A round's epsilon as the audit log holds it, to 4 decimals (the log keeps every digit)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.4f}"
    return "n/a"


def _count(value: object) -> int:
    return len(value) if isinstance(value, list) else 0


def _mapping(value: object) -> dict:
    """``value`` if it is a JSON object, else an empty one (an edited log is read, not trusted)."""
    return value if isinstance(value, dict) else {}


def node_status_cli(argv: list[str]) -> int:
    """``fedllm node-status --node-config '...' [--last N]``."""
    parser = argparse.ArgumentParser(
        prog="fedllm node-status",
        description=" ".join(__doc__.replace("``fedllm node-status``: what", "What").replace("``", "").split()),
    )
    parser.add_argument(
        "--node-config", required=True, help="the node's --node-config string, e.g. 'state-dir=\"/var/lib/fedllm\" ...'"
    )
    parser.add_argument("--last", type=int, default=5, help="how many audited rounds to show")
    args = parser.parse_args(argv)
    try:
        config = parse_config_args([args.node_config])
        print(node_status(policy_from_node_config(config), args.last))
    except (FedLLMError, ValueError, OSError) as exc:
        print(f"fedllm node-status: {exc}", file=sys.stderr)
        return 1
    return 0
