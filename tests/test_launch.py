"""The launch scripts end to end, against stand-ins for gcloud, gcsfuse, srun and the trainer.

The stand-ins (tests/launch_fakes.py) record every call; a pod's workers are local processes.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import launch_fakes

REPO = Path(__file__).resolve().parents[1]
# Spaces, both quotes, and characters a shell would expand if a script let it.
ARGS = ["--config=configs/sop.py", "--config.note=it's a \"test\"", "--config.tag=two  spaces",
        "--config.glob=*", "--config.cost=$HOME `id` ~"]
RECORDS = "hn_cub/1.0.0/hn_cub-train.array_record-00000-of-00001"


class Cluster:
  """A fake bucket gs://bkt with two prepared datasets, and the fake tools on PATH."""

  def __init__(self, root: Path):
    self.root = root
    launch_fakes.install(str(root / "bin"))
    for name in (RECORDS, RECORDS.replace("cub", "sop")):
      path = root / "gcs" / "bkt" / "proj" / "data" / name
      path.parent.mkdir(parents=True)
      path.write_bytes(b"records of " + name.encode())
    self.log = root / "log.jsonl"
    self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HN_", "FAKE_"))}
    self.env.update(PATH=f"{root / 'bin'}{os.pathsep}{os.environ['PATH']}", FAKE_ROOT=str(root),
                    FAKE_LOG=str(self.log), FAKE_WORKERS="2", NAME="t", ZONE="z1",
                    BUCKET="gs://bkt/proj", DATASETS="hn_cub")

  def start(self, script: str, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(REPO / script), *args], cwd=self.root,
                            env=dict(self.env, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)

  def run(self, script: str, *args: str, **env: str) -> tuple[int, str]:
    proc = self.start(script, *args, **env)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out

  def calls(self, tool: str | None = None) -> list[dict]:
    if not self.log.exists():
      return []
    calls = [json.loads(line) for line in self.log.read_text().splitlines()]
    return [c for c in calls if tool is None or c["tool"] == tool]

  def tpu_verbs(self) -> list[str]:
    return [c["argv"][3] for c in self.calls("gcloud")
            if c["argv"][:3] == ["compute", "tpus", "tpu-vm"]]

  def trainers(self) -> list[dict]:
    runs = [c for c in self.calls("python") if c["argv"][:2] == ["-m", "hn_jax.main"]]
    return sorted(runs, key=lambda c: (c["worker"] or "", c["argv"]))

  def preflights(self) -> list[list[str]]:
    return [c["argv"][2:] for c in self.calls("python") if c["argv"][:2] == ["-m", "hn_jax.preflight"]]

  def home(self, call: dict) -> Path:
    """The home folder of the worker that made `call`, also once its slice is deleted."""
    worker = Path(call["cwd"]).relative_to(self.root / "tpus" / "t").parts[0]
    if self.slice_exists():
      return self.root / "tpus" / "t" / worker
    deleted, = (self.root / "deleted").glob("t.*")
    return deleted / worker

  def slice_exists(self) -> bool:
    return (self.root / "tpus" / "t").is_dir()

  def wait_for(self, predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
      assert time.monotonic() < deadline, self.calls()
      time.sleep(0.05)


@pytest.fixture
def cluster(tmp_path):
  return Cluster(tmp_path)


def test_pod_all_creates_installs_runs_and_deletes(cluster):
  status, out = cluster.run("launch/tpu_pod.sh", "all", "--", *ARGS, TYPE="v4-16")
  assert status == 0, out
  # Is the name free? create, ship the code, unpack and install, run; is there a slice? delete.
  assert cluster.tpu_verbs() == ["describe", "create", "scp", "ssh", "ssh", "describe", "delete"]
  create = cluster.calls("gcloud")[1]["argv"]
  assert "--accelerator-type=v4-16" in create and "--zone=z1" in create and "--spot" not in create
  assert "--scopes=https://www.googleapis.com/auth/cloud-platform" in create
  kinds = [c["tool"] if c["argv"][:2] != ["-m", "hn_jax.main"] else "train"
           for c in cluster.calls() if c["tool"] in ("pip", "python", "sudo")]
  assert kinds.index("train") > max(i for i, k in enumerate(kinds) if k in ("pip", "sudo"))
  assert cluster.calls()[-1]["argv"][3] == "delete" and not cluster.slice_exists()

  trainers = cluster.trainers()
  assert [t["worker"] for t in trainers] == ["0", "1"]
  for t in trainers:
    assert t["argv"] == ["-m", "hn_jax.main", "--distributed=yes", "--workdir=gs://bkt/proj/runs/t",
                         *ARGS]
    home = cluster.home(t)
    assert Path(t["cwd"]).name == "hn_jax" and (home / "hn_jax" / "hn_jax" / "main.py").is_file()
    # The data path is local, and holds the staged dataset only (DATASETS=hn_cub).
    assert t["data_dir"] == str(Path(t["cwd"]).parent / "hn_data")
    assert (home / "hn_data" / RECORDS).read_bytes() == b"records of " + RECORDS.encode()
    assert not (home / "hn_data" / "hn_sop").exists()

  pip = [c["argv"] for c in cluster.calls("pip")]
  assert len(pip) == 2 and all(a[-3].startswith("jax[tpu]==") for a in pip)
  installed = (home / "hn_jax" / ".venv" / "requirements-tpu.txt").read_text()
  assert "flax==" in installed and "torch==" not in installed
  sudo = cluster.calls("sudo")[0]["argv"]
  assert "python3.11-venv" in sudo[-1] and "gcsfuse" not in sudo[-1]


@pytest.mark.parametrize("step,fail", [
    ("ship", {"FAKE_FAIL": "^gcloud compute tpus tpu-vm scp"}),
    ("install", {"FAKE_FAIL": "^pip install"}),
    ("stage", {"FAKE_FAIL": "^gcloud storage rsync", "FAKE_FAIL_WORKER": "1"}),
    ("train", {"FAKE_FAIL": "^python -m hn_jax.main", "FAKE_FAIL_WORKER": "1"}),
])
def test_pod_all_deletes_the_slice_when_a_step_fails(cluster, step, fail):
  status, out = cluster.run("launch/tpu_pod.sh", "all", "--", *ARGS, **fail)
  assert status != 0, out
  assert cluster.tpu_verbs()[:2] == ["describe", "create"]
  assert cluster.calls()[-1]["argv"][3] == "delete" and not cluster.slice_exists()
  # Worker 0 starts when only worker 1 fails (on a pod it then waits for worker 1 in vain).
  assert len(cluster.trainers()) == {"ship": 0, "install": 0, "stage": 1, "train": 2}[step]


@pytest.mark.parametrize("partial", [False, True])
def test_pod_all_deletes_only_a_slice_that_a_failed_create_left(cluster, partial):
  env = dict(FAKE_FAIL="^gcloud compute tpus tpu-vm create")
  if partial:
    env["FAKE_CREATE_PARTIAL"] = "1"
  status, out = cluster.run("launch/tpu_pod.sh", "all", "--", *ARGS, **env)
  assert status != 0 and "could not create" in out
  expected = ["describe", "create", "describe"] + (["delete"] if partial else [])
  assert cluster.tpu_verbs() == expected and not cluster.slice_exists()


def test_pod_all_leaves_an_existing_slice_alone(cluster):
  assert cluster.run("launch/tpu_pod.sh", "create")[0] == 0
  status, out = cluster.run("launch/tpu_pod.sh", "all", "--", *ARGS)
  assert status != 0 and "already exists" in out
  assert cluster.tpu_verbs() == ["create", "describe"] and cluster.slice_exists()


@pytest.mark.slow
@pytest.mark.parametrize("during", ["create", "train"])
def test_pod_all_interrupted_deletes_the_slice(cluster, during):
  if during == "create":  # the slice exists, gcloud still waits for it to be ready
    proc = cluster.start("launch/tpu_pod.sh", "all", "--", *ARGS,
                         FAKE_HANG="^gcloud compute tpus tpu-vm create")
    cluster.wait_for(cluster.slice_exists)
  else:
    proc = cluster.start("launch/tpu_pod.sh", "all", "--", *ARGS,
                         FAKE_HANG="^python -m hn_jax.main")
    cluster.wait_for(lambda: len(cluster.trainers()) == 2)
  os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
  out, _ = proc.communicate(timeout=30)
  assert proc.returncode == 130, out
  assert cluster.calls()[-1]["argv"][3] == "delete" and not cluster.slice_exists()


@pytest.mark.slow
def test_pod_run_refuses_while_a_run_lives_and_stop_ends_it(cluster):
  proc = cluster.start("launch/tpu_pod.sh", "all", "--", *ARGS, FAKE_HANG="^python -m hn_jax.main")
  cluster.wait_for(lambda: len(cluster.trainers()) == 2)
  status, out = cluster.run("launch/tpu_pod.sh", "run", "--", *ARGS)
  assert status != 0 and out.count("a run is still going") == 2
  assert cluster.run("launch/tpu_pod.sh", "stop")[0] == 0
  out, _ = proc.communicate(timeout=30)
  assert proc.returncode == 0, out  # the trainers checkpointed and exited on SIGTERM
  assert len(cluster.calls("terminated")) == 2 and len(cluster.trainers()) == 2
  assert not cluster.slice_exists()


def test_pod_mount_mode_reads_the_bucket_through_gcsfuse(cluster):
  # The workers clone the code from REPO_URL here, instead of receiving this checkout's files.
  for step in ("create", "install"):
    status, out = cluster.run("launch/tpu_pod.sh", step, DATA_MODE="mount",
                              REPO_URL=f"file://{REPO}")
    assert status == 0, out
  assert "scp" not in cluster.tpu_verbs()
  assert "gcsfuse" in cluster.calls("sudo")[0]["argv"][-1]
  status, out = cluster.run("launch/tpu_pod.sh", "run", "--", *ARGS, DATA_MODE="mount")
  assert status == 0, out
  mounts = cluster.calls("gcsfuse")
  assert len(mounts) == 2 and not [c for c in cluster.calls("gcloud") if c["argv"][0] == "storage"]
  for mount, trainer in zip(sorted(mounts, key=lambda c: c["worker"]), cluster.trainers()):
    home = cluster.home(trainer)
    assert mount["argv"] == ["--implicit-dirs", "-o", "ro", "--only-dir", "proj/data", "bkt",
                             str(home / "hn_data")]
    assert trainer["data_dir"] == str(home / "hn_data")
    assert (home / "hn_data" / RECORDS).is_file()
    assert trainer["argv"][4:] == ARGS
    assert (home / "hn_jax" / ".git").is_dir()
    assert (home / "hn_jax" / "hn_jax" / "main.py").is_file()
  assert cluster.slice_exists()  # only `all` deletes it


@pytest.mark.parametrize("arg,message", [("--workdir=gs://bkt/x", "WORKDIR="),
                                         ("--config.data_dir=gs://bkt/proj/data", "HN_DATA_DIR")])
def test_pod_refuses_paths_it_owns(cluster, arg, message):
  status, out = cluster.run("launch/tpu_pod.sh", "all", "--", arg)
  assert status == 1 and message in out and cluster.calls() == []


def test_pod_needs_a_bucket_and_explains_itself(cluster):
  status, out = cluster.run("launch/tpu_pod.sh", "all", BUCKET="/local/data")
  assert status == 1 and "BUCKET=gs://" in out and cluster.calls() == []
  status, out = cluster.run("launch/tpu_pod.sh", "--help", BUCKET="")
  assert status == 0 and "DATA_MODE" in out and "set -euo" not in out
  status, out = cluster.run("launch/tpu_pod.sh", "launch")
  assert status == 2 and "unknown action 'launch'" in out and cluster.calls() == []


def test_local_multiprocess_passes_arguments_through(cluster):
  status, out = cluster.run("launch/local_multiprocess.sh", "2", "3", "--", *ARGS, PORT="4321")
  assert status == 0, out
  runs = sorted(cluster.trainers(), key=lambda c: c["argv"][-1])
  assert [r["argv"] for r in runs] == [
      ["-m", "hn_jax.main", *ARGS, "--coordinator_address=localhost:4321", "--num_processes=2",
       f"--process_id={i}"] for i in range(2)]
  status, out = cluster.run("launch/local_multiprocess.sh", "2", "1", "--", *ARGS,
                            FAKE_FAIL="process_id=1")
  assert status != 0


def test_slurm_passes_arguments_through(cluster):
  env = dict(SLURM_NTASKS="2", SLURM_JOB_ID="7", SLURM_SUBMIT_DIR=str(REPO),
             HN_DATA_DIR="/shared/prepared")
  status, out = cluster.run("launch/slurm_gpu.sbatch", *ARGS, **env)
  assert status == 0, out
  assert cluster.calls("srun")[0]["argv"] == ["--kill-on-bad-exit=1", "python", "-m", "hn_jax.main",
                                              "--distributed=yes", *ARGS]
  assert [t["argv"] for t in cluster.trainers()] == [
      ["-m", "hn_jax.main", "--distributed=yes", *ARGS]] * 2
  places = {(t["cwd"], t["data_dir"]) for t in cluster.trainers()}
  assert places == {(str(REPO), "/shared/prepared")}
  assert cluster.calls("scontrol") == []  # a finished run is not requeued
  status, out = cluster.run("launch/slurm_gpu.sbatch", *ARGS, FAKE_FAIL="^python -m hn_jax.main",
                            FAKE_FAIL_WORKER="1", **env)
  assert status != 0


def test_slurm_time_limit_checkpoints_and_requeues(cluster):
  env = dict(SLURM_NTASKS="2", SLURM_JOB_ID="7", SLURM_SUBMIT_DIR=str(REPO),
             FAKE_HANG="^python -m hn_jax.main")
  proc = cluster.start("launch/slurm_gpu.sbatch", *ARGS, **env)
  tasks = cluster.root / "slurm_tasks"  # the pids that the fake scancel signals
  cluster.wait_for(lambda: len(cluster.trainers()) == 2 and tasks.exists()
                   and len(tasks.read_text().split()) == 2)
  os.kill(proc.pid, signal.SIGUSR1)  # SLURM's --signal=B:USR1@300
  out, _ = proc.communicate(timeout=30)
  assert proc.returncode == 0, out
  assert [c["argv"] for c in cluster.calls("scancel")] == [["--signal=TERM", "7"]]
  assert len(cluster.calls("terminated")) == 2  # every task checkpointed and exited
  assert [c["argv"] for c in cluster.calls("scontrol")] == [["requeue", "7"]]
  assert cluster.calls()[-1]["tool"] == "scontrol"


CONFIG_ARGS = [a for a in ARGS if a.startswith("--config")]


def test_pod_preflight_runs_before_the_slice_is_created(cluster):
  status, out = cluster.run("launch/tpu_pod.sh", "all", "--", *ARGS, "--distributed=no")
  assert status == 0, out
  assert cluster.preflights() == [["--topology=v4-32", "--search_batch=false", *CONFIG_ARGS]]
  calls = cluster.calls()
  preflight = next(i for i, c in enumerate(calls) if c["argv"][1:2] == ["hn_jax.preflight"])
  create = next(i for i, c in enumerate(calls) if c["argv"][3:4] == ["create"])
  assert preflight < create


@pytest.mark.parametrize("action", ["all", "create"])
def test_pod_a_run_that_does_not_fit_creates_nothing(cluster, action):
  status, out = cluster.run("launch/tpu_pod.sh", action, "--", *ARGS, TYPE="v5litepod-16",
                            FAKE_PREFLIGHT_STATUS="1")
  assert status == 1, out
  assert "cannot run on v5litepod-16" in out and "nothing was created" in out
  assert cluster.preflights()[0][0] == "--topology=v5litepod-16"
  assert "create" not in cluster.tpu_verbs() and "delete" not in cluster.tpu_verbs()


def test_pod_preflight_can_be_skipped(cluster):
  status, out = cluster.run("launch/tpu_pod.sh", "create", "--", *ARGS, PREFLIGHT="0")
  assert status == 0, out
  assert cluster.preflights() == [] and cluster.tpu_verbs()[-1] == "create"


def test_slurm_preflight_checks_the_nodes_gpus_before_srun(cluster):
  env = dict(SLURM_NTASKS="2", SLURM_NNODES="2", SLURM_GPUS_ON_NODE="8", SLURM_JOB_ID="7",
             SLURM_SUBMIT_DIR=str(REPO))
  status, out = cluster.run("launch/slurm_gpu.sbatch", *ARGS, GPU="h200", **env)
  assert status == 0, out
  assert cluster.preflights() == [["--topology=h200:2x8", "--search_batch=false", *CONFIG_ARGS]]
  assert len(cluster.calls("srun")) == 1
  status, out = cluster.run("launch/slurm_gpu.sbatch", *ARGS, FAKE_PREFLIGHT_STATUS="1", **env)
  assert status == 1 and "cannot run on h100:2x8" in out, out
  assert len(cluster.calls("srun")) == 1  # no second start
  status, out = cluster.run("launch/slurm_gpu.sbatch", *ARGS, FAKE_PREFLIGHT_STATUS="1",
                            SLURM_RESTART_COUNT="1", **env)
  assert status == 0, out  # a requeued start was checked before: straight to srun
  assert len(cluster.calls("srun")) == 2
