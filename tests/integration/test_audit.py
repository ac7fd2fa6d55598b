"""``fedllm audit`` end to end on the tiny model, in process (seconds per run, no Ray).

The bound is a statistical statement, so every check is set where it can fail and where a
false alarm is rarer than 1 in 1,000: the "at or below the accounted epsilon" checks use a
confidence of 0.9995 for all adversaries together (the audit corrects for their number); the power checks
fix the auditor's seed and have a wide margin. The one-run ceiling caps what any run can show
(with 200 canaries about 3 at 95%), so the DP checks audit runs planned for epsilon 1 or 0.5,
well under that ceiling: a broken mechanism would be caught. The seeded-noise regression test
runs in the fast tier; the others (a few full runs each) in the slow tier.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from fedllm.audit.run import AUDIT_JSON, COORDINATOR, READER, format_audit, run_audit
from fedllm.config import AuditConfig, PrivacyConfig, TrainConfig
from tests.conftest import tiny_config

STRICT = 0.9995  # all adversaries together: a false alarm in fewer than 1 in 1,000 audits
CANARIES = 200


def audited(
    tmp_path,
    name: str,
    *,
    privacy: PrivacyConfig,
    confidence: float = STRICT,
    optimizer: str = "adamw",
    kind: str = "gradient",
) -> dict:
    """Audit the tiny federation (3 clients, 2 rounds of 3 steps, expected batch 64: with ~200
    records per client a canary is drawn at least once with probability ~0.8)."""
    cfg = tiny_config(train=TrainConfig(local_steps=3, batch_size=64, eval_batch_size=50, optimizer=optimizer))
    cfg = dataclasses.replace(
        cfg,
        privacy=dataclasses.replace(privacy, state_dir=str(tmp_path / name / "nodes")),
        tracking=dataclasses.replace(cfg.tracking, progress=False),
    )
    settings = AuditConfig(canaries=CANARIES, kind=kind, confidence=confidence, seed=7)
    audit = run_audit(cfg, settings, tmp_path / name)
    assert json.loads((tmp_path / name / AUDIT_JSON).read_text()) == audit
    if audit["canaries_sampled"] is not None:  # sample-level: the canaries the batches ever held
        assert 0 < audit["canaries_sampled"] <= audit["canaries_included"]
        assert audit["power"] > 0
    return audit


def bounds(audit: dict) -> dict[str, float]:
    return audit["epsilon_lower_bound"]


@pytest.mark.slow
def test_dp_sgd_audit_stays_at_or_below_the_accounted_epsilon(tmp_path):
    audit = audited(tmp_path, "dp", privacy=PrivacyConfig(target_epsilon=1.0))
    assert 0.9 < audit["epsilon_accounted"] <= 1.0
    for name, bound in bounds(audit).items():
        assert bound <= audit["epsilon_accounted"], (name, audit["adversaries"][name])
    summary = json.loads((tmp_path / "dp" / "summary.json").read_text())
    assert summary["audit"]["epsilon_lower_bound"] == bounds(audit)
    assert (tmp_path / "dp" / "audit_scores.png").stat().st_size > 0


@pytest.mark.slow
def test_without_dp_the_coordinator_finds_the_canaries(tmp_path):
    audit = audited(tmp_path, "none", privacy=PrivacyConfig(mode="none"), confidence=0.95)
    assert audit["epsilon_accounted"] is None
    coordinator = audit["adversaries"][COORDINATOR]
    # the power of the audit: most of the way to what 200 canaries can show at all
    assert coordinator["epsilon_lower_bound"] > 2.0, coordinator
    assert coordinator["epsilon_lower_bound"] > 0.7 * coordinator["ceiling"], coordinator
    assert audit["adversaries"][READER]["epsilon_lower_bound"] > 1.0, audit["adversaries"][READER]


@pytest.mark.slow  # slow tier: two whole audits
def test_seeded_noise_is_caught_and_node_side_noise_is_not(tmp_path):
    """The regression test for the node boundary: with ``privacy.noise=seeded`` the coordinator,
    who sent the seed, regenerates each node's noise and subtracts it; the same run with the
    node's own OS-entropy noise keeps the bound under the accounted epsilon."""
    planned = PrivacyConfig(target_epsilon=0.5)
    seeded = audited(
        tmp_path, "seeded", privacy=dataclasses.replace(planned, noise="seeded"), confidence=0.95, optimizer="sgd"
    )
    assert seeded["epsilon_accounted"] <= 0.5
    # the audit could show far more than was accounted: a bound below the accounted epsilon would mean something
    assert seeded["power"] > 4 * seeded["epsilon_accounted"], seeded
    assert "power" in format_audit(seeded)
    assert bounds(seeded)[COORDINATOR] > 2 * seeded["epsilon_accounted"], seeded["adversaries"][COORDINATOR]
    secure = audited(tmp_path, "secure", privacy=planned, optimizer="sgd")
    for name, bound in bounds(secure).items():
        assert bound <= secure["epsilon_accounted"], (name, secure["adversaries"][name])


@pytest.mark.slow
def test_record_canaries_under_dp_stay_below_the_accounted_epsilon(tmp_path):
    audit = audited(tmp_path, "record", privacy=PrivacyConfig(target_epsilon=1.0), kind="record")
    for name, bound in bounds(audit).items():
        assert bound <= audit["epsilon_accounted"], (name, audit["adversaries"][name])


def client_audit(tmp_path, name: str, noise: float, confidence: float) -> dict:
    """A client-level audit: 100 canary clients beside the 3 real ones, 2 rounds."""
    cfg = tiny_config()
    # delta 1e-8: the bound's delta term (2 m delta) stays far below the tests' significance levels
    privacy = PrivacyConfig(
        mode="client", client_noise_multiplier=noise, client_delta=1e-8, state_dir=str(tmp_path / name / "nodes")
    )
    cfg = dataclasses.replace(cfg, privacy=privacy, tracking=dataclasses.replace(cfg.tracking, progress=False))
    return run_audit(cfg, AuditConfig(canaries=100, confidence=confidence, seed=11), tmp_path / name)


@pytest.mark.slow
def test_client_level_audit_with_canary_clients_stays_at_or_below_the_client_level_epsilon(tmp_path):
    audit = client_audit(tmp_path, "client", noise=6.0, confidence=STRICT)
    assert audit["level"] == "client" and audit["kind"] == "client"
    # below what 100 canaries can show at this confidence (about 2.2): the check can fail
    assert 0 < audit["epsilon_accounted"] < 1.3
    assert audit["bounded_by_accounting"] == ["aggregate_reader", READER]
    for name in audit["bounded_by_accounting"]:
        assert bounds(audit)[name] <= audit["epsilon_accounted"], (name, audit["adversaries"][name])
    # the coordinator sees each client's update before the noise: client-level DP does not cover it
    assert bounds(audit)[COORDINATOR] > audit["epsilon_accounted"]


@pytest.mark.slow
def test_client_level_audit_has_power_when_the_noise_is_negligible(tmp_path):
    audit = client_audit(tmp_path, "weak", noise=0.01, confidence=0.95)
    assert audit["epsilon_accounted"] > 100
    # 50 of 50 right is 1.96 at 95% over the 36 tests of three adversaries (2.16 over one adversary's 12)
    assert bounds(audit)["aggregate_reader"] > 1.9 and bounds(audit)[READER] > 1.9, audit["adversaries"]
