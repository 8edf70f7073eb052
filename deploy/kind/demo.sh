#!/usr/bin/env bash
# `make kind-demo`: run workflows/tiny_cpu.py on the kind cluster and list what it stored.
# The spec is registered in the in-cluster MinIO through a port-forward (the pods reach it
# as http://minio:9000), then the Workflow is created as a custom object and followed.
source "$(dirname "$0")/common.sh"
need kubectl
[ -f "$TAG_FILE" ] || { echo "kind-demo: no images loaded yet; run \`make kind-up\` first" >&2; exit 2; }

secret() { kubectl -n "$NAMESPACE" get secret driftlab-s3 -o "jsonpath={.data.$1}" | base64 -d; }
kubectl -n "$NAMESPACE" port-forward svc/minio 19000:9000 >/dev/null 2>&1 &
FORWARD=$!
trap 'kill "$FORWARD"' EXIT
sleep 3

export DRIFTLAB_S3_ENDPOINT=http://127.0.0.1:19000
export AWS_ACCESS_KEY_ID="$(secret AWS_ACCESS_KEY_ID)"
export AWS_SECRET_ACCESS_KEY="$(secret AWS_SECRET_ACCESS_KEY)"
export DRIFTLAB_STORE=s3://driftlab DRIFTLAB_REGISTRY="$REGISTRY" DRIFTLAB_IMAGE_TAG="$(cat "$TAG_FILE")"

"$ROOT/.venv/bin/driftlab" submit workflows/tiny_cpu.py --via kubernetes --profile cpu \
  --namespace "$NAMESPACE" --wait
"$PYTHON" - <<'PY'
from shared.store import open_store
store = open_store("s3://driftlab")
for key in sorted(store.list("runs/")):
    print(key)
PY
