

@pytest.mark.parametrize("quant", [None, "w8a16"])
@pytest.mark.parametrize("head", [Head.classifier(SEQUENCE, LABELS), Head.classifier(TOKEN, LABELS)], ids=["sequence", "token"])
def test_schema_rows_of_the_head_are_what_the_module_creates(head, quant):
    """The score rows (and only they) join the decoder's: float under int8, with the schema's shapes and axes."""
    import jax
    from flax.traverse_util import flatten_dict

    from gemma_jax.models import family_of

    config = GemmaConfig(model_type="gemma2", vocab_size=32, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1,
                         head_dim=8, mlp_dim=24, query_pre_attn_scalar=8, head=head)  # fmt: skip
    family = family_of(config)
    shapes = flatten_dict(jax.eval_shape(lambda: family.init_params(config, jax.random.PRNGKey(0), quant=quant)))
    axes = flatten_dict(family.param_axes(config, quant))
    specs = {s.path: s for s in family.tensor_specs(config).values() if s.path[0] == "score"}
    assert set(specs) == {p for p in shapes if p[0] == "score"} == {("score", "w")} | ({("score", "b")} if head.bias else set())
    for path, spec in specs.items():
        assert (tuple(shapes[path].shape), shapes[path].dtype, axes[path]) == (spec.shape, np.float32, spec.param.axes)
        assert family.logical_axes(path) == spec.param.axes and spec.gguf_name is None
    assert specs[("score", "w")].hf_name == "score.weight" and specs[("score", "w")].shape == (3, 16)
