"""The site view document (fedkube.siteview) and the terms/policy check (fedkube.terms): pure."""

from __future__ import annotations

import pytest

from fedkube.errors import ConfigError
from fedkube.siteview import MESSAGE_CHARS, SITE_VIEW_LIMIT, SiteView, SiteViewError
from fedkube.terms import ROUNDS_NOT_ACCEPTED, STRATEGY_NOT_ACCEPTED, JobTerms, TermsPolicy, check_terms


def test_a_site_view_round_trips_bounded() -> None:
    view = SiteView("Stopped", 7, "QuorumLost", "m" * 5000)
    back = SiteView.from_json(view.to_json())
    assert (back.state, back.round, back.reason) == ("Stopped", 7, "QuorumLost")
    assert len(back.message) == MESSAGE_CHARS and len(view.to_json()) < SITE_VIEW_LIMIT


@pytest.mark.parametrize("raw", [
    b"x" * (SITE_VIEW_LIMIT + 1), b"[1]", b"not json", b'{"state": "Owned"}', b'{"round": -1}', b'{"round": true}',
    b'{"message": 3}', b'{"token": "leak"}',
])  # fmt: skip
def test_a_site_view_from_elsewhere_is_parsed_strictly(raw: bytes) -> None:
    with pytest.raises(SiteViewError):
        SiteView.from_json(raw)


@pytest.mark.parametrize(("terms", "refused"), [
    (JobTerms("fedavg", 5), None), (JobTerms("fedavg", 6), ROUNDS_NOT_ACCEPTED),
    (JobTerms("krum", 5), STRATEGY_NOT_ACCEPTED), (JobTerms(None, None), None),
])  # fmt: skip
def test_terms_against_a_policy(terms: JobTerms, refused: str | None) -> None:
    policy = TermsPolicy.from_json(TermsPolicy.of(["fedavg"], 5, "fedkube join").to_json(), name="X")
    got = check_terms(policy, terms)
    assert (got.reason if got else None) == refused
    if got is not None:
        assert "fedkube join" in got.message and "fix:" in got.message
    assert check_terms(TermsPolicy(), terms) is None


@pytest.mark.parametrize("raw", ['{"maxRounds": 0}', '{"maxRounds": "5"}', '{"allowedStrategies": "fedavg"}',
                                 '{"other": 1}', "[]", "{", "x" * 5000])
def test_a_bad_policy_document_names_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError, match="FEDKUBE_SITE_POLICY"):
        TermsPolicy.from_json(raw, name="FEDKUBE_SITE_POLICY")
