"""A faithful re-implementation of the OFFICIAL FedRAC round loop (MLP), for speed comparison.

Written from ALGORITHMS.md §1.3, §3 and §4 (the official ``my_algorithm/FedRAC.py`` on flgo 0.0.15
and ``main.py``'s logger): the same work, organised the way the official code does it -

* model objects: an MLP module whose activation masks are attributes (``mask1``, ``mask2``) set on
  a deep copy of the global model for every candidate / client;
* every evaluation is a separate pass through a ``DataLoader`` over a ``TensorDataset``
  (per-sample indexing and default collation; flgo's ``test``: accuracy and loss), batch 1024 for the
  candidate sweep, 512 for logging;
* round r >= 2: ``a_g`` on V, ``torch.sort`` of the frequency table, the 50 nested candidates on V
  (51 validation passes), the allocation loop, ``F += m_k`` and the frequency-stats CSV row;
* clients: deep copy of the global model with the mask set, a fresh SGD optimizer and a fresh
  shuffled ``DataLoader`` (batch 32), ``num_steps`` steps with ``clip_grad_norm_``; the model object is
  returned;
* aggregation with flgo model arithmetic: ``benchmarks/official_fedrac.official_aggregate`` (the
  aggregation engineer's re-implementation of the official server aggregation: new model objects per
  operation, int masks of non-zero updates, reciprocal counts, layer x client Python sums); when that
  module is absent, a per-tensor Python loop (deltas stacked, ``count = #(delta != 0)``,
  ``w += sum / count`` where count > 0);
* logging (flgo ``MyLogger``): every client's reward model on the test set, on its own training data
  and on its holdout (30 passes for K = 10), fairness and rate (``log_client_data=False`` keeps only
  the 10 test passes, i.e. exactly the quantities the paper reports).

Nothing here is used by the simulator; it exists to time the official organisation of the work.
"""
from __future__ import annotations

import copy
import csv
import math
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class OfficialMLP(nn.Module):
    """flgo-style MLP with the activation masks as module attributes (as in FedRAC.py)."""

    def __init__(self, dim_in: int = 3072, dim_hidden: int = 200, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, dim_hidden)
        self.fc2 = nn.Linear(dim_hidden, dim_hidden)
        self.fc3 = nn.Linear(dim_hidden, num_classes)
        self.mask1 = torch.ones(dim_hidden)
        self.mask2 = torch.ones(dim_hidden)

    # flgo FModule arithmetic: every operation builds a new model object
    def _from_dict(self, md: dict) -> "OfficialMLP":
        res = self.__class__(self.fc1.in_features, self.fc1.out_features, self.fc3.out_features)
        res.load_state_dict(md)
        return res

    def __add__(self, other):
        a, b = self.state_dict(), other.state_dict()
        return self._from_dict({k: a[k] + b[k] for k in a})

    def __sub__(self, other):
        a, b = self.state_dict(), other.state_dict()
        return self._from_dict({k: a[k] - b[k] for k in a})

    def set_mask(self, mask: torch.Tensor) -> None:
        h = self.mask1.numel()
        self.mask1 = mask[:h].clone()
        self.mask2 = mask[h:].clone()

    def forward(self, x):
        x = x.view(x.shape[0], -1)
        x = F.relu(self.fc1(x)) * self.mask1
        x = F.relu(self.fc2(x)) * self.mask2
        return self.fc3(x)


@torch.no_grad()
def flgo_test(model: nn.Module, dataset, batch_size: int) -> dict:
    """flgo's ``calculator.test``: a DataLoader pass, accuracy and mean cross-entropy."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size)
    total_loss, correct, n = 0.0, 0, 0
    for x, y in loader:
        out = model(x)
        total_loss += F.cross_entropy(out, y).item() * len(y)
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
    return {"accuracy": correct / n, "loss": total_loss / n}


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    da = [x - ma for x in a]
    db = [x - mb for x in b]
    den = math.sqrt(sum(x * x for x in da) * sum(x * x for x in db))
    return sum(x * y for x, y in zip(da, db)) / den if den > 0 else float("nan")


class OfficialFedRAC:
    """The official server round organisation (see the module docstring)."""

    def __init__(self, model: OfficialMLP, client_data: Sequence[tuple], val: tuple, test: tuple,
                 standalone: Sequence[float], *, beta: float = 80.0, t: int = 100, num_steps: int = 1,
                 batch_size: int = 32, lr: float = 0.03, clip_grad: float = 1.0, holdout: float = 0.1,
                 csv_path: Optional[str] = None, seed: int = 0, log_client_data: bool = True):
        self.model = model
        self.K = len(client_data)
        self.N = model.mask1.numel() + model.mask2.numel()
        self.pack = 8
        self.C = self.N // self.pack
        g = torch.Generator().manual_seed(seed)
        self.train_sets, self.hold_sets = [], []
        for x, y in client_data:
            perm = torch.randperm(len(y), generator=g)
            nh = max(1, int(holdout * len(y)))
            self.train_sets.append(TensorDataset(x, y))              # train_on_all: everything trains
            self.hold_sets.append(TensorDataset(x[perm[:nh]], y[perm[:nh]]))
        self.val = TensorDataset(*val)
        self.test = TensorDataset(*test)
        self.s = list(standalone)
        e = [math.exp(beta * v) for v in self.s]
        self.c = [100.0 * v / max(e) for v in e]
        self.order = sorted(range(self.K), key=lambda k: self.c[k])
        self.t = t
        self.num_steps, self.batch_size, self.lr, self.clip = num_steps, batch_size, lr, clip_grad
        self.freq = torch.zeros(self.N)
        self.masks = [torch.ones(self.N) for _ in range(self.K)]
        self.csv_path = csv_path
        self.log_client_data = log_client_data

    # server ------------------------------------------------------------------------------------
    def allocate(self, r: int) -> None:
        A = 0.2 if r <= self.t else 0.8
        probe = copy.deepcopy(self.model)
        probe.set_mask(torch.ones(self.N))
        a_g = flgo_test(probe, self.val, 1024)["accuracy"]
        _, idx = torch.sort(self.freq)
        accs = []
        for j in range(self.C):
            m = torch.zeros(self.N)
            m[idx[:(j + 1) * self.pack]] = 1
            cand = copy.deepcopy(self.model)
            cand.set_mask(m)
            accs.append(flgo_test(cand, self.val, 1024)["accuracy"])
        al = A - A / math.log(0.3 * r + 3)
        min_acc = a_g * al
        index_tmp = 0
        for i in range(self.K):
            k = self.order[i]
            if i == self.K - 1:
                n = self.N
            else:
                tau = self.s[k] + (a_g - min_acc) * self.c[k] / 100
                j = self.C - 1
                while j > index_tmp:
                    if accs[j] <= tau:
                        break
                    j -= 1
                if j == index_tmp and index_tmp < self.C - 1:
                    j = index_tmp + 1
                n = self.pack * j
                index_tmp = j
            m = torch.zeros(self.N)
            m[idx[:n]] = 1
            self.masks[k] = m
            self.freq += m
        if self.csv_path:
            with open(self.csv_path, "a", newline="") as f:
                csv.writer(f).writerow(self.freq.tolist() + [float(self.freq.mean()), float(self.freq.var(unbiased=False))])

    def client_train(self, k: int) -> OfficialMLP:
        model = copy.deepcopy(self.model)
        model.set_mask(self.masks[k])
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=self.lr)
        it = iter(DataLoader(self.train_sets[k], batch_size=self.batch_size, shuffle=True))
        for _ in range(self.num_steps):
            try:
                x, y = next(it)
            except StopIteration:
                it = iter(DataLoader(self.train_sets[k], batch_size=self.batch_size, shuffle=True))
                x, y = next(it)
            model.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=self.clip)
            opt.step()
        return model

    def aggregate(self, models: Sequence[nn.Module]) -> None:
        try:
            from official_fedrac import official_aggregate
        except ImportError:
            official_aggregate = None
        if official_aggregate is not None:
            self.model = official_aggregate(self.model, list(models))
            return
        g = self.model.state_dict()
        new = {}
        for name, w in g.items():
            deltas = torch.stack([m.state_dict()[name] - w for m in models])
            count = (deltas != 0).sum(0)
            total = deltas.sum(0)
            upd = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
            new[name] = w + upd
        self.model.load_state_dict(new)

    def log(self) -> dict:
        acc, train_loss, valid_loss = [], 0.0, 0.0
        n_train = sum(len(d) for d in self.train_sets)
        n_hold = sum(len(d) for d in self.hold_sets)
        for k in range(self.K):
            m = copy.deepcopy(self.model)
            m.set_mask(self.masks[k])
            acc.append(flgo_test(m, self.test, 512)["accuracy"])
            if not self.log_client_data:
                continue
            train_loss += flgo_test(m, self.train_sets[k], 512)["loss"] * len(self.train_sets[k]) / n_train
            valid_loss += flgo_test(m, self.hold_sets[k], 512)["loss"] * len(self.hold_sets[k]) / n_hold
        rate, mx = 0, max(acc)
        for k in range(self.K):
            up = (0.5 * self.s[k] / max(self.s) + 0.5) * mx
            if self.s[k] < acc[k] <= up:
                rate += 1
            elif acc[k] <= self.s[k]:
                rate = -10
        return {"fairness": 100 * pearson(self.s, acc), "max_accuracy": mx, "min_accuracy": min(acc),
                "rate": rate / self.K, "train_loss": train_loss, "valid_loss": valid_loss, "client_accuracy": acc}

    def iterate(self, r: int) -> dict:
        if r >= 2:
            self.allocate(r)
        models = [self.client_train(k) for k in range(self.K)]
        self.aggregate(models)
        return self.log()


def from_flat(flat: torch.Tensor, dim_in: int = 3072, hidden: int = 200, classes: int = 10) -> OfficialMLP:
    """An OfficialMLP holding the simulator's flat parameters (fc1.w, fc1.b, fc2.w, fc2.b, fc3.w, fc3.b)."""
    m = OfficialMLP(dim_in, hidden, classes)
    off = 0
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(flat[off:off + p.numel()].view_as(p))
            off += p.numel()
    assert off == flat.numel()
    return m


if __name__ == "__main__":  # pragma: no cover
    print("run benchmarks/bench_round.py, which times this loop against the simulator's round")
    os._exit(0)
