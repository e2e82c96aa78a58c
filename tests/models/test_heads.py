"""Embeddings and heads can be adapted (factored lookup / tied head) or trained (modules_to_save)."""

import jax
import jax.numpy as jnp
import optax

import lorax_variants as lv
from lorax_variants import hf
from tests import hf_models as H
from tests.close import assert_close


def test_adapted_tied_embedding_factored_equals_merged(tmp_path):
    H.build("qwen2_bias", tmp_path)  # tied head: logits = h · embedᵀ
    model, params = hf.from_pretrained(tmp_path)
    spec = lv.AdapterSpec(targets=r"embed|layers/attn/q_proj", stacked=model.stacked, r=4)
    adapted = jax.tree.map(lambda n: n.replace(lora_b=n.lora_b + 0.1) if isinstance(n, lv.LoraNode) else n,
                           lv.adapt(params, spec, 0), is_leaf=lambda n: isinstance(n, lv.LoraNode))
    ids = jnp.asarray(H.inputs(96, 0)[0])
    assert_close(model.apply(adapted, ids), model.apply(lv.merge(adapted), ids), 2e-4)
    # The factored path never forms the [vocab, d] delta.
    jaxpr = jax.make_jaxpr(lambda t: model.apply(t, ids))(adapted)
    assert not [e for e in jaxpr.eqns for v in e.outvars if v.aval.shape in ((96, 32), (32, 96)) and e.primitive.name == "dot_general"]


def test_classification_head_trains_with_frozen_encoder(tmp_path):
    H.build("roberta_cls", tmp_path)
    model, params = hf.from_pretrained(tmp_path)
    spec = lv.AdapterSpec(targets=r"layers/attn/(query|value)", stacked=model.stacked, r=4)
    trainable, frozen = lv.split(lv.adapt(params, spec, 0), extra=r"head/.*")
    assert set(trainable["head"]) == {"dense", "dense_bias", "out_proj", "out_proj_bias"}
    ids, mask = (jnp.asarray(a) for a in H.inputs(96, 1, batch=3))
    labels = jnp.array([0, 1, 1])
    opt = optax.adam(1e-2)
    state = opt.init(trainable)

    @jax.jit
    def step(t, s):
        def loss_fn(t):
            logits = model.apply(lv.combine(t, frozen), ids, mask)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, g = jax.value_and_grad(loss_fn)(t)
        u, s = opt.update(g, s, t)
        return optax.apply_updates(t, u), s, loss

    losses = []
    for _ in range(30):
        trainable, state, loss = step(trainable, state)
        losses.append(float(loss))
    assert losses[-1] < 0.2 * losses[0]
