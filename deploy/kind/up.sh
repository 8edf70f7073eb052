#!/usr/bin/env bash
# `make kind-up`: a kind cluster running driftlab on CPUs. Creates the cluster (if absent),
# builds the CPU images and loads them into the nodes under a unique tag (a reused tag
# would leave old images cached on the nodes), then installs the chart with
# values-kind.yaml, which brings Argo Workflows, MinIO, the Pushgateway and
# kube-prometheus-stack, and waits until every pod is ready.
source "$(dirname "$0")/common.sh"
need docker kind kubectl
HELM="$(helm_bin)"

if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --config deploy/kind/cluster.yaml --wait 180s
fi
kubectl config use-context "kind-$CLUSTER" >/dev/null

TAG="${TAG:-kind-$(git rev-parse --short=12 HEAD)-$(date +%s)}"
make images VARIANT=cpu REGISTRY="$REGISTRY" TAG="$TAG"
IMAGE_TAG="$TAG-cpu"
for service in trainer extractor ot sae evaluator; do
  kind load docker-image --name "$CLUSTER" "$REGISTRY/driftlab-$service:$IMAGE_TAG"
done

"$HELM" repo add argo https://argoproj.github.io/argo-helm --force-update >/dev/null
"$HELM" repo add minio https://charts.min.io/ --force-update >/dev/null
"$HELM" repo add prometheus-community https://prometheus-community.github.io/helm-charts --force-update >/dev/null
"$HELM" dependency build helm/driftlab
"$HELM" upgrade --install "$RELEASE" helm/driftlab \
  --namespace "$NAMESPACE" --create-namespace \
  -f helm/driftlab/values-kind.yaml \
  --set images.registry="$REGISTRY" --set images.tag="$IMAGE_TAG" \
  --wait --timeout 20m
kubectl -n "$NAMESPACE" wait --for=condition=Ready pods --all --timeout=10m

mkdir -p "$(dirname "$TAG_FILE")"
echo "$IMAGE_TAG" > "$TAG_FILE"
echo "kind-up: driftlab $IMAGE_TAG is ready in namespace $NAMESPACE of kind-$CLUSTER"
