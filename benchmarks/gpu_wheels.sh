#!/usr/bin/env bash
# Download the Python wheels benchmarks/gpu_suite.py needs on the lent GPU machine into
# .whl/ (ignored by git; the device call carries it). The machine's image already holds
# torch, transformers, numpy, scipy, scikit-learn, matplotlib, jinja2, rich, pyyaml,
# safetensors, requests and prometheus-client, and cannot reach a registry: these are the
# rest of what driftlab imports there (pydantic for the spec, POT and ruptures for the OT
# stage, hmmlearn for the evaluator, hera and kubernetes for `driftlab run`; the suite uses
# a folder store, so no minio), at the versions `make install` pins or resolves here, for
# CPython 3.12 on x86-64 (about 45 MB: the device carries at most 64 MiB with the tree).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
platforms=()
for n in 2_39 2_35 2_34 2_31 2_28 2_27 2_24 2_17 2_5; do platforms+=(--platform "manylinux_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection \
  POT==0.9.7.post1 ruptures==1.1.10 hmmlearn==0.3.3 \
  hera==6.0.0 kubernetes==37.0.1 durationpy==0.11 websocket-client requests-oauthlib oauthlib
du -sh .whl
ls .whl
