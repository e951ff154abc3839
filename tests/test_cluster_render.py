"""Site profiles and the rendered sbatch script: what each site's script asks SLURM for and does, and clear errors."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from hepml_dist.cli import app
from hepml_dist.errors import UserError
from hepml_dist.launch.slurm import load_site, render_sbatch, site_names
from hepml_dist.spec import dump_spec, load_job, parse_spec

REPO = Path(__file__).resolve().parents[1]
IMAGE = ["--set", "cluster.slurm.container_image=/images/hepml.sif"]
LUMI_JOB = ["parallel.accelerator=MI250X", "parallel.num_workers=16", "parallel.cpus_per_worker=6",
            "cluster.slurm.nodes=2", "cluster.slurm.account=project_465000001", "cluster.slurm.time=2-00:00:00",
            "cluster.slurm.container_image=/scratch/project_465000001/hepml-rocm.sif"]  # fmt: skip


def render(job: str, site: str, overrides: list[str] = (), site_overrides: list[str] = (), **kwargs) -> str:
    spec = load_job(REPO / "jobs" / job, overrides)
    return render_sbatch(spec, load_site(site, site_overrides), **kwargs)


def sbatch_options(script: str) -> dict[str, str]:
    options = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH ") :].partition("=")
            options[key] = value
    return options


def bash_syntax_ok(script: str) -> None:
    done = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert done.returncode == 0, done.stderr


def test_every_site_profile_loads_and_renders_valid_bash() -> None:
    assert {"lumi", "a100", "local"} <= set(site_names())
    jobs = {"lumi": ("part-jetclass.yaml", LUMI_JOB), "a100": ("mlpf-clic.yaml", ["cluster.slurm.nodes=2"]),
            "local": ("part-quickstart.yaml", ["cluster.slurm.nodes=2"])}  # fmt: skip
    for site in site_names():
        job, overrides = jobs.get(site, ("part-quickstart.yaml", []))
        script = render(job, site, [*overrides, "cluster.slurm.container_image=/images/hepml.sif"])
        bash_syntax_ok(script)
        assert script.startswith("#!/bin/bash\n")


def test_lumi_script_requests_gcds_moves_rocr_mask_and_sets_rccl_environment() -> None:
    script = render("part-jetclass.yaml", "lumi", LUMI_JOB)
    options = sbatch_options(script)
    assert options["--nodes"] == "2" and options["--ntasks-per-node"] == "1"
    assert options["--gpus-per-node"] == "8" and options["--cpus-per-task"] == "56"
    assert options["--partition"] == "standard-g" and options["--account"] == "project_465000001"
    assert options["--time"] == "2-00:00:00" and options["--exclusive"] == ""
    assert options["--signal"] == "B:USR1@120" and "--requeue" in options and options["--open-mode"] == "append"
    assert "RAY_GPUS=8\n" in script and "RAY_CPUS=56\n" in script
    assert '--num-gpus="$RAY_GPUS"' in script and '--num-cpus="$RAY_CPUS"' in script
    assert "CONTAINER=(singularity exec --rocm -B /scratch,/project,/flash /scratch/project_465000001/hepml-rocm.sif)" in script
    assert 'export HIP_VISIBLE_DEVICES=$ROCR_VISIBLE_DEVICES\n  unset ROCR_VISIBLE_DEVICES' in script
    assert 'export NCCL_SOCKET_IFNAME="hsn0,hsn1,hsn2,hsn3"' in script
    assert 'export MIOPEN_USER_DB_PATH="/tmp/${USER}-${SLURM_JOB_ID}-miopen"' in script
    assert "module load singularity-AI-bindings aws-ofi-rccl" in script


def test_rocr_to_hip_move_in_the_node_script_behaves() -> None:
    """Run the node script's first lines (up to `ray start`) with SLURM's mask set and check what Ray would see."""
    script = render("part-jetclass.yaml", "lumi", LUMI_JOB)
    node = script.split("<<'HEPML_RAY_NODE_END'\n", 1)[1].split("\nHEPML_RAY_NODE_END", 1)[0]
    head = node.split("args=(", 1)[0].replace('mkdir -p "$MIOPEN_USER_DB_PATH"', ":")
    probe = head + 'echo "HIP=${HIP_VISIBLE_DEVICES:-unset} ROCR=${ROCR_VISIBLE_DEVICES:-unset} ip=$ip"\n'
    done = subprocess.run(
        ["bash", "-c", probe, "ray-node", "1", "10.0.0.1:6379", "10.0.0.2", "30000", "/tmp/ray-1-1"],
        env={"PATH": "/usr/bin:/bin", "ROCR_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, capture_output=True, text=True,
    )  # fmt: skip
    assert done.stdout.strip() == "HIP=0,1,2,3,4,5,6,7 ROCR=unset ip=10.0.0.2", done.stderr


def test_a_ray_node_that_ignores_sigterm_is_killed_and_its_temp_dir_removed(tmp_path: Path) -> None:
    """The node script gives Ray RAY_STOP_GRACE_S after SIGTERM, then kills it and its children, and still removes
    the node's temp dir (a step SLURM kills first leaves it behind). `ray` here is a stand-in that ignores SIGTERM."""
    script = render("part-quickstart.yaml", "local", ["cluster.slurm.container_image=/images/hepml.sif",
                                                     "cluster.slurm.nodes=2"])
    node = script.split("<<'HEPML_RAY_NODE_END'\n", 1)[1].split("\nHEPML_RAY_NODE_END", 1)[0]
    bin_dir, temp_dir = tmp_path / "bin", tmp_path / "ray-temp"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text("#!/bin/bash\ntrap '' TERM\nsleep 300 &\necho $! > \"$CHILD_PID_FILE\"\nwait\n")
    (bin_dir / "ray").chmod(0o755)
    environment = {"PATH": f"{bin_dir}:/usr/bin:/bin", "RAY_CPUS": "1", "RAY_GPUS": "0", "RAY_PORT": "6379",
                   "RAY_DASHBOARD": "false", "RAY_STOP_GRACE_S": "1", "CHILD_PID_FILE": str(tmp_path / "child")}
    node_step = subprocess.Popen(["bash", "-c", node, "ray-node", "0", "", "127.0.0.1", "50000", str(temp_dir), "env"],
                                 env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 10
    while not (tmp_path / "child").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert temp_dir.is_dir()
    node_step.send_signal(signal.SIGTERM)
    try:
        output, _ = node_step.communicate(timeout=15)
    finally:
        node_step.kill()
    assert "Ray did not stop within 1 s of SIGTERM: killing it" in output
    assert "Ray stopped (exit 0)" in output
    assert not temp_dir.exists()
    child = int((tmp_path / "child").read_text())
    with pytest.raises(ProcessLookupError):  # the stand-in's child went with it (once reaped by init, it is gone)
        for _ in range(50):
            os.kill(child, 0)
            time.sleep(0.1)


def test_a100_script_runs_everything_in_the_cuda_container() -> None:
    script = render("mlpf-clic.yaml", "a100", ["cluster.slurm.nodes=3", "parallel.num_workers=12", *IMAGE[1:]])
    options = sbatch_options(script)
    assert options["--gpus-per-node"] == "4" and options["--nodes"] == "3" and options["--partition"] == "gpu"
    assert "CONTAINER=(apptainer exec --nv /images/hepml.sif)" in script
    assert '"${CONTAINER[@]}" ray start' not in script  # the node script gets the prefix as its arguments
    assert '"$@" ray start "${args[@]}"' in script
    assert '"${CONTAINER[@]}" "${command[@]}"' in script
    assert 'export NCCL_SOCKET_IFNAME="^lo,docker0"' in script


def test_node_addresses_come_from_slurm_not_hostname() -> None:
    script = render("part-quickstart.yaml", "local", ["cluster.slurm.nodes=2", *IMAGE[1:]])
    code = [line for line in script.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code if re.search(r"\bhostname\b(?!s)", line)]
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
    assert "NodeAddr=" in script


def test_embedded_job_is_the_resolved_spec() -> None:
    overrides = ["cluster.slurm.nodes=2", "optim.lr=3.0e-4", *IMAGE[1:]]
    spec = load_job(REPO / "jobs/part-quickstart.yaml", overrides)
    script = render_sbatch(spec, load_site("local"))
    embedded = script.split("<<'HEPML_JOB_SPEC_END'\n", 1)[1].split("HEPML_JOB_SPEC_END\n", 1)[0]
    assert parse_spec(yaml.safe_load(embedded)) == spec
    assert embedded == dump_spec(spec)


def test_train_command_and_run_dir_placeholders_become_shell_variables() -> None:
    script = render(
        "part-quickstart.yaml", "local", ["cluster.slurm.nodes=2", *IMAGE[1:]],
        ["train_command=python -u my train.py --job {job} --at {address} --out={run_dir}/x"],
        run_dir="/shared/runs/quick-{job_id}",
    )  # fmt: skip
    assert 'local command=(python -u my train.py --job "${HEPML_JOB_FILE}" --at "${HEAD_ADDRESS}" --out="${HEPML_RUN_DIR}"/x)' in script
    assert 'HEPML_RUN_DIR=$(realpath -m /shared/runs/quick-"${SLURM_JOB_ID}")' in script
    default = render("part-quickstart.yaml", "local", ["cluster.slurm.nodes=2", *IMAGE[1:]])
    assert 'local command=(hepml train "${HEPML_JOB_FILE}" --address "${HEAD_ADDRESS}" --run-dir "${HEPML_RUN_DIR}")' in default
    assert 'HEPML_RUN_DIR=$(realpath -m runs/part-quickstart-"${SLURM_JOB_ID}")' in default


@pytest.mark.parametrize(
    ("job", "site", "overrides", "site_overrides", "expected"),
    [
        ("mlpf-clic.yaml", "lumi", IMAGE[1:], [], "parallel.accelerator: A100 is not available on site 'lumi'"),
        ("part-jetclass.yaml", "lumi", [*LUMI_JOB, "parallel.num_workers=17"], [], "need 17 GPUs"),
        ("part-jetclass.yaml", "lumi", [*LUMI_JOB, "parallel.gpus_per_worker=2"], [], "need 32 GPUs"),
        ("part-quickstart.yaml", "lumi", IMAGE[1:], [], "parallel.accelerator: cpu is not available on site 'lumi'"),
        ("part-quickstart.yaml", "local", ["cluster.slurm.nodes=2"], [], "cluster.slurm.container_image: site 'local'"),
        ("part-quickstart.yaml", "local", ["cluster.slurm.nodes=2", "parallel.cpus_per_worker=2", *IMAGE[1:]], [],
         "parallel.cpus_per_worker"),
        ("part-quickstart.yaml", "local", ["cluster.slurm.nodes=2", "cluster.slurm.time=1 hour", *IMAGE[1:]], [],
         "cluster.slurm.time"),
        ("part-quickstart.yaml", "local", ["cluster.slurm.nodes=2", *IMAGE[1:]],
         ["ray.temp_dir=/scratch/project_465000001/somebody/ray-tmp/{job_id}"], "AF_UNIX"),
        ("part-quickstart.yaml", "local", ["cluster.slurm.nodes=2", *IMAGE[1:]],
         ["train_command=hepml train {job} --addr {head}"], "unknown placeholder {head}"),
        ("part-quickstart.yaml", "local", ["cluster.slurm.nodes=2", *IMAGE[1:]], ["ray.join_timeot_s=5"],
         "ray.join_timeot_s: unknown field"),
        ("part-quickstart.yaml", "local", ["cluster.slurm.nodes=2", *IMAGE[1:]], ["env={1BAD: x}"],
         "not shell variable names: 1BAD"),
    ],
)  # fmt: skip
def test_problems_are_reported_with_the_field_to_change(job, site, overrides, site_overrides, expected) -> None:
    with pytest.raises(UserError) as err:
        render(job, site, overrides, site_overrides)
    assert expected in str(err.value)


def test_unknown_site_lists_the_known_ones() -> None:
    with pytest.raises(UserError, match=r"unknown site 'lumi-c'.*known sites: a100, local, lumi"):
        load_site("lumi-c")


def test_site_files_extend_each_other(tmp_path: Path) -> None:
    mine = tmp_path / "mysite.yaml"
    mine.write_text(f"extends: {REPO / 'cluster/sites/a100.yaml'}\nname: mysite\npartition: gpu-a100\ngpus_per_node: 8\n")
    site = load_site(str(mine))
    assert (site.name, site.partition, site.gpus_per_node, site.container.exec) == (
        "mysite", "gpu-a100", 8, "apptainer exec --nv {image}")  # fmt: skip


def test_cli_render_and_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "job.sbatch"
    result = runner.invoke(
        app, ["slurm", "render", str(REPO / "jobs/part-quickstart.yaml"), "--site", "local", "--set",
              "cluster.slurm.nodes=2", *IMAGE, "--site-set", "ray.join_timeout_s=42", "-o", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "RAY_JOIN_TIMEOUT=42\n" in text and out.stat().st_mode & 0o111
    bash_syntax_ok(text)

    result = runner.invoke(app, ["slurm", "render", str(REPO / "jobs/part-quickstart.yaml")])
    assert result.exit_code == 2 and "no site: pass --site" in result.output
    result = runner.invoke(app, ["slurm", "render", str(REPO / "jobs/mlpf-clic.yaml"), "--site", "lumi", *IMAGE])
    assert result.exit_code == 2 and "parallel.accelerator" in result.output and "Traceback" not in result.output
    # the job may name its site
    result = runner.invoke(
        app, ["slurm", "render", str(REPO / "jobs/part-quickstart.yaml"), "--set", "cluster.slurm.site=local",
              "--set", "cluster.slurm.nodes=2", *IMAGE],
    )  # fmt: skip
    assert result.exit_code == 0 and "site profile local" in result.output


def test_hold_keeps_the_cluster_up_instead_of_training() -> None:
    script = render("part-quickstart.yaml", "local", ["cluster.slurm.nodes=2", *IMAGE[1:]], hold=True)
    assert "local command=(sleep infinity)" in script and "REQUEUE=0\n" in script
    assert "--no-requeue" in sbatch_options(script)
    assert "hepml train" not in script.split("train() {", 1)[1]


def test_ray_cluster_launcher_file_is_valid_for_ray() -> None:
    """cluster/ray/onprem.yaml passes Ray's own cluster-config schema, and its commands are valid shell."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster/ray/onprem.yaml").read_text())
    validate_config(prepare_config(config))
    commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    bash_syntax_ok("\n".join(commands))
    assert all("apptainer" in c for c in commands) and any("RAY_AUTH_MODE=token" in c for c in commands)


@pytest.mark.parametrize(
    ("addresses", "ips", "blocks"),
    [
        ({"node1": "127.0.0.1", "node2": "127.0.0.1", "node3": "127.0.0.1"}, ["127.0.0.1"] * 3, [36000, 37000, 38000]),
        ({"nid001": "10.1.0.1", "nid002": "10.1.0.2"}, ["10.1.0.1", "10.1.0.2"], [36000, 36000]),
        ({"gpu1": "localhost", "gpu2": "10.1.0.2"}, ["127.0.0.1", "10.1.0.2"], [36000, 36000]),
    ],
)
def test_node_addresses_and_port_blocks(tmp_path: Path, addresses: dict[str, str], ips: list[str], blocks: list[int]) -> None:
    """The script's node section, run against a stand-in `scontrol`: IPs from NodeAddr (names resolved), and a port
    block of its own for every node that shares an IP with an earlier one."""
    script = render("part-quickstart.yaml", "local", ["cluster.slurm.nodes=2", *IMAGE[1:]])
    section = "# ---- the nodes" + script.split("# ---- the nodes", 1)[1].split("HEAD_ADDRESS=", 1)[0]
    scontrol = tmp_path / "scontrol"
    nodes = " ".join(addresses)
    cases = "\n".join(f"  {name}) echo 'NodeName={name} Arch=x86_64 NodeAddr={addr} NodeHostName={name}' ;;"
                      for name, addr in addresses.items())  # fmt: skip
    scontrol.write_text(f'#!/bin/bash\nif [[ $2 == hostnames ]]; then printf "%s\\n" {nodes}; exit; fi\n'
                        f'case $3 in\n{cases}\nesac\n')  # fmt: skip
    scontrol.chmod(0o755)
    probe = ("die() { echo \"die $*\"; exit 1; }\nRAY_IP_INTERFACE=\nRAY_PORT_BLOCK_START=36000\n" + section
             + 'echo "${IPS[*]}|${BLOCKS[*]}"\n')  # fmt: skip
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "x", "SLURM_JOB_NUM_NODES": str(len(addresses))}
    done = subprocess.run(["bash", "-c", probe], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == f"{' '.join(ips)}|{' '.join(map(str, blocks))}", done.stdout + done.stderr
