"""Expected noise from the libraries fedllm drives, kept off the researcher's console.

Each filter names one message and says why it is expected; anything else a library prints
still shows. Installed by the processes that run fedllm's apps: the CLI's driver, and the
ClientApp / ServerApp modules (Ray's actors and Flower's app processes import them).
"""

from __future__ import annotations

import logging
import re
import warnings

# (warning category, start of the message, why it is expected)
_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (
        FutureWarning,
        "`is_gradient_checkpointing` is deprecated",
        "PEFT's PeftModel reads transformers' old property when it wraps a model; nothing to change on our side",
    ),
    (
        FutureWarning,
        "Tip: In future versions of Ray, Ray will no longer override accelerator",
        "fedllm relies on today's behaviour: an actor with no GPU share sees no GPU",
    ),
)

# (fragment of a Flower log message, why it is expected)
_FLOWER_LINES: tuple[tuple[str, str], ...] = (
    (
        "`run_simulation` function is deprecated",
        "fedllm simulate drives Flower's simulation engine in its own process on purpose (one command, "
        "no SuperLink to start); `flwr run` is documented for the Deployment Engine",
    ),
    ("fraction_evaluate is set to 0.0", "fedllm evaluates the global adapter on the server, never on the nodes"),
    ("Manually terminating ClientAppActor", "Flower's normal shutdown of its actors at the end of every run"),
)


class _DropExpected(logging.Filter):
    """Drops the Flower log records listed in :data:`_FLOWER_LINES`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment, _ in _FLOWER_LINES)


def quiet_libraries() -> None:
    """Install the filters (idempotent)."""
    for category, start, _ in _WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start), category=category)
    # Flower's state database runs alembic at start-up: seven "setup plugin" INFO lines per run
    logging.getLogger("alembic").setLevel(logging.WARNING)
    flower = logging.getLogger("flwr")
    if not any(isinstance(f, _DropExpected) for f in flower.filters):
        flower.addFilter(_DropExpected())
