import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lorax_variants as lv
from lorax_variants.tree import closest_paths, leaves_with_paths, path_str


def test_paths_over_dicts_lists_and_nodes():
    node = lv.LoraNode(weight=jnp.ones((3, 2)), lora_a=jnp.ones((3, 1)), lora_b=jnp.ones((1, 2)), scale=1.0)
    tree = {"blocks": [{"w": node}, {"w": jnp.zeros(2)}], "b": (jnp.ones(1),)}
    paths = [p for p, _ in leaves_with_paths(tree)]
    assert paths == ["b/0", "blocks/0/w/weight", "blocks/0/w/lora_a", "blocks/0/w/lora_b", "blocks/1/w"]
    whole = dict(leaves_with_paths(tree, nodes_are_leaves=True))
    assert whole["blocks/0/w"] is node


def test_path_str_of_dataclass_attribute():
    @dataclasses.dataclass
    class Box:
        inner: jax.Array

    jax.tree_util.register_dataclass(Box, data_fields=["inner"], meta_fields=[])
    (kp, _), = jax.tree_util.tree_flatten_with_path({"x": Box(jnp.ones(1))})[0]
    assert path_str(kp) == "x/inner"


def test_closest_paths_suggests_real_names():
    paths = ["layers/attn/q_proj", "layers/attn/k_proj", "layers/mlp/up_proj", "embed"]
    assert closest_paths(r"layers/attn/q_prj", paths)[0] == "layers/attn/q_proj"


# Random trees: nested dicts/lists of arrays, some leaves adapted.
shapes = st.tuples(st.integers(1, 6), st.integers(1, 6))
leaf_trees = st.recursive(
    shapes.map(lambda s: np.arange(np.prod(s), dtype=np.float32).reshape(s)),
    lambda children: st.one_of(
        st.dictionaries(st.sampled_from("abcde"), children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3),
    ),
    max_leaves=8,
)


@given(tree=leaf_trees, seed=st.integers(0, 2**16), extra=st.sampled_from([None, r"a/.*", r".*/0"]))
def test_combine_inverts_split(tree, seed, extra):
    adapted = lv.adapt(tree, lv.AdapterSpec(targets=".*", r=1), seed) if jax.tree.leaves(tree) else tree
    trainable, frozen = lv.split(adapted, extra=extra)
    # Disjoint: every leaf of the original is in exactly one of the two trees.
    none = lambda x: x is None  # noqa: E731
    t_leaves, f_leaves, o_leaves = (jax.tree.leaves(t, is_leaf=none) for t in (trainable, frozen, adapted))
    for a, b, o in zip(t_leaves, f_leaves, o_leaves, strict=True):
        assert (a is None and b is None) if o is None else ((a is None) != (b is None))
    back = lv.combine(trainable, frozen)
    assert jax.tree.structure(back) == jax.tree.structure(adapted)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(adapted)):
        assert x is y


def test_trainable_mask_marks_only_adapter_fields_and_named_leaves():
    tree = {"q": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}, "head": jnp.ones((4, 2))}
    adapted = lv.adapt(tree, lv.AdapterSpec(targets="q/kernel", r=2), 0)
    mask = dict(leaves_with_paths(lv.trainable_mask(adapted)))
    assert mask == {
        "head": False,
        "q/bias": False,
        "q/kernel/weight": False,
        "q/kernel/lora_a": True,
        "q/kernel/lora_b": True,
    }
    mask = dict(leaves_with_paths(lv.trainable_mask(adapted, extra=[r"head", r".*/bias"])))
    assert mask["head"] and mask["q/bias"] and not mask["q/kernel/weight"]


def test_split_rejects_mask_and_extra_together():
    tree = lv.adapt({"w": jnp.ones((2, 2))}, lv.AdapterSpec(targets="w", r=1), 0)
    with pytest.raises(ValueError, match="either mask or extra"):
        lv.split(tree, lv.trainable_mask(tree), extra="w")


def test_bad_regex_is_named():
    with pytest.raises(ValueError, match=r"trainable pattern '\(' is not a valid regular expression"):
        lv.trainable_mask({"w": jnp.ones(1)}, extra="(")
