"""hn_jax.tools.reproduce's choice, table and argument checks (its runs: tests/test_sweep.py)."""

import pytest

from hn_jax.tools import reproduce

@pytest.mark.parametrize("args,words", [
    (["--methods=hn,xx"], "--methods"), (["--lrs=0.1,-1"], "--lrs"),
    (["--config.batch_size=15"], "batch_size"), (["--config.nope=1"], "--config.nope"),
    (["--config=configs/none.py"], "no such file"), (["--json=/no/such/f.json"], "--json")])
def test_bad_arguments_fail_in_one_line(tmp_path, capsys, args, words):
  assert reproduce.main([f"--root={tmp_path}/r", *args]) == 2
  err = capsys.readouterr().err.strip()
  assert words in err and "\n" not in err and not (tmp_path / "r").exists()


def test_choose_and_paper_table():
  results = [reproduce.SearchResult("hn", "0.1", 0.30, True),
             reproduce.SearchResult("hn", "1", 0.20, True),
             reproduce.SearchResult("sct", "0.1", 0.50, False, (0.4, 0.6)),
             reproduce.SearchResult("sct", "1", 0.70, True, (0.5, 0.9)),
             reproduce.SearchResult("sct", "3", 0.60, False),
             reproduce.SearchResult("sct", "9", 0.60, False)]
  assert reproduce.choose(results[:2]).lr == "0.1"  # all collapsed: the best R@1 anyway
  assert reproduce.choose(results[2:]).lr == "3"  # not the collapsed 0.70; tie -> smaller
  table = reproduce.search_table(results, {"hn": "0.1", "sct": "3"}, [0, 1])
  assert table.splitlines()[0] == "| method (seeds 0, 1) | lr 0.1 | lr 1 | lr 3 | lr 9 |"
  assert "| sct | 50.0 (40.0, 60.0) | 70.0 collapse (50.0, 90.0) | **60.0** | 60.0 |" in table
  row = {"group": "g", "mean": 0.5, "std": 0.01, "n": 2, "collapse": False,
         "n_collapsed": 1, "n_runs": 3}
  rows = [dict(row, metric=f"X_test_R_{k}") for k in (1, 2, 4, 8)]
  rows += [dict(row, group="h", metric=f"X_test_R_{k}", collapse=True, n_collapsed=3)
           for k in (1, 2, 4, 8)]
  text = reproduce.paper_table(rows, {"sct": ("g", "3"), "hn": ("h", "1")}, "X")
  lines = text.splitlines()
  assert lines[0].split("|")[3:7] == [" R@1 ", " R@2 ", " R@4 ", " R@8 "]
  assert lines[2] == ("| sct | 3 | " + " | ".join(["50.00 +- 1.00 (1 collapsed)"] * 4)
                      + " | 3 | 1/3 |")
  assert lines[3] == "| hn | 1 | " + " | ".join(["collapse"] * 4) + " | 3 | 3/3 |"
