"""fedrac_kernels.gram: client Gram matrix (K12), streamed over P, and FedPW's masking helpers (K13)."""
import math

import pytest
import torch

import fedrac_kernels as fk
from fedrac_kernels.gram import (GramAccumulator, bottomk_magnitude_mask, column_normalized_std, gram_matrix,
                                 gram_reference, smallest_indices)

from conftest import HAS_CUDA


def test_exported():
    assert fk.gram_matrix is gram_matrix
    assert fk.GramAccumulator is GramAccumulator
    assert fk.bottomk_magnitude_mask is bottomk_magnitude_mask
    assert fk.column_normalized_std is column_normalized_std


def test_hand_example():
    U = torch.tensor([[1., 2., 0.], [0., 1., 1.]])
    want = torch.tensor([[5., 2.], [2., 2.]], dtype=torch.float64)
    for chunk in (1, 2, 3, 100):
        assert torch.equal(gram_matrix(U, chunk_size=chunk), want)
    # summed over layers: [1, 2 | 0] and [0, 1 | 1]
    assert torch.equal(gram_matrix([U[:, :2], U[:, 2:]]), want)


@pytest.mark.parametrize("K,P,chunk", [(1, 7, 3), (3, 1, 5), (5, 97, 8), (10, 1013, 64), (7, 4096, 4096),
                                       (4, 300, 1)])
def test_matches_reference(gen, K, P, chunk):
    U = torch.randn(K, P, generator=gen)
    ref = gram_reference(U)
    G = gram_matrix(U, chunk_size=chunk)
    assert G.dtype == torch.float64 and G.shape == (K, K)
    torch.testing.assert_close(G, ref, rtol=1e-12, atol=1e-12)
    G32 = gram_matrix(U, chunk_size=chunk, accumulate=torch.float32)
    assert G32.dtype == torch.float32
    torch.testing.assert_close(G32.double(), ref, rtol=2e-5, atol=2e-5 * math.sqrt(P))


def test_same_bits_for_every_input_form(gen):
    K, P, chunk = 6, 1000, 64
    U = torch.randn(K, P, generator=gen)
    G = gram_matrix(U, chunk_size=chunk)
    rows = [U[k].clone() for k in range(K)]
    cuts = [0, 3, 3, 70, 128, 129, 500, 999, 1000]            # odd widths, an empty block, chunk-crossing
    blocks = [U[:, a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    assert torch.equal(gram_matrix(rows, chunk_size=chunk), G)
    assert torch.equal(gram_matrix(blocks, chunk_size=chunk), G)
    assert torch.equal(gram_matrix((b for b in blocks), chunk_size=chunk), G)        # a generator
    assert torch.equal(gram_matrix(U.t().contiguous().t(), chunk_size=chunk), G)   # column-major input
    assert torch.equal(G, G.t())                                                   # exactly symmetric


def test_low_precision_inputs(gen):
    U = torch.randn(4, 333, generator=gen)
    for dt in (torch.bfloat16, torch.float16):
        Ul = U.to(dt)
        torch.testing.assert_close(gram_matrix(Ul, chunk_size=50), gram_reference(Ul), rtol=1e-12, atol=1e-12)


def test_streaming_state(gen):
    K, chunk = 3, 16
    U = torch.randn(K, 100, generator=gen)
    full = gram_matrix(U, chunk_size=chunk)
    acc = GramAccumulator(K, chunk_size=chunk)
    acc.add(U[:, :37])
    mid = acc.gram()                                   # a look in the middle changes nothing
    torch.testing.assert_close(mid, gram_reference(U[:, :37]), rtol=1e-12, atol=1e-12)
    sd = acc.state_dict()
    acc.add(U[:, 37:])
    assert torch.equal(acc.gram(), full)
    again = GramAccumulator(K, chunk_size=chunk)
    again.load_state_dict(sd)
    again.add_rows([U[k] for k in range(K)], 37, 100)
    assert torch.equal(again.gram(), full)
    assert again.columns == 100
    assert acc._buf is None or acc._buf.numel() == K * chunk     # bounded working memory


def test_large_p_from_rows_bounded_memory(gen):
    # rows that are never stacked: the op reads chunk_size columns of each at a time
    K, P, chunk = 4, 50_003, 1024
    rows = [torch.randn(P, generator=gen) for _ in range(K)]
    G = gram_matrix(rows, chunk_size=chunk)
    ref = torch.stack([r.double() for r in rows])
    torch.testing.assert_close(G, ref @ ref.t(), rtol=1e-10, atol=1e-9)


def test_nonfinite():
    U = torch.ones(3, 10)
    U[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"^updates: client\(s\) \[1\]"):
        gram_matrix(U)
    G = gram_matrix(U, nonfinite="propagate")
    assert math.isnan(G[1, 1]) and G[0, 0] == 10
    U[1, 4] = 0
    U[2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"\[2\]"):
        gram_matrix(U)


@pytest.mark.parametrize("call,match,exc", [
    (lambda: gram_matrix(torch.ones(3)), "^updates", ValueError),
    (lambda: gram_matrix(torch.ones(0, 4)), "^updates: no clients", ValueError),
    (lambda: gram_matrix([]), "^updates: no clients", ValueError),
    (lambda: gram_matrix(iter([])), "^updates: no blocks", ValueError),
    (lambda: gram_matrix(torch.ones(2, 3, dtype=torch.int64)), "^updates", TypeError),
    (lambda: gram_matrix([torch.ones(3), torch.ones(4)]), "^updates: entry 1", ValueError),
    (lambda: gram_matrix([torch.ones(3), torch.ones(3, dtype=torch.float64)]), "^updates: entry 1", TypeError),
    (lambda: gram_matrix([torch.ones(2, 3), torch.ones(3, 3)]), "^updates: block 1", ValueError),
    (lambda: gram_matrix([torch.ones(2, 3), torch.ones(3)]), "^updates", ValueError),
    (lambda: gram_matrix("abc"), "^updates", TypeError),
    (lambda: gram_matrix(torch.ones(2, 3), chunk_size=0), "^chunk_size", ValueError),
    (lambda: gram_matrix(torch.ones(2, 3), chunk_size=2.5), "^chunk_size", TypeError),
    (lambda: gram_matrix(torch.ones(2, 3), accumulate=torch.float16), "^accumulate", TypeError),
    (lambda: gram_matrix(torch.ones(2, 3), nonfinite="drop"), "^nonfinite", ValueError),
    (lambda: GramAccumulator(0), "^K", ValueError),
    (lambda: GramAccumulator(2).add(torch.ones(3, 4)), "^block", ValueError),
    (lambda: GramAccumulator(2).add_rows([torch.ones(3), torch.ones(3)], 2, 5), "^start", ValueError),
    (lambda: bottomk_magnitude_mask(torch.ones(2, 3), [1, 4]), "^counts", ValueError),
    (lambda: bottomk_magnitude_mask(torch.ones(2, 3), [1]), "^counts", ValueError),
    (lambda: bottomk_magnitude_mask(torch.ones(3), [1]), "^rows", ValueError),
    (lambda: column_normalized_std(torch.ones(1, 3)), "^rows", ValueError),
    (lambda: smallest_indices(torch.ones(3), 4), "^n", ValueError),
])
def test_bad_input_names_the_argument(call, match, exc):
    with pytest.raises(exc, match=match):
        call()


def test_bottomk_magnitude_mask_hand():
    rows = torch.tensor([[0.5, -0.1, 0.3, -0.3, 2.0],
                         [1.0, 1.0, -1.0, 4.0, 0.0]])
    masked, mean = bottomk_magnitude_mask(rows, [3, 2], sample_every=2)
    # row 0: |.| ascending = 0.1 (1), 0.3 (2), 0.3 (3), 0.5, 2.0 -> drop 1, 2, 3 (tie 0.3: lower index first)
    assert torch.equal(masked[0], torch.tensor([0.5, 0.0, 0.0, 0.0, 2.0]))
    # row 1: 0.0 (4), then 1.0 at 0, 1, 2 -> drop 4 and 0
    assert torch.equal(masked[1], torch.tensor([0.0, 1.0, -1.0, 4.0, 0.0]))
    # sampled every 2nd dropped entry in ascending order: row 0 -> {0.1, 0.3(idx 3)}; row 1 -> {0.0}
    assert mean[0].item() == pytest.approx(0.2)
    assert mean[1].item() == 0.0
    _, none = bottomk_magnitude_mask(rows, [0, 0])
    assert torch.isnan(none).all()
    assert torch.equal(rows[0, 1], torch.tensor(-0.1))       # input untouched


def test_column_normalized_std_hand():
    rows = torch.tensor([[3.0, 4.0], [0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    # unit rows: [0.6, 0.8], [0, 1], [0, 0] (zero row stays zero)
    # columns: c0 = [0.6, 0, 0] / 0.6 = [1, 0, 0]; c1 = [0.8, 1, 0] / sqrt(1.64)
    std = column_normalized_std(rows)
    c1 = torch.tensor([0.8, 1.0, 0.0], dtype=torch.float64) / math.sqrt(1.64)
    assert std[0].item() == pytest.approx(torch.tensor([1.0, 0.0, 0.0]).std().item())
    assert std[1].item() == pytest.approx(c1.std().item())
    assert torch.isfinite(column_normalized_std(torch.zeros(2, 4))).all()


def test_smallest_indices_stable():
    v = torch.tensor([3.0, 1.0, 2.0, 1.0, 0.5])
    assert smallest_indices(v, 3).tolist() == [4, 1, 3]
    assert smallest_indices(v, 0).tolist() == []


@pytest.mark.gpu
def test_cuda_matches_cpu(gen):
    U = torch.randn(8, 5000, generator=gen)
    Gc = gram_matrix(U, chunk_size=512)
    Gg = gram_matrix(U.cuda(), chunk_size=512)
    assert Gg.is_cuda
    torch.testing.assert_close(Gg.cpu(), Gc, rtol=1e-12, atol=1e-10)
    # host rows streamed onto the device
    Gs = gram_matrix([r for r in U], chunk_size=512, device="cuda")
    assert torch.equal(Gs, Gg)
    assert torch.equal(Gs, Gs.t())
