"""Stand-ins for the cluster tools the launch scripts call, for tests/test_launch.py.

`install(bin_dir)` writes `gcloud`, `gcsfuse`, `srun`, `sudo`, `python`, `python3`, `python3.11`
and `pip` into `bin_dir`; each runs this file with the tool's name. Every call is appended to
$FAKE_LOG as a JSON line (tool, argv, cwd, worker, HN_DATA_DIR, pid). A call whose
`tool arg...` (shell-quoted, joined) matches the regular expression $FAKE_FAIL, on worker
$FAKE_FAIL_WORKER when that is set, fails with status 1 and does nothing else; one that matches
$FAKE_HANG does its work, then waits for SIGTERM (recorded as tool `terminated`, status 0) or
SIGINT.

- gs://BUCKET/PATH is the folder $FAKE_ROOT/gcs/BUCKET/PATH (`gcloud storage rsync`, `gcsfuse`).
- A slice NAME is $FAKE_ROOT/tpus/NAME, with one home folder per worker ($FAKE_WORKERS,
  default 2); `delete` moves it to $FAKE_ROOT/deleted/. `tpu-vm ssh --worker=all --command=C`
  runs `bash -c C` in every worker's home (HOME set to it) at once, as separate processes.
  With $FAKE_CREATE_PARTIAL, a failing `create` leaves the slice behind.
- `srun CMD...` runs CMD $SLURM_NTASKS times at once, with SLURM_PROCID set; `scancel
  --signal=TERM JOB` sends SIGTERM to those tasks; `scontrol` records.
- `sudo` records and runs nothing. `python -m venv DIR` makes a venv whose `python` and `pip` are
  these stand-ins; `pip` records; `python -m hn_jax.main` records its argv and exits 0;
  `python -m hn_jax.preflight` records and exits with $FAKE_PREFLIGHT_STATUS (default 0).
"""

# Only what every call needs is imported here: a test starts some hundred of these processes.
import json
import os
import sys

TOOLS = ("gcloud", "gcsfuse", "srun", "scancel", "scontrol", "sudo", "python", "python3",
         "python3.11", "pip")


def install(bin_dir: str) -> None:
  """Writes a wrapper for every tool into `bin_dir`."""
  os.makedirs(bin_dir, exist_ok=True)
  for tool in TOOLS:
    _wrapper(os.path.join(bin_dir, tool), "python" if tool.startswith("python") else tool)


def _wrapper(path: str, tool: str) -> None:
  import shlex  # pylint: disable=g-import-not-at-top
  with open(path, "w") as f:
    fakes = shlex.quote(os.path.abspath(__file__))
    f.write(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -S {fakes} {tool} "$@"\n')
  os.chmod(path, 0o755)


def record(tool: str, argv: list[str], **extra) -> None:
  entry = dict(tool=tool, argv=argv, cwd=os.getcwd(), worker=os.environ.get("FAKE_WORKER"),
               data_dir=os.environ.get("HN_DATA_DIR"), pid=os.getpid(), **extra)
  fd = os.open(os.environ["FAKE_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
  try:
    os.write(fd, (json.dumps(entry) + "\n").encode())
  finally:
    os.close(fd)


def matches(variable: str, tool: str, argv: list[str]) -> bool:
  pattern = os.environ.get(variable)
  worker = os.environ.get("FAKE_FAIL_WORKER")
  if not pattern or (worker is not None and worker != os.environ.get("FAKE_WORKER")):
    return False
  import re, shlex  # pylint: disable=g-import-not-at-top,multiple-imports
  return re.search(pattern, shlex.join([tool, *argv])) is not None


def fail(message: str, status: int = 1):
  print(f"fake: {message}", file=sys.stderr)
  sys.exit(status)


def split_options(args: list[str]) -> tuple[dict, list[str]]:
  """`--key=value` and `--flag` into a dict; everything else positional."""
  options, positional = {}, []
  for arg in args:
    if arg.startswith("--"):
      key, _, value = arg[2:].partition("=")
      options[key] = value if "=" in arg else True
    else:
      positional.append(arg)
  return options, positional


def copy(source: str, dest: str) -> None:
  """A file, or a folder's content, into `dest` (merged with what is there)."""
  import shutil  # pylint: disable=g-import-not-at-top
  if os.path.isdir(source):
    shutil.copytree(source, dest, dirs_exist_ok=True)
  else:
    shutil.copy(source, dest)


def gcs_path(url: str) -> str:
  if not url.startswith("gs://"):
    fail(f"not a gs:// URL: {url}", 2)
  return os.path.join(os.environ["FAKE_ROOT"], "gcs", url[len("gs://"):])


def slice_dir(name: str) -> str:
  return os.path.join(os.environ["FAKE_ROOT"], "tpus", name)


def homes(name: str) -> list[str]:
  return [os.path.join(slice_dir(name), f"worker-{i}")
          for i in range(int(os.environ.get("FAKE_WORKERS", 2)))]


def worker_homes(name: str) -> list[str]:
  """The homes of slice `name`'s workers; fails as gcloud does if there is no such slice."""
  if not os.path.isdir(slice_dir(name)):
    fail(f"NOT_FOUND: TPU node {name}")
  return homes(name)


def run_all(commands: list[tuple[list[str], str | None, dict]], pid_file: str | None = None) -> int:
  """Starts every (argv, cwd, env) at once; the first non-zero status, else 0."""
  import subprocess  # pylint: disable=g-import-not-at-top
  procs = [subprocess.Popen(argv, cwd=cwd, env=env) for argv, cwd, env in commands]
  if pid_file:
    with open(pid_file, "a") as f:
      f.writelines(f"{p.pid}\n" for p in procs)
  statuses = [p.wait() for p in procs]
  return next((s for s in statuses if s != 0), 0)


def tpu_vm(verb: str, args: list[str]) -> int:
  options, positional = split_options(args)
  if "zone" not in options:
    fail("--zone is missing", 2)
  if verb == "create":
    name = positional[0]
    if os.path.isdir(slice_dir(name)):
      fail(f"ALREADY_EXISTS: TPU node {name}")
    for home in homes(name):
      os.makedirs(home)
    with open(os.path.join(slice_dir(name), "create.json"), "w") as f:
      json.dump(options, f)
    return 0
  if verb == "describe":
    worker_homes(positional[0])
    return 0
  if verb == "delete":
    if options.get("quiet") is not True:
      fail("would prompt: --quiet is missing", 2)
    worker_homes(positional[0])
    deleted = os.path.join(os.environ["FAKE_ROOT"], "deleted")
    os.makedirs(deleted, exist_ok=True)
    os.rename(slice_dir(positional[0]),
              os.path.join(deleted, f"{positional[0]}.{len(os.listdir(deleted))}"))
    return 0
  if options.get("worker") != "all":
    fail("expected --worker=all", 2)
  if verb == "scp":
    source, target = positional
    name, _, dest = target.partition(":")
    for home in worker_homes(name):
      copy(source, os.path.join(home, dest))
    return 0
  if verb == "ssh":
    command = options["command"]
    return run_all([(["bash", "-c", command], home, dict(os.environ, HOME=home, FAKE_WORKER=str(i)))
                    for i, home in enumerate(worker_homes(positional[0]))])
  fail(f"unknown verb tpu-vm {verb}", 2)


def gcloud(argv: list[str]) -> int:
  if argv[:3] == ["compute", "tpus", "tpu-vm"]:
    return tpu_vm(argv[3], argv[4:])
  if argv[:2] == ["storage", "rsync"]:
    options, (source, dest) = split_options(argv[2:])
    if options.get("recursive") is not True:
      fail("rsync without --recursive copies no folder", 2)
    if not os.path.isdir(gcs_path(source)):
      fail(f"{source} matched no objects")
    copy(gcs_path(source), dest)
    return 0
  fail(f"unknown gcloud command {argv}", 2)


def gcsfuse(argv: list[str]) -> int:
  options, positional, rest = {}, [], list(argv)
  while rest:
    arg = rest.pop(0)
    if arg == "-o":
      options["o"] = rest.pop(0)
    elif arg.startswith("--"):
      key, _, value = arg[2:].partition("=")
      options[key] = value if "=" in arg else (rest.pop(0) if key == "only-dir" else True)
    else:
      positional.append(arg)
  bucket, mount_point = positional
  if not os.path.isdir(mount_point):
    fail(f"mount point {mount_point} is not a folder")
  copy(gcs_path(f"gs://{bucket}/{options.get('only-dir', '')}"), mount_point)
  return 0


def srun(argv: list[str]) -> int:
  command = list(argv)
  while command and command[0].startswith("-"):
    command.pop(0)
  tasks = int(os.environ.get("SLURM_NTASKS", 1))
  return run_all([(command, None, dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID="0",
                                       FAKE_WORKER=str(i))) for i in range(tasks)],
                 pid_file=os.path.join(os.environ["FAKE_ROOT"], "slurm_tasks"))


def scancel(argv: list[str]) -> int:
  """`scancel --signal=TERM JOB`: SIGTERM to every task srun started."""
  if argv[0] != "--signal=TERM" or len(argv) != 2:
    fail(f"the fake scancel does not do {argv}", 2)
  with open(os.path.join(os.environ["FAKE_ROOT"], "slurm_tasks")) as f:
    for pid in f.read().split():
      os.kill(int(pid), 15)  # SIGTERM
  return 0


def python(argv: list[str]) -> int:
  if argv[:2] == ["-m", "venv"]:
    bin_dir = os.path.join(os.path.abspath(argv[2]), "bin")
    os.makedirs(bin_dir, exist_ok=True)
    _wrapper(os.path.join(bin_dir, "python"), "python")
    _wrapper(os.path.join(bin_dir, "pip"), "pip")
    with open(os.path.join(bin_dir, "activate"), "w") as f:
      f.write(f"export VIRTUAL_ENV='{os.path.dirname(bin_dir)}'\n"
              'export PATH="$VIRTUAL_ENV/bin:$PATH"\n')
    return 0
  if argv[:2] == ["-m", "hn_jax.preflight"]:  # exits with $FAKE_PREFLIGHT_STATUS (default 0)
    status = int(os.environ.get("FAKE_PREFLIGHT_STATUS", "0"))
    print("preflight: " + ("fits" if status == 0 else "does not fit"), flush=True)
    return status
  if argv[:2] in (["-m", "hn_jax.main"], ["-m", "pip"]):
    return 0
  fail(f"the fake python does not run {argv}", 2)


def main() -> None:
  tool, argv = sys.argv[1], sys.argv[2:]
  record(tool, argv)
  if matches("FAKE_FAIL", tool, argv):
    if tool == "gcloud" and argv[3:4] == ["create"] and os.environ.get("FAKE_CREATE_PARTIAL"):
      gcloud(argv)
    fail(f"{tool} fails on demand")
  handlers = dict(gcloud=gcloud, gcsfuse=gcsfuse, srun=srun, scancel=scancel, python=python,
                  sudo=lambda argv: 0, pip=lambda argv: 0, scontrol=lambda argv: 0)
  status = handlers[tool](argv)
  if status == 0 and matches("FAKE_HANG", tool, argv):
    hang()
  sys.exit(status)


def hang() -> None:
  """Waits for a signal: SIGTERM is recorded (tool `terminated`) and ends the call cleanly, as
  a run that checkpoints does; SIGINT ends it as Ctrl-C would."""
  import signal, time  # pylint: disable=g-import-not-at-top,multiple-imports
  def stop(signum, frame):
    record("terminated", [])
    sys.exit(0)
  signal.signal(signal.SIGTERM, stop)
  while True:
    time.sleep(0.05)


if __name__ == "__main__":
  main()
