"""The audit's canaries: which exist, which are in the training data, where, and what they look like.

Each of ``m`` canaries is included independently with probability 1/2 (the coin the one-run
audit guesses) and, when included, placed in one client's data: the canaries are dealt out to the
clients in a random order, as evenly as they go (placement never depends on inclusion). Two kinds:

- ``gradient``: a record whose per-sample gradient is replaced by a designed one, of norm
  exactly the clipping bound, on a random sparse support of the adapter with random signs
  (nearly orthogonal to every other canary, to the noise and to the real gradients). It is the
  strongest test of the DP-SGD mechanism itself (a record's gradient may be anything of norm
  at most C), and what the coordinator scores by inner product with each update.
- ``record``: a record of 4 to 24 random words with a random answer: an input-space canary, scored by
  its loss under the final adapter against the base model (and by the coordinator through its
  clipped gradient direction).

All randomness comes from the audit's own secret (``audit.seed``, or fresh OS entropy): the
design is the auditor's, never the nodes' or the server's to choose.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedllm.config import AuditKind
from fedllm.errors import ConfigError

KINDS = ("gradient", "record")
SUPPORT = 1024  # coordinates per gradient canary (all of them for a smaller adapter)
MIN_WORDS, MAX_WORDS = 4, 24  # a record canary's prompt length, in words
# syllables of the random words a record canary is made of (no real word, no real record)
_SYLLABLES = ("ka", "zu", "mi", "ro", "te", "vi", "no", "sha", "bel", "dor", "fin", "gu", "lex", "pra", "qui", "wo")


@dataclass(frozen=True)
class Layout:
    """The adapter's tensors in a fixed order: where each starts in the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, state: dict) -> Layout:
        """The layout of an adapter state dict (names sorted, so every party agrees)."""
        names = tuple(sorted(state))
        return cls(names=names, shapes=tuple(tuple(int(d) for d in state[n].shape) for n in names))

    @property
    def size(self) -> int:
        """The flat vector's length."""
        return int(sum(int(np.prod(s)) for s in self.shapes))

    def offsets(self) -> dict[str, tuple[int, int]]:
        """``name -> (start, end)`` in the flat vector."""
        spans, start = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            end = start + int(np.prod(shape))
            spans[name] = (start, end)
            start = end
        return spans

    def flatten(self, state: dict) -> np.ndarray:
        """The state's tensors as one float64 vector in layout order."""
        return np.concatenate([np.asarray(state[n], dtype=np.float64).reshape(-1) for n in self.names])

    def unflatten(self, flat: np.ndarray) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`flatten`: float32 tensors by name (the adapter's dtype)."""
        return {
            name: torch.from_numpy(flat[start:end].reshape(shape).astype(np.float32))
            for (name, (start, end)), shape in zip(self.offsets().items(), self.shapes, strict=True)
        }


@dataclass(frozen=True)
class Canary:
    """One canary: whether it is in the data, and on which client."""

    index: int
    included: bool
    client: int
    prompt: str = ""  # record canaries only
    response: str = ""


@dataclass
class CanaryDesign:
    """Every canary of one audit and how to rebuild its gradient direction."""

    kind: AuditKind
    secret: int  # the auditor's; derives every direction
    clip_norm: float
    layout: Layout
    canaries: list[Canary] = field(default_factory=list)

    def direction(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Canary ``index``'s designed gradient as ``(flat indices, values)``: norm ``clip_norm``."""
        rng = np.random.Generator(np.random.Philox(key=[self.secret & (2**64 - 1), index]))
        support = min(SUPPORT, self.layout.size)
        where = np.sort(rng.choice(self.layout.size, size=support, replace=False))
        signs = rng.choice(np.array([-1.0, 1.0]), size=support)
        return where, signs * (self.clip_norm / np.sqrt(support))

    def unit_score(self, index: int, vector: np.ndarray) -> float:
        """The inner product of ``vector`` (flat, layout order) with canary ``index``'s unit direction."""
        where, values = self.direction(index)
        return float(np.dot(vector[where], values) / self.clip_norm)

    def for_client(self, client: int) -> list[Canary]:
        """The canaries in client ``client``'s data."""
        return [c for c in self.canaries if c.included and c.client == client]

    def placed_on(self, client: int) -> list[Canary]:
        """Every canary dealt to client ``client``, included or not (public to every adversary)."""
        return [c for c in self.canaries if c.client == client]

    def to_json(self) -> str:
        """The whole design (the auditor's file: which canaries are in is the secret the audit guesses)."""
        return json.dumps(
            {
                "kind": self.kind,
                "secret": str(self.secret),
                "clip_norm": self.clip_norm,
                "layout": {"names": self.layout.names, "shapes": self.layout.shapes},
                "canaries": [asdict(c) for c in self.canaries],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> CanaryDesign:
        """Inverse of :meth:`to_json`."""
        raw = json.loads(text)
        layout = Layout(names=tuple(raw["layout"]["names"]), shapes=tuple(tuple(s) for s in raw["layout"]["shapes"]))
        return cls(
            kind=raw["kind"],
            secret=int(raw["secret"]),
            clip_norm=float(raw["clip_norm"]),
            layout=layout,
            canaries=[Canary(**c) for c in raw["canaries"]],
        )

    def node_file(self, client: int, path: Path) -> Path:
        """Write the design restricted to ``client``'s included canaries (what its node trains on)."""
        own = CanaryDesign(
            kind=self.kind,
            secret=self.secret,
            clip_norm=self.clip_norm,
            layout=self.layout,
            canaries=self.for_client(client),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(own.to_json(), encoding="utf-8")
        return path


def design_canaries(
    *,
    count: int,
    kind: AuditKind,
    clients: int,
    clip_norm: float,
    layout: Layout,
    choices: tuple[str, ...] = (),
    seed: int | None = None,
) -> CanaryDesign:
    """Draw ``count`` canaries: each in with probability 1/2, dealt out evenly over the clients.

    Args:
        count: m, the number of canaries.
        kind: ``gradient`` or ``record``.
        clients: how many clients there are.
        clip_norm: the designed gradients' norm (the DP-SGD clipping bound).
        layout: the adapter's tensors.
        choices: the task's fixed answers (a record canary's answer is one of them; else random words).
        seed: the auditor's seed (None: fresh OS entropy; a test fixes it so its outcome is fixed).

    Raises:
        ConfigError: an unknown kind or a count below 2.
    """
    if kind not in KINDS:
        raise ConfigError(f"audit.kind: got {kind!r}; choose one of {', '.join(KINDS)}")
    if count < 2:
        raise ConfigError("audit.canaries: at least 2 canaries are needed to guess anything")
    secret = secrets.randbits(128) if seed is None else int(seed)
    rng = np.random.Generator(np.random.Philox(key=[secret & (2**64 - 1), 2**63]))
    included = rng.random(count) < 0.5
    # balanced: every client holds floor(m / K) or ceil(m / K) canaries, which ones by a random
    # permutation. A reply-level side channel (time, metadata, an error) tells about a node's
    # canaries together, so the fewer share a node the sharper it points at one canary
    # (fedllm.audit.side_channels); placement is fixed before inclusion, so it tells nothing of it.
    placed = rng.permutation(count) % clients
    canaries = []
    for index in range(count):
        prompt, response = ("", "")
        if kind == "record":
            # lengths differ (4-24 words), so that compute following length would show in reply time
            prompt = _words(rng, int(rng.integers(MIN_WORDS, MAX_WORDS + 1)))
            response = str(choices[rng.integers(len(choices))]) if choices else _words(rng, 6)
        canaries.append(
            Canary(
                index=index, included=bool(included[index]), client=int(placed[index]), prompt=prompt, response=response
            )
        )
    return CanaryDesign(kind=kind, secret=secret, clip_norm=float(clip_norm), layout=layout, canaries=canaries)


def _words(rng: np.random.Generator, count: int) -> str:
    return " ".join(
        "".join(_SYLLABLES[i] for i in rng.integers(len(_SYLLABLES), size=rng.integers(2, 4))) for _ in range(count)
    )
