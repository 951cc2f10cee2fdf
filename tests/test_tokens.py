"""Token elimination's pieces (issue 17, first steps): the block scorer and the kept positions, and the
gather / scatter-add kernels through Triton's interpreter against their PyTorch references."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from memopt.tokens import attention_mass, block_recall, block_scores, kept_blocks, kept_count, kept_positions, \
    mass_coverage


@pytest.mark.parametrize("seq,block,ratio", [(256, 64, 0.4), (250, 64, 0.4), (64, 16, 0.25), (100, 32, 1.0)])
def test_kept_positions_are_sorted_static_and_keep_the_first_and_last_block(seq: int, block: int,
                                                                            ratio: float) -> None:
    torch.manual_seed(0)
    q, k = torch.randn(3, 4, seq, 16), torch.randn(3, 2, seq, 16)
    blocks = kept_blocks(block_scores(q, k, block), ratio)
    count = kept_count(-(-seq // block), ratio)
    assert blocks.shape == (3, count)
    assert (blocks[:, 0] == 0).all() and (blocks[:, -1] == -(-seq // block) - 1).all()
    assert (blocks.diff(dim=1) > 0).all()
    positions = kept_positions(blocks, block, seq)
    assert positions.shape[1] == (count - 1) * block + (seq - (-(-seq // block) - 1) * block)
    assert (positions.diff(dim=1) > 0).all() and positions.max() == seq - 1
    if ratio == 1.0:
        assert torch.equal(positions, torch.arange(seq).expand(3, -1))


def test_the_scorer_finds_the_block_that_receives_the_attention() -> None:
    """Every query aligned with the keys of block 2 (of 6): block 2 scores highest, by the scorer and by
    the exact attention mass, which sums to one per query and head."""
    torch.manual_seed(0)
    seq, block, dim = 96, 16, 8
    direction = torch.randn(dim)
    q = direction.expand(1, 2, seq, dim) * 3 + 0.1 * torch.randn(1, 2, seq, dim)
    k = 0.1 * torch.randn(1, 2, seq, dim)
    k[:, :, 2 * block:3 * block] += direction * 3
    scores, exact = block_scores(q, k, block), attention_mass(q, k, block)
    assert scores[0, 1:-1].argmax().item() + 1 == 2
    assert exact[0, 2] == exact[0, 1:].max()
    torch.testing.assert_close(exact.sum(), torch.tensor(2.0 * seq))
    assert block_recall(scores, exact, keep_ratio=0.5) == 1.0


def test_recall_counts_blocks_and_coverage_counts_mass() -> None:
    """Exact masses of 6 blocks, 4 kept (first and last forced): the best two of the middle are 1 and 2.
    A scorer that picks 1 and 3 misses one block of two (recall 3/4) but block 3's mass is almost
    block 2's, so it covers (10 + 5 + 3.9 + 1) / (10 + 5 + 4 + 1) of the best mass."""
    exact = torch.tensor([[10.0, 5.0, 4.0, 3.9, 0.5, 1.0]])
    scores = torch.tensor([[0.0, 9.0, 1.0, 8.0, 0.0, 0.0]])
    assert block_recall(scores, exact, keep_ratio=4 / 6) == 0.75
    assert mass_coverage(scores, exact, keep_ratio=4 / 6) == pytest.approx(19.9 / 20.0)
    assert mass_coverage(exact, exact, keep_ratio=4 / 6) == 1.0


# --------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def token_rows() -> Any:
    pytest.importorskip("triton")
    from memopt.codegen import token_rows
    from memopt.codegen.triton_kernels import interpreting

    assert interpreting(), "tests/conftest.py sets TRITON_INTERPRET=1 before Triton is imported"
    return token_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch,seq,hidden,kept", [(2, 37, 72, 10), (1, 64, 130, 64), (3, 5, 1100, 2)])
def test_gather_and_scatter_add_rows_match_their_references(token_rows: Any, batch: int, seq: int, hidden: int,
                                                             kept: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    wide = torch.randn(batch, seq, hidden + 8).to(dtype)
    x = wide[:, :, :hidden]                            # rows strided past the hidden size
    index = torch.stack([torch.randperm(seq)[:kept].sort().values for _ in range(batch)])
    gathered = token_rows.gather_rows(x, index)
    assert torch.equal(gathered, token_rows.reference_gather_rows(x, index))
    rows = torch.randn(batch, kept, hidden).to(dtype)
    out = torch.randn(batch, seq, hidden).to(dtype)
    expected = token_rows.reference_scatter_add_rows_(out.clone(), index, rows)
    result = token_rows.scatter_add_rows_(out, index, rows)
    assert result is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    untouched = torch.ones(seq, dtype=torch.bool)
    untouched[index[0]] = False
    assert torch.equal(out[0, untouched], expected[0, untouched])


def test_bad_shapes_are_explained(token_rows: Any) -> None:
    with pytest.raises(ValueError, match=r"expected x \(B, S, H\) and index \(B, K\)"):
        token_rows.gather_rows(torch.randn(4, 5), torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden dimension must be contiguous"):
        token_rows.gather_rows(torch.randn(2, 6, 5).transpose(1, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="rows must be"):
        token_rows.scatter_add_rows_(torch.randn(2, 6, 5), torch.zeros(2, 2, dtype=torch.long), torch.randn(2, 3, 5))


def test_the_row_ops_pass_torchs_custom_op_checks() -> None:
    """memopt::gather_rows and memopt::scatter_add_rows (what the pass emits under codegen="triton"):
    their fake shapes, schemas and autograd registrations pass ``torch.library.opcheck``, and each one's
    gradient is the other (checked against gather / scatter_add's own)."""
    from memopt.runtime.token_rows import gather_rows, scatter_add_rows

    torch.manual_seed(0)
    x = torch.randn(2, 9, 6, requires_grad=True)
    index = torch.tensor([[0, 3, 8], [1, 2, 8]])
    rows = torch.randn(2, 3, 6, requires_grad=True)
    torch.library.opcheck(gather_rows, (x, index))
    torch.library.opcheck(scatter_add_rows, (x, index, rows, 9))
    torch.library.opcheck(scatter_add_rows, (None, index, rows, 9))
    expand = index[..., None].expand(-1, -1, 6)
    out = scatter_add_rows(x, index, gather_rows(x, index) * rows, 9)
    expected = x.scatter_add(1, expand, torch.gather(x, 1, expand) * rows)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (x, rows), grad),
                               torch.autograd.grad(expected, (x, rows), grad))
