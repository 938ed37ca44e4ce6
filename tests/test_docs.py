"""The deployment examples in docs/ stay true: their manifest validates and their worker command is
one the CLI takes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from pipeline.cli import _parser
from tests.conftest import run


def test_the_kubernetes_job_runs_a_valid_manifest_with_keys_from_a_secret(tmp_path: Path) -> None:
    secret, config, job = yaml.safe_load_all(Path("docs/kubernetes-job.yaml").read_text())
    secrets = secret["stringData"]
    assert secret["kind"] == "Secret" and {"IMAGE_API_KEY", "PGPASSWORD", "STATE_URL", "OUTPUT_URL"} <= set(
        secrets
    )
    manifest = tmp_path / "job.yaml"
    manifest.write_text(config["data"]["job.yaml"])
    assert run("validate", manifest) == 0
    assert job["spec"]["parallelism"] > 1
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "imagegen"}}]
    command = container["args"][0].split("exec ", 1)[1]
    for name in ("STATE_URL", "OUTPUT_URL"):
        command = command.replace(f'"${name}"', shlex.quote(secrets[name]))
    args = _parser().parse_args(shlex.split(command)[1:])
    assert args.manifest == Path("/manifest/job.yaml")
    assert args.state.startswith("postgresql://") and args.output.startswith("s3://")


def test_the_slurm_array_runs_the_same_worker() -> None:
    script = Path("docs/slurm-array.sh").read_text()
    assert "#SBATCH" in script
    command = re.search(r"exec (pipeline run .*?)\n(?!\s)", script.replace("\\\n", " "), re.S)
    assert command
    args = _parser().parse_args(shlex.split(command.group(1).replace('"$1"', "job.yaml"))[1:])
    assert args.state.startswith("postgresql://") and args.output.startswith("s3://")
