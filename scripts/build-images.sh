#!/usr/bin/env bash
# Build fedkube's images with podman, tagged as the chart and the examples name them:
#   ghcr.io/fedkube/fedkube:<version>          (Dockerfile: operator, FL server, sidecar)
#   ghcr.io/fedkube/quickstart-numpy:0.1.0     (examples/quickstart-numpy/Dockerfile)
#   ghcr.io/fedkube/digits-pytorch:0.1.0       (examples/digits-pytorch/Dockerfile, torch CPU)
#   ghcr.io/fedkube/lora-transformers:0.1.0    (examples/lora-transformers/Dockerfile, torch CPU, transformers, peft)
#
#   scripts/build-images.sh [base] [fedkube] [quickstart-numpy] [digits-pytorch] [lora-transformers]
#     (no argument: all four)
#   scripts/build-images.sh lock   (rewrites requirements/image.txt, the image's hashed dependency pins)
#
# No image registry is needed: the Python base image is made once from Debian's archive with debootstrap
# (about 2 minutes) and kept as a tarball in $FEDKUBE_IMAGE_CACHE (default ~/.cache/fedkube-images), so
# later builds, and CI runs that keep that directory, import it in seconds. With a registry at hand, plain
# `docker build .` uses python:3.11-slim instead (the Dockerfiles' default BASE).
# pip inside the build uses this machine's pip configuration (its config files, the CA bundle and the local
# wheel directories they name are mounted read-only) and the host network. FEDKUBE_TORCH_INDEX overrides
# the index torch's CPU build comes from (empty: pip's configured indexes).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${FEDKUBE_IMAGE_CACHE:-$HOME/.cache/fedkube-images}"
BASE_TAG="localhost/fedkube-base:bookworm"
SUITE=bookworm
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)"
FEDKUBE_TAG="ghcr.io/fedkube/fedkube:${VERSION}"

if ! command -v podman >/dev/null; then
  echo "build-images.sh: podman is not installed; fix: apt-get install -y podman runc debootstrap" >&2
  exit 1
fi

log() { echo "build-images.sh: $*" >&2; }

debian_mirror() {
  # The mirror this machine's apt uses (deb822 sources first, then one-line sources).
  local uri
  uri="$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1 || true)"
  [ -n "$uri" ] || uri="$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
                          | awk '{print $2}' | grep -v security | head -n1 || true)"
  echo "${uri:-http://deb.debian.org/debian}"
}

build_base() {
  if podman image exists "$BASE_TAG"; then
    return
  fi
  mkdir -p "$CACHE"
  local tarball="$CACHE/base-$SUITE.tar"
  if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || { log "debootstrap missing; fix: apt-get install -y debootstrap"; exit 1; }
    local rootfs
    rootfs="$(mktemp -d)"
    log "making the Python base from Debian $SUITE ($(debian_mirror)) into $tarball (once, ~2 min)"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip "$SUITE" "$rootfs" \
      "$(debian_mirror)" >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -n 20 "$CACHE/debootstrap.log" >&2; rm -rf "$rootfs"; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    # python:3.11-slim has `python`; Debian names it python3 (python-is-python3 would add a dependency chain).
    ln -sf python3 "$rootfs/usr/bin/python"
    tar -C "$rootfs" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
    rm -rf "$rootfs"
  fi
  # Debian's pip refuses to install into the system Python (PEP 668); in an image that is the point.
  podman import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' --quiet "$tarball" "$BASE_TAG" >/dev/null
  local tmp
  tmp="$(podman create "$BASE_TAG" /bin/true)"
  podman rm "$tmp" >/dev/null
}

pip_mounts() {
  # pip's global configuration and every local path it names, read-only, so the build resolves like pip here.
  local files=() f
  for f in /etc/pip.conf /etc/xdg/pip/pip.conf "$HOME/.config/pip/pip.conf" "$HOME/.pip/pip.conf"; do
    [ -f "$f" ] && files+=("$f")
  done
  local paths=()
  if [ "${#files[@]}" -gt 0 ]; then
    # A local index (file:///x/simple) links to files beside it: mount its parent.
    mapfile -t paths < <(grep -hoE '(file://)?/[^ ]+' "${files[@]}" | sed -e 's#^file://##' -e 's#/simple/*$##' \
                         | sort -u)
  fi
  [ -n "${PIP_FIND_LINKS:-}" ] && paths+=("$PIP_FIND_LINKS")
  [ -n "${PIP_CERT:-}" ] && paths+=("$PIP_CERT")
  local p
  {
    for f in "${files[@]}"; do
      # A user's config is read as the build's root user: mount it at root's location.
      case "$f" in
        "$HOME"/*) echo "-v $f:/root/${f#"$HOME"/}:ro" ;;
        *) echo "-v $f:$f:ro" ;;
      esac
    done
    for p in "${paths[@]}"; do
      [ -e "$p" ] && echo "-v $p:$p:ro"
    done
  } | sort -u
}

torch_index() {
  # The CPU wheel index unless this machine cannot resolve it (then pip's own indexes must have torch).
  local index="${FEDKUBE_TORCH_INDEX-https://download.pytorch.org/whl/cpu}"
  if [ -n "$index" ] && ! getent hosts "$(echo "$index" | sed -E 's#^[a-z]+://([^/:]+).*#\1#')" >/dev/null; then
    log "cannot resolve $index; installing torch from pip's configured indexes"
    index=""
  fi
  echo "$index"
}

build() {
  local tag="$1" context="$2"; shift 2
  local started=$SECONDS log_file
  log_file="$CACHE/build-$(basename "${tag%:*}").log"
  # shellcheck disable=SC2046  # pip_mounts prints one option pair per line, split on purpose
  podman build --network host $(pip_mounts) "$@" -t "$tag" "$context" \
    >"$log_file" 2>&1 || { tail -n 40 "$log_file" >&2; log "building $tag failed (log: $log_file)"; exit 1; }
  log "built $tag in $((SECONDS - started)) s"
}

lock() {
  # requirements/image.txt: every Python dependency of fedkube[operator,dp] pinned with its sha256, as pip
  # resolves them in the base image (Python 3.11, linux x86_64). The Dockerfile installs with --require-hashes.
  local src
  src="$(mktemp -d)"
  cp -r pyproject.toml README.md fedkube "$src/"
  # shellcheck disable=SC2046  # pip_mounts prints one option pair per line, split on purpose
  podman run --rm --network host $(pip_mounts) -v "$src:/src" -w /src "$BASE_TAG" \
    python -m pip install -q --dry-run --ignore-installed --report /src/report.json ".[operator,dp]" \
    >"$CACHE/lock.log" 2>&1 || { tail -n 20 "$CACHE/lock.log" >&2; exit 1; }
  python3 - "$src/report.json" >requirements/image.txt <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
print("# The fedkube image's Python dependencies (fedkube[operator,dp]), pinned with hashes for Python 3.11 on")
print("# linux x86_64. Generated by `scripts/build-images.sh lock`; the Dockerfile installs them with --require-hashes.")
for item in sorted(report["install"], key=lambda i: i["metadata"]["name"].lower()):
    meta, info = item["metadata"], item["download_info"]
    if meta["name"] == "fedkube":
        continue
    digest = info["archive_info"]["hashes"]["sha256"]
    print(f"{meta['name']}=={meta['version']} --hash=sha256:{digest}")
PY
  rm -rf "$src"
  log "wrote requirements/image.txt ($(grep -c -- '--hash' requirements/image.txt) packages)"
}

targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(fedkube quickstart-numpy digits-pytorch lora-transformers)
mkdir -p "$CACHE"
build_base
for target in "${targets[@]}"; do
  case "$target" in
    base) ;;  # built above
    lock) lock ;;
    fedkube) build "$FEDKUBE_TAG" . --build-arg "BASE=$BASE_TAG" ;;
    quickstart-numpy|digits-pytorch|lora-transformers)
      podman image exists "$FEDKUBE_TAG" || build "$FEDKUBE_TAG" . --build-arg "BASE=$BASE_TAG"
      extra=()
      [ "$target" != quickstart-numpy ] && extra=(--build-arg "TORCH_INDEX=$(torch_index)")
      build "ghcr.io/fedkube/$target:0.1.0" "examples/$target" --build-arg "FEDKUBE_IMAGE=$FEDKUBE_TAG" \
        "${extra[@]}" ;;
    *) log "unknown image $target; fix: one of base, lock, fedkube, quickstart-numpy, digits-pytorch, lora-transformers"; exit 2 ;;
  esac
done
