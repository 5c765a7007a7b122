"""Distributed runs: ``fedrac run --distributed`` launched with ``torchrun`` (any processes, any nodes).

Launch::

    torchrun --standalone --nproc_per_node 8 -m fedrac run --distributed --clients 1000 ...
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
             -m fedrac run --distributed ...          # on every node (the data on every node)

Back end: NCCL on GPUs (rank ``r`` uses ``cuda:LOCAL_RANK``), Gloo on CPUs (``--device cpu``).

What each rank does (every rank loads the data and builds the same state from the same seeds):

* **Clients are sharded** in contiguous blocks (:func:`shard_range`; deterministic, balanced to
  within one client). A rank trains only its block (``client_batch`` at a time; the width methods
  and Aequa one client at a time, ``chunk_size``) and streams the updates into one
  ``fedrac_kernels.StreamingAggregator`` (accumulate mode: float32 ``num``/``den``).
  The clients of the other ranks are not trained here, but their RNG streams are advanced exactly
  as their training advances them, so every rank holds every client's stream state (checkpoints
  are complete, resume works with any number of processes).
* **One data all-reduce per round** sums the ranks' ``(num, den)`` together with the
  client counts and a 64-bit digest of the round's allocation (sum and sum of squares of 16
  nibbles, exact in float32: every rank checks that all ranks computed the same allocation); each
  rank then applies the summed masked mean, so the global model is the same bits on every rank.
  The result equals the single-process run up to float association (the partial sums are added
  in a different order; bit for bit where it agrees, e.g. 2 ranks holding 2 + 1 clients that
  train one at a time); the same configuration on the same ranks gives the same bits twice.
* **Server-side steps** (allocation, frequency table) run identically on every rank from the
  same state. The **candidate sweep is split**: every ``split="val"`` nested evaluation
  (FedRAC's and FedSAC's candidates, Aequa's width curve) counts the correct predictions of each
  rank's 1/W of the validation set (whole evaluation blocks, round robin:
  :func:`fedrac.evaluation.nested_candidate_counts`) and one int64 all-reduce sums the counts, so
  the accuracies are exactly the one-process ones at 1/W of the cost per rank. The reward
  accuracies on T are split the same way when the rewards are nested submodels (every
  MaskedAlgorithm: the other ranks join with ``evaluate_rewards(collective_only=True)``); rank 0
  alone computes the metrics from them and writes outputs and checkpoints (through the
  single-process loop, :func:`fedrac.runner.execute`).
* **Rounds are lock-stepped**: after rank 0 wrote a round's metrics and checkpoint, every rank
  joins a small all-reduce (``round_end``). Every protocol step (EVAL, DATA, SYNC, FINAL) opens
  with the same one-float all-reduce, the gate, so a rank that fails (any exception, at any
  point) joins whichever step is pending with its error flag set instead of its data, and
  every rank stops at the same point; the ranks then exchange their error messages, each prints
  one line, and all exit non-zero. A checkpoint is written atomically by rank 0 only after the
  round's all-reduce, so the last checkpoint is always intact. A rank that dies without raising
  (killed, segfault) is caught by the collective timeout (``--dist-timeout``, default 1800 s)
  and by torchrun, which stops the other workers.

Resume: ``torchrun ... -m fedrac run --distributed --resume RUN_DIR`` (every rank reads RUN_DIR:
a shared file system, or a copy on every node).

Algorithms: every one that uses the shared :class:`~fedrac.algorithms.base.MaskedAlgorithm`
round and its hooks (:func:`supported_algorithms`): fedrac and its ablations, fedsac, heterofl,
fedrolex, fjord (every ``aggregation``, ``compact`` included: each rank adds its clients'
compact uploads to its aggregator) and aequa (both ``allocation`` modes). Their server-side
randomness (dynamic rate assignment, FjORD's step widths, Aequa's sub-step widths) is drawn in
``allocate`` on every rank from the same ``sim.generator`` state, before any training, and is
part of the checked digest (``round_draws``); a client whose training makes several
``local_train`` calls (FjORD's runs of equal width, Aequa's sub-steps) has its stream replayed
call by call on the other ranks (``local_runs``). Algorithms with personal models or their own
round (cffl, cgsv, fedave, fedavg, fedavg_plain, fedpw, fedpw_plain, iafl, standalone) are
refused at start-up with a message naming the algorithm.

Fault injection for tests: ``FEDRAC_FAIL_AT=RANK:ROUND`` makes that rank raise when its clients
start training in that round (``RANK:ROUND:sweep``: in its share of the candidate sweep).
"""
from __future__ import annotations

import datetime
import os
import sys
from typing import Optional

import torch

ENV_FAIL = "FEDRAC_FAIL_AT"
DEFAULT_TIMEOUT_S = 1800.0
EXIT_FAILED = 1

_HASH_SLOTS = 16          # 16 nibbles = a 64-bit allocation digest


class DistributedError(RuntimeError):
    """A distributed run stopped (this rank or another failed, or the ranks disagree)."""


def shard_range(K: int, world: int, rank: int) -> range:
    """Rank ``rank``'s contiguous block of clients: the first ``K % world`` ranks get one more."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank: {rank} is not in [0, {world})")
    base, extra = divmod(int(K), int(world))
    lo = rank * base + min(rank, extra)
    return range(lo, lo + base + (1 if rank < extra else 0))


def env_world() -> Optional[tuple[int, int, int]]:
    """(rank, world size, local rank) from torchrun's environment, or None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


class DistContext:
    """This process's place in a distributed run and the per-round protocol.

    Every rank performs the same sequence of steps: per round ``DATA`` (inside the algorithm's
    round, :meth:`sum_aggregators`), with any number of ``EVAL`` before or after it (the sharded
    sweep, :meth:`sum_counts`; the same calls on every rank), then ``SYNC`` (:meth:`round_end`), and ``FINAL`` after the
    last round (:meth:`finish`). Each step opens with the gate (:meth:`_gate`, one float, the
    same shape for every step), then carries its payload. A failing rank joins the pending gate
    with its error flag set (:meth:`abort`); a rank that sees a flag performs no further
    protocol collective. Then all ranks exchange messages (``all_gather_object``).
    """

    def __init__(self, rank: int, world: int, local_rank: int, backend: str, device: torch.device):
        self.rank, self.world, self.local_rank = int(rank), int(world), int(local_rank)
        self.backend = backend
        self.device = torch.device(device)
        self.stage = "data"           # data | sync | final | done | aborted
        self.round = 0
        self.completed = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, K: int) -> range:
        return shard_range(K, self.world, self.rank)

    # ---- protocol -------------------------------------------------------------------------------
    def begin(self, start: int, R: int) -> None:
        """Before the loop: rounds ``start..R`` follow (none: straight to FINAL)."""
        self.round = start
        self.stage = "data" if start <= R else "final"

    def _expect(self, stage: str) -> None:
        if self.stage != stage:
            raise DistributedError(f"protocol error on rank {self.rank}: at {self.stage!r}, expected {stage!r}")

    def before_training(self, r: int, sim, mine: range, runs) -> None:
        """Called by the round before this rank trains its clients: fault injection, and the
        other ranks' clients' RNG streams advanced as their training advances them: the
        ``local_train`` calls ``runs(k)`` lists (``num_steps`` of each call, in order: one call of
        ``local_steps`` by default, FjORD's runs of equal width, Aequa's sub-steps)."""
        from .batched import advance_streams

        self.round = r
        self._inject("train")
        bs = int(sim.cfg["batch_size"])
        for k in range(sim.K):
            if k in mine:
                continue
            for n in runs(k):            # every call draws a fresh permutation (local_train's data order)
                advance_streams([sim.client_sizes[k]], [sim.client_generators[k]], num_steps=int(n), batch_size=bs)

    def _inject(self, where: str) -> None:
        """Fault injection for tests: ``FEDRAC_FAIL_AT=RANK:ROUND[:WHERE]`` raises on that rank in
        that round at ``train`` (default: when its clients start training) or ``sweep`` (in the
        sharded candidate sweep, before its EVAL step)."""
        spec = os.environ.get(ENV_FAIL, "")
        if not spec:
            return
        parts = spec.split(":")
        try:
            frank, fround = int(parts[0]), int(parts[1])
        except (ValueError, IndexError):
            return
        at = parts[2] if len(parts) > 2 and parts[2] else "train"
        if frank == self.rank and fround == self.round and at == where:
            raise RuntimeError(f"injected failure ({ENV_FAIL}={spec})")

    def sum_aggregators(self, agg, digest: bytes) -> None:
        """DATA: sum every rank's ``(num, den)`` and counts into ``agg`` (the gate, then one
        all-reduce), with the allocation check."""
        import torch.distributed as tdist

        self._expect("data")
        sd = agg.state_dict()
        P = int(sd["P"])
        nib = _nibbles(digest)
        tail = torch.tensor([float(sd["clients"]), float(sd["positive"]), float(sd["seen"])]
                            + [float(v) for v in nib] + [float(v * v) for v in nib], dtype=torch.float32)
        buf = torch.empty(2 * P + tail.numel(), dtype=torch.float32, device=agg.device)
        buf[:P].copy_(sd["num"])
        buf[P:2 * P].copy_(sd["den"])
        buf[2 * P:].copy_(tail.to(agg.device))
        self._pass_gate()
        self.stage = "sync"
        tdist.all_reduce(buf)
        t = buf[2 * P:].cpu()
        s1 = t[3:3 + _HASH_SLOTS]
        s2 = t[3 + _HASH_SLOTS:]
        W = float(self.world)
        mine1 = torch.tensor([W * v for v in nib], dtype=torch.float32)
        mine2 = torch.tensor([W * v * v for v in nib], dtype=torch.float32)
        if not (torch.equal(s1, mine1) and torch.equal(s2, mine2)):
            self.stage = "aborted"
            raise DistributedError(f"the ranks computed different allocations in round {self.round} (the "
                                   "server-side evaluation is not reproducible across the ranks' devices)")
        sd["num"] = buf[:P]
        sd["den"] = buf[P:2 * P]
        sd["clients"], sd["positive"], sd["seen"] = int(t[0]), int(t[1]), int(t[2])
        sd["dropped"] = []
        agg.load_state_dict(sd)

    def _gate(self, flag: float) -> bool:
        """The one-float all-reduce that opens every protocol step: True iff some rank's flag is set."""
        import torch.distributed as tdist

        t = torch.tensor([flag], dtype=torch.float32, device=self.device)
        tdist.all_reduce(t)
        return float(t.item()) > 0

    def _pass_gate(self) -> None:
        if self._gate(0.0):
            self.stage = "aborted"
            raise DistributedError("stopped: another rank failed")

    def sum_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """EVAL (inside the round, before or after DATA; every rank makes the same calls): the sum over the
        ranks of an integer count vector (the sharded candidate sweep, :meth:`fedrac.runner.
        Simulation.nested_accuracy`), exact: int64 on the wire. Returns int64 on the CPU."""
        import torch.distributed as tdist

        if self.stage not in ("data", "sync"):      # anywhere in the round (Aequa: after DATA)
            self._expect("data")
        self._inject("sweep")
        t = counts.to(device=self.device, dtype=torch.int64).contiguous()
        self._pass_gate()
        tdist.all_reduce(t)
        return t.cpu()

    def round_end(self, r: int, final: bool = False) -> None:
        """SYNC: round ``r`` is complete on rank 0 (outputs and checkpoint written)."""
        self._expect("sync")
        self.stage = "final" if final else "data"
        self._pass_gate()
        self.completed = r
        self.round = r + 1

    def finish(self) -> None:
        """FINAL: rank 0 wrote the summary; everybody may exit."""
        self._expect("final")
        self.stage = "done"
        self._pass_gate()

    def abort(self, exc: BaseException) -> list:
        """After an exception on this rank: join the pending collective with the error flag (unless
        a peer's flag was already seen), then exchange messages.

        Returns ``[(rank, round, message or None)]`` for every rank (None: that rank only stopped
        because of another), or just this rank's entry when the peers cannot be reached."""
        import torch.distributed as tdist

        peer_stop = isinstance(exc, DistributedError) and str(exc).startswith("stopped:")
        own = None if peer_stop else f"{type(exc).__name__}: {exc}"
        try:
            if self.stage in ("data", "sync", "final"):   # every pending step opens with the gate
                self.stage = "aborted"
                self._gate(1.0)
            self.stage = "aborted"
            msgs: list = [None] * self.world
            tdist.all_gather_object(msgs, (self.round, own))
        except Exception as e:  # noqa: BLE001 - a peer is gone: report what we know
            return [(self.rank, self.round, own or f"{type(e).__name__}: {e}")]
        return [(rk, m[0], m[1]) for rk, m in enumerate(msgs)]


def _nibbles(digest: bytes) -> list[int]:
    out = []
    for b in digest[: _HASH_SLOTS // 2]:
        out += [b >> 4, b & 15]
    return out


# ---------------------------------------------------------------------------------------- launch

def _device_and_backend(layers: list, local_rank: int) -> tuple[str, str]:
    dev = None
    for _source, layer in layers:
        if "device" in layer and layer["device"] is not None:
            dev = str(layer["device"]).strip().lower()
    use_cuda = torch.cuda.is_available() and (dev is None or dev == "auto" or dev.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return "cuda", "nccl"
    return "cpu", "gloo"


def worker_round(prep, r: int) -> None:
    """Round ``r`` on a rank > 0: what rank 0's :func:`fedrac.runner.round_step` does, less the
    metrics: the algorithm's round, then this rank's share of the split reward evaluation."""
    prep.algo.round(r)
    prep.sim.evaluate_rewards(prep.algo.rewards(), collective_only=True)


def _worker_loop(prep, ctx: DistContext, start: int) -> None:
    """Ranks > 0: the same rounds as rank 0's :func:`fedrac.runner.execute`, without outputs; of
    the reward evaluation only their share of the split nested evaluation (metrics are rank 0's)."""
    cfg = prep.cfg
    R = int(cfg["rounds"])
    stop_after = int(cfg["stop_after"])
    for r in range(start, R + 1):
        worker_round(prep, r)
        stop_here = bool(stop_after and r >= stop_after and r < R)
        ctx.round_end(r, final=stop_here or r == R)
        if stop_here:
            break


def distributed_support(cls) -> Optional[str]:
    """None when algorithm class ``cls`` runs with ``--distributed``, else why not."""
    from .algorithms.base import MaskedAlgorithm

    if not (isinstance(cls, type) and issubclass(cls, MaskedAlgorithm)):
        return ("it is not a submodel method over one global model (personal models or its own round), so "
                "its round cannot be split into per-rank partial sums")
    if cls.round is not MaskedAlgorithm.round:
        return "it overrides round() instead of using the shared submodel round's hooks"
    if cls.aggregate is not MaskedAlgorithm.aggregate:
        return "it overrides aggregate(); the ranks can only sum the shared streamed aggregation"
    return None


def supported_algorithms() -> list[str]:
    """The registered algorithm names that run with ``--distributed``."""
    from . import algorithms

    return [n for n in algorithms.available() if distributed_support(algorithms.get(n)) is None]


def _check_algorithm(prep) -> None:
    from .config import ConfigError

    name = prep.cfg["algorithm"]
    why = distributed_support(type(prep.algo))
    if why is not None:
        raise ConfigError(f"--distributed does not support {name}: {why}. Run {name} without --distributed; "
                          f"--distributed runs {', '.join(supported_algorithms())}")


def run_from_cli(args) -> int:
    """``fedrac run --distributed`` (called by :mod:`fedrac.cli`); returns the exit status."""
    import torch.distributed as tdist

    from . import cli, runner
    from .config import ConfigError

    world = env_world()
    if world is None:
        raise ConfigError("--distributed needs torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR ...); "
                          "launch e.g. torchrun --standalone --nproc_per_node 2 -m fedrac run --distributed ...")
    rank, size, local_rank = world
    if args.resume and args.config:
        raise ConfigError("--resume takes its configuration from the run directory; drop --config")
    layers = cli._layers(args)
    dev, backend = _device_and_backend(layers, local_rank)
    timeout = float(args.dist_timeout if args.dist_timeout is not None else DEFAULT_TIMEOUT_S)
    if not (timeout > 0):
        raise ConfigError(f"--dist-timeout {args.dist_timeout}: must be a positive number of seconds")
    tdist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    ctx = DistContext(rank, size, local_rank, backend, torch.device(dev if dev == "cpu" else "cuda"))
    quiet = args.quiet or rank != 0

    def note(msg: str) -> None:
        if not quiet:
            print(f"fedrac: {msg}", file=sys.stderr)

    def say_error(msg: str) -> None:
        text = " ".join(str(msg).split())
        print(f"fedrac: error: {text}" if rank == 0 else f"fedrac: error: [rank {rank}] {text}", file=sys.stderr)

    try:
        # ---- set-up on every rank; one flag all-reduce decides whether everybody goes on
        prep, err = None, None
        try:
            if args.resume:
                overrides: dict = {}
                for _source, layer in layers:
                    overrides.update(layer)
                prep = runner.prepare_resume(args.resume, overrides)
            else:
                if dev == "cuda":
                    layers.append(("--distributed", {"device": "cuda"}))      # this rank's cuda:LOCAL_RANK
                prep = runner.prepare(layers)
            _check_algorithm(prep)
        except Exception as e:  # noqa: BLE001 - reported below, on every rank
            err = e
        failed = ctx._gate(1.0 if err is not None else 0.0)
        if failed:
            msgs: list = [None] * size
            usage = cli._usage_errors()
            own = None if err is None else (str(err) if isinstance(err, usage) else f"{type(err).__name__}: {err}")
            tdist.all_gather_object(msgs, own)
            bad = [(rk, m) for rk, m in enumerate(msgs) if m is not None]
            if rank == 0:
                rk, m = bad[0]
                say_error(m if rk == 0 else f"rank {rk}: {m}")
            elif own is not None and own != msgs[0]:
                say_error(own)
            _settle(tdist)
            return cli.EXIT_USAGE if err is None or isinstance(err, usage) else EXIT_FAILED
        sim, cfg = prep.sim, prep.cfg
        sim.dist = ctx
        start = 1 if prep.resume is None else int(prep.resume["round"]) + 1
        ctx.begin(start, int(cfg["rounds"]))
        if prep.resume is not None:
            note(f"resuming {prep.run_dir} after round {len(prep.history)} of {cfg['rounds']} on {size} processes")
        else:
            note(f"{cfg['algorithm']} on {cfg['dataset']} ({cfg['partition']}, {cfg['clients']} clients, "
                 f"{cfg['rounds']} rounds) on {size} processes ({backend}; {sim.K // size}-{-(-sim.K // size)} "
                 f"clients each, client_batch={cfg['client_batch']}) -> {prep.run_dir}")
        if rank == 0:
            out = runner.execute(prep, log=note, hooks=ctx)
            ctx.finish()
            s = out.summary
            per = s.get("seconds_per_round")
            print(f"{cfg['algorithm']} | {cfg['dataset']} | {cfg['partition']} | {cfg['clients']} clients | "
                  f"{s['rounds']}/{cfg['rounds']} rounds | {size} processes | {s['wall_time_s']:.1f} s"
                  f"{'' if per is None else f' ({per:.3f} s/round)'}")
            print(cli.format_table(s))
            print(f"run directory: {out.run_dir}")
            if not out.complete:
                print(f"stopped after round {out.stopped_at}; continue with: torchrun ... -m fedrac run "
                      f"--distributed --resume {out.run_dir}")
        else:
            _worker_loop(prep, ctx, start)
            ctx.finish()
        return 0
    except (KeyboardInterrupt, runner.Interrupted) as e:
        # peers may be gone: no collective
        say_error(f"interrupted ({e})" if str(e) else "interrupted")
        return cli.EXIT_INTERRUPTED
    except BaseException as e:  # noqa: BLE001 - every failure stops every rank
        msgs = ctx.abort(e)
        failures = [(rk, r, m) for rk, r, m in msgs if m is not None]
        if failures:
            text = "; ".join(f"rank {rk} failed in round {r}: {m}" for rk, r, m in failures)
        else:
            text = f"{type(e).__name__}: {e}"
        if rank == 0:
            text += "; " + _checkpoint_note(locals().get("prep"))
        elif not any(rk == rank for rk, _, _ in failures):
            text = f"stopping because {text}"
        say_error(text)
        if len(msgs) == size:
            _settle(tdist)
        return EXIT_FAILED
    finally:
        try:
            if tdist.is_initialized():
                tdist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def _settle(tdist) -> None:
    """Every rank has printed its message before any exits (torchrun stops the others on the first
    non-zero exit)."""
    try:
        sys.stderr.flush()
        tdist.barrier()
    except Exception:  # noqa: BLE001
        pass


def _checkpoint_note(prep) -> str:
    if prep is None:
        return "nothing was written"
    path = prep.run_dir / "checkpoint.pt"
    if not path.exists():
        return f"no checkpoint was written yet ({prep.run_dir})"
    try:
        from . import io as fio

        r = int(fio.load_checkpoint(path)["round"])
        return f"the checkpoint of round {r} in {prep.run_dir} is intact (continue with --resume {prep.run_dir})"
    except Exception:  # noqa: BLE001
        return f"see {path}"
