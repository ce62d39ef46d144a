"""scripts/gpu_check.sh's dependency step, standard library only (it runs before anything is installed).

    python scripts/gpu_preflight.py install REQUIREMENTS WHEELS_DIR OVERLAY
        Checks every requirement against the running python. When some are missing or too old, makes
        OVERLAY a virtual environment that sees this python's packages (torch included) and installs
        them there from WHEELS_DIR with pip, offline; prints ``PYTHON <overlay python>`` for the script
        to use from then on. A virtual environment, not ``pip --target``: --target ignores what is
        installed and would pull torch (nixl-cu12/13 depend on it) from the wheel folder; and pip may
        write into it where PEP 668 forbids writing into the system's python.
    python scripts/gpu_preflight.py imports REQUIREMENTS MODULE...
        Imports each requirement's module and each MODULE (ours, which pull in the rest), reports versions.

Every problem is one ``FAIL:`` line naming the distribution or module; exit status 1 if any.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import site
import subprocess
import sys
import traceback
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Requirement:
    name: str  # the distribution, as written
    spec: str  # e.g. ">=1.85.1" or ""
    module: str  # what `import` checks

    @property
    def line(self) -> str:
        return self.name + self.spec


def torch_cuda_major() -> str:
    """The CUDA major version this python's torch was built for; "12" for a CPU build or no torch (the
    NIXL wheel is then the default one, which moves DRAM like any other)."""
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        return "12"
    cuda = getattr(torch.version, "cuda", None)
    return cuda.split(".")[0] if cuda else "12"


def read_requirements(path: Path) -> list[Requirement]:
    cuda = None
    requirements = []
    for raw in path.read_text().splitlines():
        if "{cuda}" in raw:
            cuda = cuda or torch_cuda_major()
            raw = raw.replace("{cuda}", cuda)
        text, _, comment = raw.partition("#")
        text = text.strip()
        if not text:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*((?:[<>=!~]=?\s*[\w.*+]+\s*,?\s*)*)", text)
        if match is None:
            raise ValueError(f"{path}: cannot read requirement {text!r}")
        name, spec = match.group(1), match.group(2).replace(" ", "")
        module = re.search(r"import:\s*(\S+)", comment)
        requirements.append(Requirement(name, spec, module.group(1) if module else name.replace("-", "_").lower()))
    return requirements


def _release(version: str) -> tuple[int, ...]:
    """The numeric release part of a version (``7.35.1rc1`` -> (7, 35, 1)); enough for floors we write."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def _compare(left: tuple[int, ...], right: tuple[int, ...]) -> int:
    width = max(len(left), len(right))
    left, right = left + (0,) * (width - len(left)), right + (0,) * (width - len(right))
    return (left > right) - (left < right)


def satisfies(version: str, spec: str) -> bool:
    tests = {
        ">=": lambda c: c >= 0,
        "<=": lambda c: c <= 0,
        "==": lambda c: c == 0,
        "!=": lambda c: c != 0,
        ">": lambda c: c > 0,
        "<": lambda c: c < 0,
        "~=": lambda c: c >= 0,
    }
    for clause in filter(None, spec.split(",")):
        operator = re.match(r"[<>=!~]=?", clause).group(0)
        if not tests[operator](_compare(_release(version), _release(clause[len(operator) :]))):
            return False
    return True


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def unmet(requirements: list[Requirement]) -> list[tuple[Requirement, str | None]]:
    """(requirement, installed version or None) for each one this python does not satisfy."""
    result = []
    for requirement in requirements:
        version = installed_version(requirement.name)
        if version is None or not satisfies(version, requirement.spec):
            result.append((requirement, version))
    return result


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def wheels_for(name: str, wheels_dir: Path) -> list[Path]:
    if not wheels_dir.is_dir():
        return []
    return sorted(p for p in wheels_dir.glob("*.whl") if _normalized(p.name.split("-")[0]) == _normalized(name))


def make_overlay(overlay: Path) -> Path:
    """A virtual environment whose site-packages come first and then every site directory of this
    python (its own .pth files processed): it sees torch and the rest; pip installs into it. Returns
    its python."""
    venv.EnvBuilder(with_pip=False, clear=True, symlinks=os.name != "nt").create(overlay)
    python = overlay / "bin" / "python"
    own = subprocess.run(
        [str(python), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True, text=True
    )
    outer = [p for p in site.getsitepackages() + [site.getusersitepackages()] if Path(p).is_dir()]
    lines = [f"import site; site.addsitedir({p!r})" for p in outer]
    Path(own.stdout.strip(), "_gpu_check_outer.pth").write_text("\n".join(lines) + "\n")
    return python


def install(requirements_path: Path, wheels_dir: Path, overlay: Path) -> int:
    requirements = read_requirements(requirements_path)
    missing = unmet(requirements)
    if not missing:
        print(f"deps: all {len(requirements)} requirements of {requirements_path.name} met by {sys.executable}")
        return 0
    failed = False
    for requirement, version in missing:
        state = "not installed" if version is None else f"installed {version} does not satisfy {requirement.spec}"
        if not wheels_for(requirement.name, wheels_dir):
            failed = True
            print(
                f"FAIL: {requirement.line}: {state}, and WHEELS_DIR={wheels_dir} has no wheel for it "
                f"(add one: pip download '{requirement.line}' --only-binary=:all: -d {wheels_dir})"
            )
        else:
            print(f"deps: {requirement.line}: {state}; installing it from {wheels_dir}")
    installable = [r for r, _ in missing if wheels_for(r.name, wheels_dir)]
    if not installable:
        return 1
    python = make_overlay(overlay)
    if _has_pip():
        failed |= not _pip_install(python, wheels_dir, [r.line for r in installable])
    else:
        print("deps: no pip for this python; unpacking the wheels without dependency resolution")
        failed |= not _unpack_wheels(python, wheels_dir, requirements)
    print(f"PYTHON {python}")
    return 1 if failed else 0


def _has_pip() -> bool:
    try:
        importlib.import_module("pip")
    except ImportError:
        return False
    return True


def _pip_install(python: Path, wheels_dir: Path, lines: list[str]) -> bool:
    command = [str(python), "-m", "pip", "install", "--no-index", "--find-links", str(wheels_dir)]
    command += ["--disable-pip-version-check", "--no-input", *lines]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PIP_NO_INPUT="1"))
    sys.stdout.write(done.stdout[-4000:])
    if done.returncode == 0:
        return True
    sys.stdout.write(done.stderr[-4000:])
    absent = sorted(set(re.findall(r"No matching distribution found for ([^\s]+)", done.stderr)))
    for line in absent:
        print(f"FAIL: pip needs {line} and WHEELS_DIR={wheels_dir} has no wheel for it (a dependency: add it)")
    if not absent:
        print(f"FAIL: pip install from WHEELS_DIR={wheels_dir} failed (exit {done.returncode}); see above")
    return False


def _unpack_wheels(python: Path, wheels_dir: Path, requirements: list[Requirement]) -> bool:
    """Without pip: every wheel in WHEELS_DIR whose distribution this python lacks is unzipped into the
    overlay (a wheel's purelib/platlib is its root); dependencies are whatever the folder holds."""
    own = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True)
    target = Path(own.stdout.decode().strip())
    for wheel in sorted(wheels_dir.glob("*.whl")):
        name = wheel.name.split("-")[0]
        if installed_version(name) is not None and all(r.name != name for r, _ in unmet(requirements)):
            continue
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)
        for data in target.glob("*.data"):
            for scheme in ("purelib", "platlib"):
                for item in (data / scheme).glob("*") if (data / scheme).is_dir() else []:
                    item.rename(target / item.name)
        print(f"deps: unpacked {wheel.name}")
    return True


def check_imports(requirements_path: Path, modules: list[str]) -> int:
    failed = False
    for requirement in read_requirements(requirements_path):
        version = installed_version(requirement.name)
        if version is None or not satisfies(version, requirement.spec):
            failed = True
            print(f"FAIL: {requirement.line}: {'not installed' if version is None else f'found {version}'}")
    for module in [r.module for r in read_requirements(requirements_path)] + modules:
        try:
            importlib.import_module(module)
        except BaseException as error:  # a native library that fails to load raises OSError, even SystemExit
            failed = True
            last = traceback.format_exception_only(type(error), error)[-1].strip()
            print(f"FAIL: import {module}: {last}")
    if not failed:
        print(f"imports: all {len(modules)} modules and the requirements import with {sys.executable}")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "install":
        return install(Path(argv[1]), Path(argv[2]), Path(argv[3]))
    if len(argv) >= 2 and argv[0] == "imports":
        return check_imports(Path(argv[1]), argv[2:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
