#!/usr/bin/env bash
# `make kind-down`: delete the kind cluster and everything in it.
source "$(dirname "$0")/common.sh"
need kind
kind delete cluster --name "$CLUSTER"
rm -f "$TAG_FILE"
