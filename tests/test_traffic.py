"""bench.traffic counts what a compiled step reads and writes; with it, each clipper's
ordinary step moves no more bytes than its hand-fused reference (the references issue 10's
step-time targets are measured against), on XLA:CPU's compiled HLO of a small tree."""

import contextlib

import jax
import optax
import pytest

from bench import clippers, gn_probe, traffic
from bench.run import train_step
from bench.trees import TREES, abstract_tree, tree_bytes
from optclip.norms import SMALL_LEAF

ON_CPU = jax.default_backend() == "cpu"

# A module written by hand: f32[1000] is 4,000 bytes, f32[10] 40.
_HLO = """\
HloModule m

%fused_gather (p0: f32[1000], p1: s32[10,1]) -> f32[10] {
  %p0 = f32[1000]{0} parameter(0)
  %p1 = s32[10,1]{1,0} parameter(1)
  %neg = f32[1000]{0} negate(%p0)
  ROOT %g = f32[10]{0} gather(%neg, %p1), offset_dims={}
}

%fused_halves (r0: f32[1000]) -> f32[500] {
  %r0 = f32[1000]{0} parameter(0)
  %lo = f32[500]{0} slice(%r0), slice={[0:500]}
  %hi = f32[500]{0} slice(%r0), slice={[500:1000]}
  ROOT %h = f32[500]{0} add(%lo, %hi)
}

%fused_sum (q0: f32[1000]) -> f32[] {
  %q0 = f32[1000]{0} parameter(0)
  %z = f32[] constant(0)
  ROOT %r = f32[] reduce(%q0, %z), dimensions={0}, to_apply=%add
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%cheap (t0: (f32[1000])) -> f32[] {
  %t0 = (f32[1000]{0}) parameter(0)
  ROOT %c = f32[] constant(0)
}

%dear (t1: (f32[1000])) -> f32[] {
  %t1 = (f32[1000]{0}) parameter(0)
  %x = f32[1000]{0} get-tuple-element(%t1), index=0
  ROOT %f = f32[] fusion(%x), kind=kInput, calls=%fused_sum
}

ENTRY %main (x: f32[1000], i: s32[10,1], k: s32[]) -> f32[10] {
  %x = f32[1000]{0} parameter(0)
  %i = s32[10,1]{1,0} parameter(1)
  %k = s32[] parameter(2)
  %s = f32[] fusion(%x), kind=kInput, calls=%fused_sum
  %t = (f32[1000]{0}) tuple(%x)
  %c = f32[] conditional(%k, %t, %t), branch_computations={%cheap, %dear}
  %h = f32[500]{0} fusion(%x), kind=kLoop, calls=%fused_halves
  ROOT %g = f32[10]{0} fusion(%x, %i), kind=kLoop, calls=%fused_gather
}
"""


def test_traffic_counts_reads_writes_gathers_and_branches_by_hand():
    c = traffic.cost(traffic.parse(_HLO))
    # the sum: reads x (4,000), writes a scalar (4); the halves: read both halves of x
    # (4,000: two uses of 500 elements each), write 2,000; the gather: reads 10 of x's
    # elements (40, not 4,000) and its 10 indices (40), writes 40; the tuple moves nothing
    assert c.bytes == 4000 + 4 + 4000 + 2000 + 40 + 40 + 40
    [(name, branches)] = c.conds
    assert name == "c" and [b.bytes for b in branches] == [0, 4004]
    assert c.ordinary() == c.bytes  # the cheap branch
    assert c.ordinary(guard=True) == c.bytes + 4004  # a guard's step: the dear one


# (chain, its hand-fused reference, trees over it allowed beside the small leaves'
# concatenation below; a tree is the tree's float32 bytes)
PAIRS = [("gn", "fused", 0.01), ("value", "value_fused", 0.01), ("agc", "agc_fused", 0.01),
         ("leaf", "fused_leaf", 0.01),
         # clippy's reference with the one stat that reads the update again, its norm, taken
         # in the same pass as the ratios' min: one variadic reduction a leaf, along rows
         # (19 trees and 300% temp when clippy took them by two reductions, the norm's with
         # an overflow rescue behind a lax.cond; 14 and 100% since)
         ("clippy", "clippy_fused_onepass", 0.01)]
_VARIANTS = {**gn_probe.variants(),
             "fused_leaf": (lambda: optax.chain(clippers.fused_leaf_norm(1.0),
                                                clippers.adam()), False)}


SMALL = abstract_tree(TREES["small"]())


def _small_share(tree):
    """The share of the tree's bytes in leaves of at most ``norms.SMALL_LEAF`` elements,
    which optclip's norms concatenate once: read and written, twice that in trees."""
    small = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)
                if x.size <= SMALL_LEAF)
    return 2 * small / tree_bytes(tree)


def _compiled(name):
    """The donated train step of ``name`` (a ``gn_probe`` variant) on the small tree."""
    make, mode = _VARIANTS[name]
    tx = make()
    s = jax.eval_shape(tx.init, SMALL)
    with gn_probe.MODES[mode]() if mode else contextlib.nullcontext():
        return train_step(tx).lower(SMALL, s, SMALL).compile()


def _ordinary_trees(name, guard=False):
    return traffic.step_cost(_compiled(name)).ordinary(guard) / tree_bytes(SMALL)


@pytest.mark.skipif(not ON_CPU, reason="XLA:CPU's fusion decisions (the figures in "
                    "bench/results/cpu_traffic/)")
def test_adam_moves_ten_trees_on_xla_cpu():
    # each moment read with the gradient and written (3 + 3), the weights read with both
    # new moments and written (4): the count every chain below adds to
    assert _ordinary_trees("adam") == pytest.approx(10, abs=1e-3)


@pytest.mark.skipif(not ON_CPU, reason="XLA:CPU's fusion decisions")
@pytest.mark.parametrize("name,ref,slack", PAIRS)
def test_ordinary_step_moves_no_more_than_the_hand_fused_reference(name, ref, slack):
    mine, floor = _ordinary_trees(name), _ordinary_trees(ref)
    assert floor > 10.5  # the reference reads the gradients at least once more than adam
    assert mine <= floor + _small_share(SMALL) + slack, f"{name} {mine:.3f}, {ref} {floor:.3f}"


@pytest.mark.skipif(not ON_CPU, reason="XLA:CPU's fusion decisions")
def test_guard_moves_no_more_than_optax_apply_if_finite():
    mine = _ordinary_trees("skip_nonfinite", guard=True)
    optax_s = _ordinary_trees("apply_if_finite", guard=True)
    assert 12 < optax_s and mine <= optax_s + _small_share(SMALL) + 0.01, (mine, optax_s)


@pytest.mark.skipif(not ON_CPU, reason="checked against XLA:CPU's HLO")
@pytest.mark.parametrize("name", ["adam", "fused", "value_fused", "agc_fused"])
def test_traffic_agrees_with_xla_cost_analysis_where_nothing_is_gathered(name):
    # An independent count: XLA's own HloCostAnalysis ("bytes accessed"), which reads whole
    # operands; on steps with no conditional and no gather the two must agree.
    compiled = _compiled(name)
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    mine = traffic.step_cost(compiled)
    assert not mine.conds
    assert mine.ordinary() == pytest.approx(analysis["bytes accessed"], rel=1e-3)


@pytest.mark.skipif(not ON_CPU, reason="XLA:CPU's fusion decisions")
def test_traffic_sees_a_rescue_computed_on_every_step():
    # The check above can fail: the global-norm chain with its overflow rescue's lax.cond
    # replaced by both branches and a select (bench.gn_probe's gn_select) reads the
    # gradients twice more, for the rescue's max and its scaled sum.
    assert _ordinary_trees("gn_select") >= _ordinary_trees("gn") + 1.9
