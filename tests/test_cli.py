"""`fedrac run` input handling: every bad input is one line on stderr, exit code 2, no run directory;
config files and --set overrides; `fedrac keys`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import one_line_error
from fedrac.cli import main

REPO = Path(__file__).resolve().parents[1]
S10 = ",".join(f"{0.3 + 0.04 * k:.2f}" for k in range(10))


def run_cli(args, capsys):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def no_run_dir(tmp):
    runs = tmp / "runs"
    assert not runs.exists() or not any(runs.iterdir())
    assert not (tmp / "out").exists()


@pytest.mark.parametrize("args,words", [
    (["--dataset", "cifar100"], ["unknown dataset", "cifar10"]),
    (["--algorithm", "fedracc"], ["unknown algorithm", "fedrac"]),
    (["--partition", "dirr:3"], ["partition", "dir:"]),
    (["--partition", "dir:-1"], ["partition"]),
    (["--clients", "5000"], ["5000 clients"]),
    (["--clients", "1"], ["clients"]),
    (["--rounds", "0"], ["rounds"]),
    (["--set", "lrr=0.1"], ["unknown config key 'lrr'", "'lr'"]),
    (["--set", "lr=abc"], ["lr="]),
    (["--set", "lr"], ["key=value"]),
    (["--set", "assign_offset=fix"], ["assign_offset", "fixed"]),
    (["--set", "phases=100:0.2"], ["phases"]),
    (["--set", "standalone_acc=0.1,0.2"], ["standalone_acc", "clients=10"]),
    (["--set", "phases=10:0.2:400"], ["pack"]),
    (["--preset", "papers"], ["preset"]),
    (["--preset", "paper"], ["paper standalone vector", "digits"]),
    (["--bogus-flag"], ["unrecognized"]),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], ["device"]),
    (["--config", "/nonexistent/file.cfg"], ["config file", "does not exist"]),
    (["--resume", "/nonexistent/run"], ["no such run directory"]),
])
def test_bad_input_is_one_line_exit_2_and_no_run_dir(tmp, capsys, args, words):
    code, out, err = run_cli(["run", "--out", str(tmp / "out"), "--quiet"] + args, capsys)
    one_line_error(code, err, *words)
    no_run_dir(tmp)


def test_data_dir_without_expected_files(tmp, capsys):
    empty = tmp / "empty"
    empty.mkdir()
    code, out, err = run_cli(["run", "--dataset", "cifar10", "--data-dir", str(empty), "--set", "download=false",
                              "--out", str(tmp / "out"), "--quiet"], capsys)
    one_line_error(code, err, "cifar-10-python.tar.gz", str(empty))
    no_run_dir(tmp)


def test_corrupt_archive(tmp, capsys):
    d = tmp / "bad"
    d.mkdir()
    (d / "cifar-10-python.tar.gz").write_bytes(b"this is not a tar archive" * 10)
    code, out, err = run_cli(["run", "--dataset", "cifar10", "--data-dir", str(d), "--no-verify",
                              "--set", "download=false", "--out", str(tmp / "out"), "--quiet"], capsys)
    one_line_error(code, err)
    no_run_dir(tmp)


def test_corrupt_config_file(tmp, capsys):
    cfg = tmp / "bad.json"
    cfg.write_text("{not json")
    code, _, err = run_cli(["run", "--config", str(cfg), "--out", str(tmp / "out"), "--quiet"], capsys)
    one_line_error(code, err, "not valid JSON")
    cfg2 = tmp / "bad.cfg"
    cfg2.write_text("rounds = 3\nthis line has no equals sign\n")
    code, _, err = run_cli(["run", "--config", str(cfg2), "--out", str(tmp / "out"), "--quiet"], capsys)
    one_line_error(code, err, "bad.cfg:2")
    no_run_dir(tmp)


def test_option_of_another_algorithm_is_named(tmp, capsys, monkeypatch):
    from fedrac import algorithms
    from fedrac.config import Option

    class Other(algorithms.base.Algorithm):
        options = {"gamma_x": Option(0.5, "float", "test option")}

    monkeypatch.setitem(algorithms._REGISTRY, "other_test_algo", Other)
    code, _, err = run_cli(["run", "--set", "gamma_x=1", "--out", str(tmp / "out"), "--quiet"], capsys)
    one_line_error(code, err, "gamma_x", "other_test_algo")


def test_existing_run_dir_is_refused(tmp, capsys):
    out = tmp / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    code, _, err = run_cli(["run", "--out", str(out), "--quiet"], capsys)
    one_line_error(code, err, "already exists", "--resume")


def test_config_file_and_overrides(tmp, capsys):
    cfg = tmp / "exp.cfg"
    cfg.write_text("# a comment\nrounds = 2\nlr = 0.05\nbeta = 40\n\nassign_offset = fixed  # inline\n"
                   f"standalone_acc = {S10}\nname = fromfile\n")
    code, out, err = run_cli(["run", "--config", str(cfg), "--set", "lr=0.07", "--rounds", "3", "--quiet",
                              "--set", "plots=false"], capsys)
    assert code == 0, err
    run = tmp / "runs" / "fromfile"
    conf = json.loads((run / "config.json").read_text())
    assert conf["lr"] == 0.07                    # --set beats the file
    assert conf["rounds"] == 3                   # a flag beats the file
    assert conf["beta"] == 40.0 and conf["assign_offset"] == "fixed"
    assert conf["standalone_acc"] == pytest.approx([float(v) for v in S10.split(",")])
    assert conf["local_steps"] == 1 and conf["model"] == "mlp" and conf["phases"] == "100:0.2:8,inf:0.8:8"
    assert "fairness" in out and "run directory" in out
    # a run's config.json is itself a valid --config (its out/name are not reused)
    code, out2, err = run_cli(["run", "--config", str(run / "config.json"), "--name", "again", "--quiet"], capsys)
    assert code == 0, err
    again = json.loads((tmp / "runs" / "again" / "config.json").read_text())
    assert {k: v for k, v in again.items() if k not in ("out", "name")} == \
        {k: v for k, v in conf.items() if k not in ("out", "name")}


def test_keys_lists_every_key(capsys):
    code, out, _ = run_cli(["keys"], capsys)
    assert code == 0
    for key in ("rounds", "standalone_acc", "assign_offset", "strict_increase", "ordering", "reputation",
                "constant_al", "allocation_start_round", "aggregation", "phases", "beta", "partition_seed"):
        assert key in out
    code, out, _ = run_cli(["algorithms"], capsys)
    assert code == 0 and "fedrac" in out


def test_module_entry_point_exit_code(tmp):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "fedrac", "run", "--dataset", "nope", "--quiet"], cwd=tmp,
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "unknown dataset" in p.stderr
    assert not (tmp / "runs").exists()
