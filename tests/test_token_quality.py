"""Token elimination's quality on real text (issue 17): LeMo's setting in small, as
:mod:`tests.token_quality` describes. A tiny Llama (8 layers) pretrained on docstrings at 256 tokens is
fine-tuned with LoRA at 1024 tokens, densely and keeping 40% of the tokens (blocks of 64) from the middle
layer on: for 80 steps here (160 s on a 2-core CPU), for 200 in benchmarks/bench_tokens_quality.py."""

from __future__ import annotations

from tests.token_quality import Setting, run


def test_lora_fine_tuning_with_token_elimination_ends_near_dense() -> None:
    """The fine-tuned models' held-out loss (both evaluated densely, as LeMo's perplexities are) within
    3% of each other, and both better than the base. The training losses differ more, and are only
    reported: the eliminated run's is computed by a forward in which 60% of the tokens skip the later
    layers' attention.

    The scorer is held to its block recall against the exact softmax attention mass (the blocks the
    exact mass would keep that the scorer keeps too) and to its mass coverage (the mass its blocks
    receive over the best possible). On this model attention is diffuse: middle blocks receive
    nearly equal mass (5-7% each), the ranking is mostly set by how many queries see a block, and the
    exact top-k swaps near-ties from batch to batch, so recall sits near 0.9 whatever picks the blocks,
    while coverage is above 0.98. Measured: the scorer 0.884 and 0.986, LeMo's own block scores from the
    full queries and keys 0.897 and 0.992, the earliest blocks 0.893 and 0.991. Recall is asserted at
    0.85 and within 0.05 of LeMo's block scores, coverage at 0.97. At 80 steps, measured: held-out ratio
    1.015, recall 0.888 (LeMo's 0.915), coverage 0.984. (Pretraining shorter does not hold: at 200 steps
    the coverage falls to 0.93.)"""
    result = run(Setting(steps=80))
    dense, eliminated, scorer = result["dense"], result["eliminated"], result["scorer"]
    print(f"base held-out {result['base_held_out']:.4f}; dense: final {dense['final']:.4f}, held-out "
          f"{dense['held_out']:.4f}; eliminated: final {eliminated['final']:.4f}, held-out "
          f"{eliminated['held_out']:.4f}; ratios: final {result['final_ratio']:.4f}, held-out "
          f"{result['held_out_ratio']:.4f}")
    for rule in ("", "lemo_", "earliest_"):
        print(f"{rule or 'scorer_'}: per layer {scorer['layers']}: recall {scorer[rule + 'recall']}, coverage "
              f"{scorer[rule + 'coverage']}")
    assert result["held_out_ratio"] <= 1.03, result["held_out_ratio"]
    assert max(dense["held_out"], eliminated["held_out"]) < result["base_held_out"] - 0.1
    assert eliminated["losses"][-1] < eliminated["losses"][0]
    assert scorer["mean_recall"] >= 0.85 and scorer["mean_coverage"] >= 0.97, scorer
    assert scorer["mean_recall"] >= scorer["mean_lemo_recall"] - 0.05, scorer
