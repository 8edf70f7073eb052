# Settings shared by the kind scripts; sourced, not run. Override any by the environment.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
CLUSTER="${KIND_CLUSTER:-driftlab}"
NAMESPACE="${NAMESPACE:-driftlab}"
RELEASE="${RELEASE:-driftlab}"
REGISTRY="${REGISTRY:-driftlab}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
TAG_FILE="$ROOT/.tools/kind-image-tag"   # the tag kind-up loaded, for kind-demo

need() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || {
      echo "kind: '$tool' is not on PATH; install it (docker, kind >= 0.20, kubectl)" >&2
      exit 2
    }
  done
}

helm_bin() { "$PYTHON" -m deploy.helm_tool; }
