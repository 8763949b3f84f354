"""The Dockerfiles agree with what the operator's pods expect of the images (no container runtime needed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement  # pytest's own dependency
from packaging.utils import canonicalize_name

from fedkube import envvars
from fedkube.operator import builders

ROOT = Path(__file__).resolve().parents[2]
IMAGE_DOCKERFILE = ROOT / "Dockerfile"
EXAMPLES = ROOT / "examples"


def _instructions(path: Path, keyword: str) -> list[str]:
    """The arguments of every ``keyword`` instruction of a Dockerfile (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [line.split(None, 1)[1].strip() for line in text.splitlines()
            if line.strip().upper().startswith(keyword + " ")]


def test_the_image_runs_as_the_uid_and_gid_the_pods_force() -> None:
    # A pod's runAsUser overrides the image's USER; a different number would leave files the image made
    # for its user (its home, anything chowned) unreadable to the pod.
    users = _instructions(IMAGE_DOCKERFILE, "USER")
    assert users[-1] == f"{builders.RUN_AS}:{builders.RUN_AS}", users
    assert f"--uid {builders.RUN_AS} --gid {builders.RUN_AS}" in IMAGE_DOCKERFILE.read_text()


def test_the_image_exposes_every_port_the_server_and_sidecar_listen_on() -> None:
    exposed = {int(p) for line in _instructions(IMAGE_DOCKERFILE, "EXPOSE") for p in line.split()}
    ports = {envvars.DEFAULT_GRPC_PORT, envvars.DEFAULT_BULK_PORT, envvars.DEFAULT_STATUS_PORT,
             envvars.DEFAULT_METRICS_PORT, builders.SIDECAR_METRICS_PORT}
    assert ports <= exposed, f"not EXPOSEd: {sorted(ports - exposed)}"


@pytest.mark.parametrize("example", ["quickstart-numpy", "digits-pytorch", "lora-transformers"])
def test_each_example_image_is_tagged_as_its_fljob_names_it_and_has_its_script(example: str) -> None:
    job = yaml.safe_load((EXAMPLES / example / "fljob.yaml").read_text())
    trainer = job["spec"]["trainer"]
    script = (EXAMPLES / "../scripts/build-images.sh").resolve().read_text()
    repository, tag = trainer["image"].rsplit(":", 1)
    assert f"ghcr.io/fedkube/$target:{tag}" in script and repository == f"ghcr.io/fedkube/{example}"
    dockerfile = EXAMPLES / example / "Dockerfile"
    workdirs = _instructions(dockerfile, "WORKDIR")
    assert workdirs[-1] == trainer["workingDir"]
    copied = " ".join(_instructions(dockerfile, "COPY"))
    assert trainer["command"][-1] in copied.split(), (trainer["command"], copied)


def test_the_image_lock_pins_every_dependency_within_pyproject_s_ranges() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["operator"]]]
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements" / "image.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            pin, _, digest = line.partition(" --hash=sha256:")
            name, _, version = pin.partition("==")
            assert len(digest) == 64, line  # --require-hashes needs one on every line
            pins[canonicalize_name(name)] = version
    for req in wanted:
        version = pins.get(canonicalize_name(req.name))
        assert version is not None, f"{req.name} is not in requirements/image.txt; fix: scripts/build-images.sh lock"
        assert req.specifier.contains(version, prereleases=True), (
            f"requirements/image.txt pins {req.name}=={version}, outside pyproject's {req}; "
            "fix: scripts/build-images.sh lock")
