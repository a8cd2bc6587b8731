"""The commands' persistent cache of compiled programs: private, reused, refused when unsafe."""

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hn_jax import cli, compile_cache

ROOT = Path(__file__).resolve().parents[1]

# A process that enables the cache as the commands do, compiles one program, and prints the
# folder used and how many compiled programs came from the cache.
_COMPILE_ONCE = textwrap.dedent("""
    import sys
    import hn_jax
    from hn_jax import cli, compile_cache
    used = compile_cache.enable(sys.argv[1] if len(sys.argv) > 1 else None)
    import jax, jax.numpy as jnp
    from jax import monitoring
    hits = []
    monitoring.register_event_listener(
        lambda name, **_: hits.append(name) if name.endswith("/cache_hits") else None)
    jax.jit(lambda x: jnp.sin(x) * 3 + 1)(jnp.arange(5.0)).block_until_ready()
    print(used, len(hits))
""")


def _env(xdg: Path, **extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if k not in (compile_cache.ENV_DIR, compile_cache.ENV_ENABLE)}
  env.pop(compile_cache.ENV_MIN_TIME, None)  # the commands' own setting: every program kept
  return env | {"XDG_CACHE_HOME": str(xdg), "PYTHONPATH": str(ROOT)} | extra


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", _COMPILE_ONCE, *args], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=True)


@pytest.mark.slow  # two processes that import JAX
def test_the_default_folder_is_private_and_a_second_process_reuses_its_programs(tmp_path):
  xdg = tmp_path / "xdg"
  first = _run(_env(xdg))
  folder = xdg / "hn_jax" / "xla"
  assert first.stdout.split() == [str(folder), "0"], first.stderr
  for made in (xdg, xdg / "hn_jax", folder):
    assert stat.S_IMODE(made.stat().st_mode) == 0o700, made
  assert any(folder.iterdir()), "the compiled program is written"
  second = _run(_env(xdg))
  used, hits = second.stdout.split()
  assert used == str(folder) and int(hits) > 0, "the programs come from the cache"


@pytest.fixture
def fresh(monkeypatch, tmp_path):
  """A process as a command starts: JAX not imported yet, no cache chosen; XDG_CACHE_HOME in
  tmp_path. (JAX stays out of sys.modules only inside: nothing here imports it.)"""
  monkeypatch.delitem(sys.modules, "jax", raising=False)
  monkeypatch.delenv(compile_cache.ENV_DIR, raising=False)
  monkeypatch.delenv(compile_cache.ENV_ENABLE, raising=False)
  monkeypatch.delenv(compile_cache.ENV_MIN_TIME, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  return tmp_path


def test_a_command_points_jax_at_the_private_default_folder(fresh):
  flag_values = cli.command_flags()
  seen = []
  assert cli.run(lambda _: seen.append(os.environ.get(compile_cache.ENV_DIR)), flag_values, [],
                 prog="hn_test") == 0
  folder = fresh / "xdg" / "hn_jax" / "xla"
  assert seen == [str(folder)] and stat.S_IMODE(folder.stat().st_mode) == 0o700
  assert os.environ[compile_cache.ENV_MIN_TIME] == "0", "small programs are kept too"


def test_xla_cache_names_the_folder_or_turns_the_cache_off(fresh, monkeypatch):
  seen = []
  command = lambda _: seen.append(os.environ.get(compile_cache.ENV_DIR))
  assert cli.run(command, cli.command_flags(), ["--xla_cache=off"], prog="hn_test") == 0
  assert cli.run(command, cli.command_flags(), [f"--xla_cache={fresh / 'mine'}"],
                 prog="hn_test") == 0
  assert seen == [None, str(fresh / "mine")] and not (fresh / "xdg").exists()


def test_a_cache_others_can_write_is_not_used(fresh, capsys):
  shared = fresh / "shared"
  shared.mkdir()
  os.chmod(shared, 0o777)
  assert cli.run(lambda _: None, cli.command_flags(), [f"--xla_cache={shared}"],
                 prog="hn_test") == 0
  assert capsys.readouterr().err.splitlines() == [
      f"hn_test: warning: not caching compiled programs in {shared}: others may write {shared} "
      f"(mode 0777); `chmod go-w {shared}` makes it private (a cache others can write lets "
      "them run code); --xla_cache=DIR names another folder"]
  assert compile_cache.ENV_DIR not in os.environ and not any(shared.iterdir())


def test_the_users_own_choice_stands(fresh, monkeypatch):
  monkeypatch.setenv(compile_cache.ENV_DIR, str(fresh / "chosen"))
  assert compile_cache.enable(fresh / "other") == str(fresh / "chosen")
  monkeypatch.delenv(compile_cache.ENV_DIR)
  monkeypatch.setenv(compile_cache.ENV_ENABLE, "false")
  assert compile_cache.enable() is None and compile_cache.ENV_DIR not in os.environ
  assert not (fresh / "xdg").exists() and not (fresh / "other").exists()


def test_prepare_creates_missing_folders_private_whatever_the_umask(tmp_path):
  target = tmp_path / "a" / "b" / "xla"
  old = os.umask(0)
  try:
    assert compile_cache.prepare(target) is None
  finally:
    os.umask(old)
  for made in (tmp_path / "a", tmp_path / "a" / "b", target):
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
  assert compile_cache.prepare(target) is None, "an existing private folder is fine"


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o775])
def test_a_folder_writable_by_group_or_others_is_refused(tmp_path, mode):
  target = tmp_path / "xla"
  target.mkdir()
  os.chmod(target, mode)
  assert compile_cache.prepare(target) == (
      f"others may write {target} (mode {mode:04o}); `chmod go-w {target}` makes it private")


def test_a_folder_above_that_others_can_write_is_refused_unless_sticky(tmp_path):
  parent = tmp_path / "open"
  parent.mkdir()
  os.chmod(parent, 0o777)
  assert compile_cache.problem(parent / "xla") == (
      f"others may write {parent}, a folder above {parent / 'xla'} (mode 0777)")
  os.chmod(parent, 0o1777)  # as /tmp: others cannot rename or remove what is not theirs
  assert compile_cache.prepare(parent / "xla") is None


def test_a_folder_of_another_user_is_refused(tmp_path, monkeypatch):
  target = tmp_path / "xla"
  target.mkdir(mode=0o700)
  owner = target.stat().st_uid
  monkeypatch.setattr(compile_cache.os, "geteuid", lambda: owner + 4242)
  assert compile_cache.problem(target).endswith(f"{target} belongs to another user (uid {owner})")


def test_a_file_in_place_of_the_folder_is_refused(tmp_path):
  (tmp_path / "xla").write_text("")
  assert compile_cache.prepare(tmp_path / "xla") == f"{tmp_path / 'xla'} is not a folder"


def test_the_default_folder_follows_xdg(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert compile_cache.default_dir() == tmp_path / "hn_jax" / "xla"
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert compile_cache.default_dir() == tmp_path / "home" / ".cache" / "hn_jax" / "xla"
