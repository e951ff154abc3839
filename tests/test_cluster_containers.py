"""The Apptainer definitions (containers/*.def): well-formed, installing from the one lock file, and build.sh.

There is no apptainer on the CI machine, so the definitions are checked statically: a small linter (header keys,
known sections, `bash -n` on every script section after `{{ var }}` substitution) plus what the sections must do.
"""

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONTAINERS = REPO / "containers"
DEFINITIONS = ("cuda", "rocm")

HEADER_KEYS = {"bootstrap", "from", "stage", "includecmd", "mirrorurl", "osversion", "include", "fingerprints",
               "registry", "namespace", "confurl", "updateurl"}  # fmt: skip
SECTIONS = {"setup", "files", "post", "environment", "runscript", "startscript", "test", "labels", "help", "arguments",
            "apprun", "appenv", "appfiles", "appinstall", "applabels", "apphelp", "apptest", "appstart"}  # fmt: skip
SCRIPT_SECTIONS = {"setup", "post", "environment", "runscript", "startscript", "test", "apprun", "appenv",
                   "appinstall", "apptest", "appstart"}  # fmt: skip
BOOTSTRAPS_NEEDING_FROM = {"docker", "library", "oras", "localimage", "shub"}


@dataclass
class Definition:
    header: dict[str, str] = field(default_factory=dict)
    sections: dict[str, str] = field(default_factory=dict)  # name -> body
    flags: dict[str, str] = field(default_factory=dict)  # name -> text after the section name (e.g. "-c /bin/bash")
    arguments: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def lint(text: str, name: str = "def") -> Definition:
    """Parse one single-stage Apptainer definition and report what is wrong with it."""
    parsed = Definition()
    current: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        section = re.match(r"^%(\w+)(.*)$", stripped)
        if section:
            current = section.group(1).lower()
            if current not in SECTIONS:
                parsed.errors.append(f"{name}:{number}: unknown section %{current}")
            if current in parsed.sections:
                parsed.errors.append(f"{name}:{number}: section %{current} appears twice")
            parsed.sections[current] = ""
            parsed.flags[current] = section.group(2).strip()
            continue
        if current is None:
            if not stripped or stripped.startswith("#"):
                continue
            key, sep, value = stripped.partition(":")
            if not sep or key.strip().lower() not in HEADER_KEYS:
                parsed.errors.append(f"{name}:{number}: bad header line {stripped!r}")
                continue
            parsed.header[key.strip().lower()] = value.strip()
        else:
            parsed.sections[current] += line + "\n"
    bootstrap = parsed.header.get("bootstrap")
    if bootstrap is None:
        parsed.errors.append(f"{name}: no Bootstrap header")
    elif bootstrap in BOOTSTRAPS_NEEDING_FROM and "from" not in parsed.header:
        parsed.errors.append(f"{name}: Bootstrap {bootstrap} needs From")
    for line in parsed.sections.get("arguments", "").splitlines():
        key, sep, value = line.strip().partition("=")
        if sep:
            parsed.arguments[key.strip()] = value.strip()
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", text))
    for missing in sorted(used - set(parsed.arguments)):
        parsed.errors.append(f"{name}: {{{{ {missing} }}}} has no default in %arguments")
    for section, body in parsed.sections.items():
        if section not in SCRIPT_SECTIONS:
            continue
        script = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: parsed.arguments.get(m.group(1), "X"), body)
        shell = parsed.flags[section].removeprefix("-c").strip() or "/bin/sh"
        # %environment is sourced by the container's /bin/sh: check it with a POSIX shell too.
        checkers = [["bash", "-n"]] + ([["sh", "-n"]] if section == "environment" or shell == "/bin/sh" else [])
        for checker in checkers:
            done = subprocess.run(checker, input=script, text=True, capture_output=True)
            if done.returncode != 0:
                parsed.errors.append(f"{name}: %{section}: {checker[0]} -n: {done.stderr.strip()}")
    return parsed


def definition(flavour: str) -> Definition:
    return lint((CONTAINERS / f"{flavour}.def").read_text(), f"{flavour}.def")


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        found = re.match(r"([A-Za-z0-9_.\-]+)==(\S+)$", line.strip())
        if found:
            pins[re.sub(r"[-_.]+", "-", found[1]).lower()] = found[2]
    return pins


@pytest.mark.parametrize("flavour", DEFINITIONS)
def test_definition_is_well_formed(flavour: str) -> None:
    parsed = definition(flavour)
    assert parsed.errors == []
    assert parsed.header["bootstrap"] == "docker"
    assert {"arguments", "files", "post", "environment", "runscript", "test", "labels", "help"} <= set(parsed.sections)
    assert parsed.sections["runscript"].split() == ["exec", "hepml", '"$@"']
    assert "hepml validate" in parsed.sections["test"] and "import torch, ray, deepspeed" in parsed.sections["test"]
    for line in parsed.sections["files"].splitlines():
        if line.strip():
            source = line.split()[0]
            assert (REPO / source).exists(), f"%files source {source} does not exist (build runs from the repo root)"


def test_vendor_images_and_their_gpu_settings() -> None:
    cuda, rocm = definition("cuda"), definition("rocm")
    assert cuda.arguments["BASE_IMAGE"].startswith("nvcr.io/nvidia/pytorch:")
    assert rocm.arguments["BASE_IMAGE"].startswith("rocm/pytorch:")
    assert "torch.version.cuda" in cuda.sections["post"] and "torch.version.hip" in rocm.sections["post"]
    for name in ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_SOCKET_IFNAME", "NCCL_DEBUG"):
        assert f"export {name}=" in cuda.sections["environment"] and f"export {name}=" in rocm.sections["environment"]
    for name in ("MIOPEN_USER_DB_PATH", "MIOPEN_CUSTOM_CACHE_DIR", "NCCL_NET_GDR_LEVEL"):
        assert f"export {name}=" in rocm.sections["environment"]


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ({"ROCR_VISIBLE_DEVICES": "2,3"}, "HIP=2,3 ROCR= MIOPEN=/tmp/alice-miopen"),
        ({"ROCR_VISIBLE_DEVICES": "2,3", "HIP_VISIBLE_DEVICES": "0"}, "HIP=0 ROCR=2,3 MIOPEN=/tmp/alice-miopen"),
        ({"MIOPEN_USER_DB_PATH": "/tmp/job-7"}, "HIP= ROCR= MIOPEN=/tmp/job-7"),
    ],
)
def test_rocm_environment_moves_the_slurm_gpu_mask_for_ray(before: dict[str, str], after: str) -> None:
    """%environment is sourced by /bin/sh at container start; run it the same way."""
    environment = definition("rocm").sections["environment"]
    probe = environment + 'echo "HIP=${HIP_VISIBLE_DEVICES:-} ROCR=${ROCR_VISIBLE_DEVICES:-} MIOPEN=$MIOPEN_CUSTOM_CACHE_DIR"\n'
    done = subprocess.run(["sh", "-c", probe], env={"PATH": "/usr/bin:/bin", "USER": "alice", **before},
                          capture_output=True, text=True)  # fmt: skip
    assert done.stdout.strip() == after, done.stderr


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("Bootstrp: docker\nFrom: x\n%post\n    true\n", "bad header line"),
        ("Bootstrap: docker\n%post\n    true\n", "needs From"),
        ("Bootstrap: docker\nFrom: x\n%psot\n    true\n", "unknown section %psot"),
        ("Bootstrap: docker\nFrom: x\n%post\n    if true; then\n", "bash -n"),
        ("Bootstrap: docker\nFrom: {{ BASE }}\n%post\n    true\n", "{{ BASE }} has no default"),
        ("Bootstrap: docker\nFrom: x\n%environment\n    export DEVICES=(0 1)\n", "sh -n"),  # a bash-only array
    ],
)
def test_linter_catches_broken_definitions(broken: str, message: str) -> None:
    assert any(message in error for error in lint(broken).errors), lint(broken).errors


def test_both_images_install_identical_versions_from_the_one_lock() -> None:
    """Both images copy the repository's requirements.lock and run the same installer, which pins nothing itself."""
    parsed = {flavour: definition(flavour) for flavour in DEFINITIONS}
    files = {flavour: parsed[flavour].sections["files"].split() for flavour in DEFINITIONS}
    assert files["cuda"] == files["rocm"]
    assert ["requirements.lock", "/opt/hepml_dist/requirements.lock"] == files["cuda"][:2]
    for flavour in DEFINITIONS:
        post = parsed[flavour].sections["post"]
        assert "bash /opt/hepml_dist/containers/install.sh" in post
        assert not re.search(r"\bpip\b|==", post), f"{flavour}.def installs packages outside the lock"
    assert [p for p in sorted(CONTAINERS.iterdir()) if p.name.endswith((".lock", ".txt"))] == [], "a second lock file"
    installer = (CONTAINERS / "install.sh").read_text()
    installs = [line for line in installer.splitlines() if "pip install" in line]
    assert installs and all("-c requirements.lock" in line for line in installs)
    assert not re.search(r"[A-Za-z0-9]==\d", installer), "install.sh pins a version itself"
    subprocess.run(["bash", "-n", str(CONTAINERS / "install.sh")], check=True)


def test_lock_pins_every_runtime_dependency() -> None:
    """Nothing hepml_dist needs at run time floats: each dependency (besides the image's torch) is in the lock."""
    pyproject = (REPO / "pyproject.toml").read_text()  # (tomllib is 3.11+; the project supports 3.10)
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.S | re.M).group(1)
    export = re.search(r"^export = \[(.*?)\]", pyproject, re.M).group(1)
    requirements = re.findall(r'^\s*"([^"]+)"', dependencies, re.M) + re.findall(r'"([^"]+)"', export)
    assert len(requirements) > 10
    names = {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", r).group(0)).lower() for r in requirements}
    missing = sorted(names - {"torch"} - set(lock_pins()))
    assert missing == [], f"not pinned in requirements.lock: {missing}"
    assert "torch" not in lock_pins(), "torch comes from the vendor image and must not be in the lock"


def test_build_script_builds_from_the_repository_root(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake = bin_dir / "apptainer"
    fake.write_text(f'#!/bin/sh\necho "$PWD $*" >> {calls}\n')
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    build = str(CONTAINERS / "build.sh")
    done = subprocess.run([build, "rocm", "out/img.sif", "--build-arg", "BASE_IMAGE=rocm/pytorch:x"], env=env,
                          cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    cwd, *args = calls.read_text().split()
    fakeroot = [] if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() == "0" else ["--fakeroot"]
    assert Path(cwd) == REPO
    assert args == ["build", *fakeroot, "--build-arg", "BASE_IMAGE=rocm/pytorch:x", str(tmp_path / "out/img.sif"),
                    "containers/rocm.def"]  # fmt: skip
    done = subprocess.run([build, "cpu"], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "unknown image 'cpu'" in done.stderr
    done = subprocess.run([build, "cuda"], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert done.returncode == 1 and "neither apptainer nor singularity" in done.stderr
