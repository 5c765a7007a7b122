"""Command line: ``fedrac run`` (the default command), ``fedrac keys``, ``fedrac algorithms``.

``fedrac`` with no arguments runs FedRAC on the embedded ``digits`` data (10 clients, POW).
Bad input (unknown names, impossible partitions, missing or corrupt files, unknown config keys)
prints ONE line on stderr, ``fedrac: error: <what is wrong and how to fix it>``, and exits with
status 2 before any run directory is created.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .config import ConfigError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message; we print one line
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="fedrac", description="FedRAC and submodel federated-learning simulator.")
    sub = p.add_subparsers(dest="command", parser_class=_OneLineParser)
    r = sub.add_parser("run", help="run a simulation (default command)",
                       description="Run a federated simulation. Every configuration key can be set with "
                                   "--set key=value (list them with `fedrac keys`).")
    r.add_argument("--algorithm", "-a", help="algorithm (default fedrac)")
    r.add_argument("--dataset", "-d", help="data set: digits, cifar10, svhn, emnist, tinyimagenet")
    r.add_argument("--partition", "-p", help="pow, cla, iid or dir:<alpha> (e.g. dir:3.0)")
    r.add_argument("--clients", "-k", help="number of clients")
    r.add_argument("--rounds", "-r", help="number of rounds (default: the budget of ALGORITHMS.md 1.4)")
    r.add_argument("--seed", help="training seed")
    r.add_argument("--partition-seed", help="partition/server-split seed (default: the training seed)")
    r.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    r.add_argument("--out", "-o", help="run directory (default ./runs/<timestamp>-<algorithm>-<dataset>-<partition>)")
    r.add_argument("--name", help="run name: the run directory becomes ./runs/<name>")
    r.add_argument("--data-dir", help="data directory (default $FEDRAC_DATA_DIR or ~/.cache/fedrac)")
    r.add_argument("--config", "-c", action="append", default=[], metavar="FILE",
                   help="key=value lines (or a run's config.json); may repeat, later files win")
    r.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="override any configuration key; may repeat")
    r.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR")
    r.add_argument("--preset", help="preset applied first: paper (official reproduction flags and the "
                                    "authors' standalone vectors)")
    r.add_argument("--no-verify", action="store_true", help="accept data archives whose checksums differ "
                                                           "(e.g. a rebuilt CIFAR-10)")
    r.add_argument("--tensorboard", action="store_true", help="also write TensorBoard logs")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no notes")
    r.add_argument("--distributed", action="store_true",
                   help="shard the clients over the processes of a torchrun launch (NCCL on GPUs, Gloo on "
                        "CPUs; rank 0 writes the outputs): torchrun --standalone --nproc_per_node N -m fedrac "
                        "run --distributed ...")
    r.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                   help="--distributed: seconds a collective may wait for a silent rank (default 1800)")
    k = sub.add_parser("keys", help="list every configuration key with its default")
    k.add_argument("--algorithm", "-a", help="only the core keys and this algorithm's options")
    sub.add_parser("algorithms", help="list the registered algorithms")
    from .compare import add_subcommands  # `fedrac compare` and `fedrac reproduce`

    add_subcommands(sub)
    return p


_FLAG_KEYS = (("algorithm", "algorithm"), ("dataset", "dataset"), ("partition", "partition"),
              ("clients", "clients"), ("rounds", "rounds"), ("seed", "seed"),
              ("partition_seed", "partition_seed"), ("device", "device"), ("out", "out"), ("name", "name"),
              ("data_dir", "data_dir"), ("preset", "preset"))


def _layers(args) -> list[tuple[str, dict]]:
    from .config import parse_assignments, read_config_file

    layers: list[tuple[str, dict]] = []
    for path in args.config:
        data = read_config_file(path)
        if str(path).endswith(".json"):
            # a previous run's config.json describes a new run: not its directory
            data = {k: v for k, v in data.items() if k not in ("out", "name")}
        layers.append((f"--config {path}", data))
    flags = {key: getattr(args, attr) for attr, key in _FLAG_KEYS if getattr(args, attr) is not None}
    if args.no_verify:
        flags["verify"] = "false"
    if args.tensorboard:
        flags["tensorboard"] = "true"
    if args.quiet:
        flags["progress"] = "false"
    layers.append(("command line", flags))
    layers.append(("--set", parse_assignments(args.set, "--set")))
    return layers


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_table(summary: dict) -> str:
    """A readable end-of-run table: per-client standalone vs reward, then the headline metrics."""
    s = summary.get("standalone_accuracy") or []
    th = summary.get("client_accuracy") or []
    cols = summary.get("client_columns") or {}
    extra = [(name, vals) for name, vals in cols.items() if isinstance(vals, list) and len(vals) == len(s)]
    head = f"{'client':>6}  {'standalone':>10}  {'reward':>7}  {'gain':>8}" + "".join(f"  {n:>8}" for n, _ in extra)
    lines = [head, "-" * len(head)]
    for k in range(len(s)):
        t = th[k] if k < len(th) else None
        gain = None if t is None else t - s[k]
        row = f"{k:>6}  {s[k]:>10.4f}  {_fmt(t, '7.4f')}  {_fmt(gain, '+8.4f')}"
        row += "".join(f"  {_cell(vals[k]):>8}" for _, vals in extra)
        lines.append(row)
    best = summary.get("best") or {}

    def best_txt(key: str, spec: str) -> str:
        b = best.get(key)
        return "" if not b else f" | best {format(b['value'], spec)} (round {b['round']})"

    lines += [
        "",
        f"fairness (100 x Pearson):  last {_fmt(summary.get('fairness'), '.2f')}{best_txt('fairness', '.2f')}",
        f"max test accuracy:         last {_fmt(summary.get('max_accuracy'), '.4f')}"
        f"{best_txt('max_accuracy', '.4f')}",
        f"mean / min test accuracy:  {_fmt(summary.get('mean_accuracy'), '.4f')} / "
        f"{_fmt(summary.get('min_accuracy'), '.4f')}",
        f"BCF rate:                  {_fmt(summary.get('rate'), '.2f')} (in bound "
        f"{_fmt(summary.get('in_bound_fraction'), '.2f')}, violations {summary.get('violations')})",
    ]
    return "\n".join(lines)


def _run(args) -> int:
    from . import runner

    if args.distributed:
        from . import distributed

        return distributed.run_from_cli(args)

    quiet = args.quiet

    def note(msg: str) -> None:
        if not quiet:
            print(f"fedrac: {msg}", file=sys.stderr)

    if args.resume:
        if args.config:
            raise ConfigError("--resume takes its configuration from the run directory; drop --config")
        overrides: dict = {}
        for _source, layer in _layers(args):
            overrides.update(layer)
        prep = runner.prepare_resume(args.resume, overrides)
    else:
        prep = runner.prepare(_layers(args))
    cfg = prep.cfg
    done = len(prep.history)
    if prep.resume is not None:
        note(f"resuming {prep.run_dir} after round {done} of {cfg['rounds']}")
    else:
        note(f"{cfg['algorithm']} on {cfg['dataset']} ({cfg['partition']}, {cfg['clients']} clients, "
             f"{cfg['rounds']} rounds, {cfg['local_steps']} local step(s)) -> {prep.run_dir}")
    try:
        out = runner.execute(prep, log=note)
    except runner.Interrupted as e:
        print(f"fedrac: {e}; continue with: fedrac run --resume {e.run_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    s = out.summary
    per = s.get("seconds_per_round")
    print(f"{cfg['algorithm']} | {cfg['dataset']} | {cfg['partition']} | {cfg['clients']} clients | "
          f"{s['rounds']}/{cfg['rounds']} rounds | {s['wall_time_s']:.1f} s"
          f"{'' if per is None else f' ({per:.3f} s/round)'}")
    print(format_table(s))
    print(f"run directory: {out.run_dir}")
    if not out.complete:
        print(f"stopped after round {out.stopped_at}; continue with: fedrac run --resume {out.run_dir}")
    return 0


def _keys(args) -> int:
    from . import algorithms
    from .config import describe_keys

    if args.algorithm:
        opts = {algorithms.get(args.algorithm).name: algorithms.options_of(args.algorithm)}
    else:
        opts = algorithms.all_options()
    print(describe_keys(opts))
    return 0


def _algorithms_cmd(_args) -> int:
    from . import algorithms

    for name in algorithms.available():
        cls = algorithms.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()
        print(f"{name:<24} {doc[0] if doc else ''}")
    return 0


def _usage_errors() -> tuple:
    errs = [ConfigError]
    from .io import RunFileError
    from .runner import RunError

    errs += [RunFileError, RunError]
    for mod, name in (("fedrac.data", "DataError"), ("fedrac.partitions", "PartitionError")):
        try:
            errs.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errs)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    text = " ".join(str(message).split())
    if text.startswith("fedrac: "):
        text = text[len("fedrac: "):]
    print(f"fedrac: warning: {text}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import warnings

    warnings.showwarning = _one_line_warning
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["run"] + argv
    try:
        args = _parser().parse_args(argv)
        if args.command == "keys":
            return _keys(args)
        if args.command == "algorithms":
            return _algorithms_cmd(args)
        if getattr(args, "handler", None) is not None:
            return args.handler(args)
        return _run(args)
    except _usage_errors() as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"fedrac: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedrac: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:              # e.g. `fedrac keys | head`
        import os

        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


def entry() -> None:  # pragma: no cover
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
