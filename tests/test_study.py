"""The mlrc study (hn_jax.tools.study): trials, folds, the choice on validation, the test once."""

import dataclasses
import json
import math

import numpy as np
import pytest

from hn_jax import evaluation, losses
from hn_jax.data import in_memory
from hn_jax.testing import runs
from hn_jax.tools import reproduce, study


def test_trials_are_seeded_and_inside_the_declared_ranges(monkeypatch):
  a = study.trial_settings("sct", 8, seed=0)
  assert a == study.trial_settings("sct", 8, seed=0)
  assert a != study.trial_settings("sct", 8, seed=1)
  assert len(a) == 8 and len({json.dumps(t, sort_keys=True) for t in a}) == 8
  for name, (low, high, _) in study.space("sct").items():
    values = [t[name] for t in a]
    assert all(low * 0.999 <= v <= high * 1.001 for v in values), (name, values)
  # The same budget for every loss; a loss that declares nothing still searches the rate.
  assert {len(study.trial_settings(m, 5, 0)) for m in ("hn", "shn", "sct")} == {5}
  monkeypatch.setattr(losses, "search_space", lambda name: {})
  assert set(study.space("hn")) == {"learning_rate"}


def test_a_trial_config_sets_the_loss_settings_and_the_fold():
  base = runs.tiny_config()
  run = study.trial_config(base, "sct", {"learning_rate": 0.5, "lam": 2.0}, folds=4, fold=3,
                           fold_seed=7)
  assert (run.loss, run.learning_rate, run.lam, run.folds, run.fold, run.fold_seed) == (
      "sct", 0.5, 2.0, 4, 3, 7)
  full = study.trial_config(base, "sct", {"learning_rate": 0.5}, folds=4, fold=-1, fold_seed=7)
  assert full.folds == 0 and base.learning_rate != 0.5  # the base is not changed


def test_the_best_mean_validation_score_wins_and_ties_go_to_the_earlier_trial():
  t = [study.Trial("x", i, {}, [], fold_map_r=m) for i, m in
       enumerate([[0.5, 0.7], [0.7, 0.5], [0.9, None], [0.2, 0.3]])]
  assert study.choose(t).index == 0  # 0 and 1 tie at 0.6; 2 lacks a fold
  assert t[2].score == -math.inf


@pytest.mark.parametrize("args,words", [(["--protocol=mlrc", "--methods=nope"], "--methods"),
                                        (["--protocol=mlrc", "--folds=1"], "--folds=1")])
def test_bad_study_arguments_fail_in_one_line(tmp_path, capsys, args, words):
  assert reproduce.main([f"--root={tmp_path}", *args]) != 0
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and words in err[0], err


class _Poison:
  """Stands for the test split's images and labels: any use of them fails the test."""

  def __getattr__(self, name):
    raise AssertionError(f"the test split was read ({name}) before the choice")

  def __len__(self):
    raise AssertionError("the test split was read (len) before the choice")

  def __getitem__(self, index):
    raise AssertionError("the test split was read before the choice")


@pytest.mark.slow
def test_a_study_chooses_without_the_test_split_resumes_and_runs_in_parallel(tmp_path,
                                                                             monkeypatch):
  config = runs.tiny_config(num_epochs=1)
  real_digits = in_memory.digits
  poisoned = lambda: dataclasses.replace(  # noqa: E731
      real_digits(), test=dataclasses.replace(real_digits().test, images=_Poison(),
                                              labels=_Poison()))
  monkeypatch.setattr(in_memory, "digits", poisoned)
  read_test = []

  def no_test_figures(workdirs, test_config):
    read_test.append(list(workdirs))
    return {"concatenated": dict.fromkeys(study.TEST_METRICS, 0.0),
            "separate": {m: {"mean": 0.0, "std": 0.0} for m in study.TEST_METRICS},
            "per_fold": []}

  monkeypatch.setattr(study, "test_figures", no_test_figures)
  kwargs = dict(methods=["sct"], trials=2, folds=2, log=lambda s: None)
  first = study.mlrc(config, tmp_path / "seq", **kwargs)
  # The choice was made without the test split; the test is read for the chosen trial only.
  assert read_test == [first["trial_results"][first["chosen"]["sct"]["trial"]]["workdirs"]]
  scores = [t["score"] for t in first["trial_results"]]
  assert all(s is not None and 0 < s <= 1 for s in scores)
  assert first["chosen"]["sct"]["score"] == max(scores)

  lines = []
  again = study.mlrc(config, tmp_path / "seq", **dict(kwargs, log=lines.append))
  assert again["trial_results"] == first["trial_results"]  # nothing trained again
  assert sum("already done" in line for line in lines) == 4, lines

  monkeypatch.setattr(in_memory, "digits", real_digits)  # subprocesses read the real data
  parallel = study.mlrc(config, tmp_path / "par", **dict(kwargs, parallel=2))
  assert ([t["fold_map_r"] for t in parallel["trial_results"]]
          == [t["fold_map_r"] for t in first["trial_results"]])

  # The test figures: fold models concatenated (each normalized) and alone, by hand.
  monkeypatch.undo()
  workdirs = first["trial_results"][0]["workdirs"]
  figures = study.test_figures(workdirs, study.trial_config(
      config, "sct", first["trial_results"][0]["settings"], folds=0, fold=-1, fold_seed=0))
  from hn_jax.tools import embed  # pylint: disable=import-outside-toplevel
  data = in_memory.digits()
  each = []
  for w in workdirs:
    run_config, graphdef, state, mesh = embed.load_run(w)
    each.append(embed.embed_split(run_config, graphdef, state, mesh, data.test, progress=False))
  joined = np.concatenate(each, axis=1)
  by_hand = evaluation.map_at_r(joined, data.test.labels)
  assert figures["concatenated"]["MAP_R"] == pytest.approx(by_hand["MAP_R"], abs=1e-6)
  alone = [evaluation.map_at_r(e, data.test.labels)["MAP_R"] for e in each]
  assert figures["separate"]["MAP_R"]["mean"] == pytest.approx(np.mean(alone), abs=1e-6)
  assert figures["separate"]["MAP_R"]["std"] == pytest.approx(np.std(alone, ddof=1), abs=1e-6)


def test_a_trial_writes_its_hparams_row_with_validation_and_test_figures(tmp_path):
  from hn_jax.tools import report  # pylint: disable=import-outside-toplevel
  workdirs = [str(tmp_path / "sct" / "trial3" / f"fold{i}") for i in range(2)]
  trial = study.Trial("sct", 3, {"learning_rate": 0.5, "lam": 2.0}, workdirs,
                      fold_map_r=[0.25, 0.75])
  test = {"concatenated": {"MAP_R": 0.4, "RP": 0.5, "R_1": 0.9},
          "separate": {m: {"mean": 0.3, "std": 0.1} for m in study.TEST_METRICS}}
  study.write_trial_summary(trial, None)
  path = study.write_trial_summary(trial, test)  # replaces the first
  assert [p.name for p in path.parent.iterdir()] == [path.name]
  scalars = {tag: value for tag, _, _, value in report.read_event_file(path)}
  assert scalars["val_MAP_R"] == 0.5
  assert scalars["test_MAP_R_concatenated"] == pytest.approx(0.4)
  assert scalars["test_R_1_separate"] == pytest.approx(0.3)
  with pytest.raises(report.ReportError, match="no events.out.tfevents"):
    report.find_runs(tmp_path)  # not a training run for `report`
  text = path.read_bytes()
  assert b"loss_params.lam" in text and b"learning_rate" in text


def test_the_protocols_side_by_side():
  config = runs.tiny_config()
  group = reproduce.group_name(config, "sct", "1")
  paper = {"dataset": "DIGITS", "chosen": {"sct": "1"},
           "rows": [{"group": group, "metric": "DIGITS_test_R_1", "mean": 0.9, "std": 0.01,
                     "collapse": False}]}
  paper["map_r"] = {"sct": {"mean": 0.4, "std": 0.02}}
  mlrc = {"chosen": {"sct": {"settings": {"learning_rate": 0.5, "lam": 2.0}}},
          "test": {"sct": {"concatenated": {"R_1": 0.8, "MAP_R": 0.3, "RP": 0.4},
                           "separate": {"R_1": {"mean": 0.7, "std": 0.05},
                                        "MAP_R": {"mean": 0.25, "std": 0.01}}}}}
  lines = reproduce.side_by_side(config, paper, mlrc).splitlines()
  assert lines[2] == ("| sct | 1 | 90.00 +- 1.00 | 40.00 +- 2.00 | learning_rate 0.5, lam 2 | "
                      "80.00 | 70.00 +- 5.00 | 30.00 | 25.00 +- 1.00 |"), lines


@pytest.mark.slow
def test_a_run_whose_loss_stays_non_finite_fails_its_setting_not_the_study(tmp_path):
  config = runs.tiny_config(num_epochs=1, max_consecutive_skips=2)
  kwargs = dict(methods=["sct"], lrs=["0.3", "1e30"], seeds=[0], search_seeds=[0])
  result = reproduce.reproduce(config, tmp_path, log=lambda s: None, **kwargs)
  gave_up = tmp_path / f"{result['dataset']}_R50" / reproduce.group_name(config, "sct", "1e30")
  assert "not finite" in reproduce.stopped(gave_up / "0")
  kept = gave_up.parent / reproduce.group_name(config, "sct", "0.3") / "0"
  assert reproduce.stopped(kept) is None
  search = {r["lr"]: r for r in result["search"]}
  assert search["1e30"]["r1"] is None and search["1e30"]["collapsed"]
  assert search["0.3"]["r1"] > 0 and result["chosen"] == {"sct": "0.3"}
  assert 0 < result["map_r"]["sct"]["mean"] <= 1 and result["map_r"]["sct"]["std"] == 0
  json.dumps(result, allow_nan=False)  # --json: no NaN for the failed run

  before = sorted(p.name for p in (gave_up / "0").iterdir())
  lines = []
  again = reproduce.reproduce(config, tmp_path, log=lines.append, **kwargs)
  # Nothing trains again, the given-up run included: 2 search runs, 1 seed run (the same).
  assert sum("already done" in line for line in lines) == 3, lines
  assert sorted(p.name for p in (gave_up / "0").iterdir()) == before
  assert again["search"] == result["search"]


@pytest.mark.slow
def test_failed_trials_score_nothing_and_a_loss_with_no_good_trial_has_no_test(tmp_path,
                                                                             monkeypatch):
  config = runs.tiny_config(num_epochs=1, max_consecutive_skips=2)
  monkeypatch.setattr(study, "trial_settings", lambda loss, trials, seed: [
      {"learning_rate": 1e30}, {"learning_rate": 0.3 if loss == "sct" else 1e30}][:trials])
  result = study.mlrc(config, tmp_path, methods=["sct", "shn"], trials=2, folds=2,
                      log=lambda s: None)
  rows = {(t["loss"], t["trial"]): t for t in result["trial_results"]}
  for failed in [("sct", 0), ("shn", 0), ("shn", 1)]:
    assert rows[failed]["stopped"] == [True, True] and rows[failed]["score"] is None
    assert rows[failed]["fold_map_r"] == [None, None]
  assert rows["sct", 1]["stopped"] == [False, False] and rows["sct", 1]["score"] > 0
  assert result["chosen"]["sct"]["trial"] == 1 and result["chosen"]["shn"]["score"] is None
  assert result["test"]["shn"] is None and result["test"]["sct"]["concatenated"]["R_1"] > 0
  assert "| shn | every trial failed |" in result["table"]
  json.dumps(result, allow_nan=False)
  group = reproduce.group_name(config, "sct", "1")
  paper = {"dataset": "DIGITS", "chosen": {"sct": "1", "shn": "1"},
           "rows": [{"group": group, "metric": "DIGITS_test_R_1", "mean": 0.9, "std": 0.01,
                     "collapse": False}]}
  lines = reproduce.side_by_side(config, paper, result).splitlines()
  assert lines[3] == "| shn | 1 | - | - | learning_rate 1e+30 | - | - | - | - |", lines


def test_folds_of_one_class_are_warned_of_and_too_many_folds_refused_before_training(
    tmp_path, monkeypatch):
  monkeypatch.setattr(study, "train_all", lambda *a, **k: pytest.fail("trained"))
  config = runs.tiny_config()  # digits: 5 training classes
  with pytest.raises(ValueError, match="only 5 classes; use at most 5 folds"):
    study.mlrc(config, tmp_path, methods=["sct"], trials=1, folds=6, log=lambda s: None)
  lines = []
  monkeypatch.setattr(study, "train_all", lambda *a, **k: None)
  result = study.mlrc(config, tmp_path, methods=["sct"], trials=1, folds=4, log=lines.append)
  assert result["test"] == {"sct": None}  # nothing trained: no score, no test
  assert lines[0].startswith("warning: --folds=4 leaves 3 of the folds one class each"), lines
  assert "use --folds=2 or fewer" in lines[0]
