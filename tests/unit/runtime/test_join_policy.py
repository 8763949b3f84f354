"""`fedkube join`'s site policy and withdrawal settings for its sidecar (fedkube.runtime.join.site_env)."""

from __future__ import annotations

from pathlib import Path

from fedkube import envvars
from fedkube.runtime.join import Endpoints, site_env
from fedkube.security import enroll
from fedkube.sidecar.config import SidecarConfig
from fedkube.terms import JobTerms, TermsPolicy, check_terms


def test_the_sidecar_of_fedkube_join_gets_the_site_policy_and_leaves_when_stopped(tmp_path: Path) -> None:
    bundle = enroll.JoinBundle(namespace="ns", job="j", site="s1", server_name="h", addresses=("h",), grpc_port=7070,
                               bulk_port=0, enroll_port=8472, ca_pem="", ca_sha256="sha256:" + "a" * 64, token="t",
                               expires_at="2030-01-01T00:00:00Z")  # fmt: skip
    (tmp_path / "token").write_text("bearer")
    policy = TermsPolicy.of(["fedavg"], 4, "fedkube join --max-rounds/--allow-strategy")
    env = site_env(bundle, tmp_path, Endpoints("h", 7070, 0, 8472), {}, policy)
    env[envvars.TLS] = "disabled"
    config = SidecarConfig.from_env(env)
    assert config.site_controlled and config.policy == policy
    refusal = check_terms(config.policy, JobTerms("fedavg", 5))
    assert refusal is not None and "--max-rounds" in refusal.message
    assert envvars.SITE_POLICY not in site_env(bundle, tmp_path, Endpoints("h", 7070, 0, 8472), {}, TermsPolicy())
