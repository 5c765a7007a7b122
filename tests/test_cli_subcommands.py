"""`fedrac compare` / `fedrac reproduce` are reachable from the main CLI and keep its error contract."""
from fedrac.cli import main


def test_reproduce_missing_data_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["reproduce", "--datasets", "cifar10", "--partitions", "pow", "--rounds", "1",
                 "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "rep"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("fedrac: error:")
    assert not (tmp_path / "rep").exists()


def test_compare_unknown_method_is_rejected(tmp_path, capsys):
    code = main(["compare", "--methods", "fedrac,no_such_method", "--rounds", "1",
                 "--out", str(tmp_path / "cmp"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no_such_method" in err[0]
    assert not (tmp_path / "cmp").exists()
