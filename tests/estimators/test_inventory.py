"""The catalog and the parameter inventory, checked against published parameter counts."""
import json
import time

import pytest

from optimem.estimators import UserError, build_inventory, catalog, resolve

# Published parameter counts (model cards / the models' own num_parameters()).
PUBLISHED = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "bert-base-uncased": 109_514_298,  # BertForMaskedLM (the MLM head, no pooler)
    "google-t5/t5-3b": 2_851_598_336,
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "meta-llama/Meta-Llama-3-8B": 8_030_261_248,
    "meta-llama/Llama-3.1-8B": 8_030_261_248,  # the same shapes as Llama 3 8B; rope_scaling llama3, 128k positions
    "meta-llama/Llama-3.1-70B": 70_553_706_496,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "google/gemma-2b": 2_506_172_416,
    "Qwen/Qwen2.5-0.5B": 494_032_768,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_catalog_models_have_their_published_size(name):
    assert build_inventory(name).num_params == PUBLISHED[name]


def test_catalog_holds_the_required_models_and_tiny_defaults():
    assert set(PUBLISHED) | {"tiny-llama", "tiny-gpt2", "tiny-t5", "tiny-qwen2"} <= set(catalog())


@pytest.mark.parametrize("alias", ["Meta-Llama-3-8B", "meta-llama/meta-llama-3-8b", " META-LLAMA-3-8B "])
def test_names_accepted_with_or_without_org_prefix(alias):
    assert resolve(alias).name == "meta-llama/Meta-Llama-3-8B"


def test_config_path_and_directory(tmp_path):
    cfg = json.loads((resolve("tiny-llama").path).read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    by_dir = build_inventory(str(tmp_path))
    by_file = build_inventory(str(tmp_path / "config.json"))
    assert by_dir.num_params == by_file.num_params == build_inventory("tiny-llama").num_params


def test_tied_weights_count_once_and_are_recorded():
    inv = build_inventory("gpt2")
    names = [r.name for r in inv.rows]
    assert "lm_head.weight" not in names
    wte = next(r for r in inv.rows if r.name == "transformer.wte.weight")
    assert wte.tied == ("lm_head.weight",) and wte.module_kind == "embedding" and wte.in_embedding
    t5 = build_inventory("tiny-t5")
    shared = next(r for r in t5.rows if r.name == "shared.weight")
    assert set(shared.tied) == {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}


def test_untied_heads_stay_separate_on_the_meta_device():
    # Every meta tensor has data_ptr 0: deduplicating by data_ptr would collapse the whole model.
    inv = build_inventory("meta-llama/Meta-Llama-3-8B")
    names = {r.name for r in inv.rows}
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= names
    assert len(inv.rows) == 291


def test_module_kinds():
    kinds = {r.module_kind for r in build_inventory("gpt2").rows}
    assert {"conv1d", "embedding", "norm"} <= kinds and "linear" not in kinds
    llama = build_inventory("tiny-llama")
    q = next(r for r in llama.rows if r.name.endswith("self_attn.q_proj.weight"))
    assert q.module_kind == "linear" and q.shape == (64, 64) and q.module_class == "Linear"
    assert any(r.module_kind == "norm" for r in llama.rows)


def test_dtype_view_and_cache():
    inv = build_inventory("Qwen/Qwen2.5-0.5B")
    assert build_inventory("Qwen/Qwen2.5-0.5B") is inv
    bf16 = build_inventory("Qwen/Qwen2.5-0.5B", "bf16")
    assert bf16 is inv.with_dtype("bfloat16")
    assert sum(r.nbytes for r in bf16.rows) * 2 == sum(r.nbytes for r in inv.rows)


def test_70b_inventory_is_cached():
    build_inventory("meta-llama/Llama-3.1-70B")
    t0 = time.perf_counter()
    inv = build_inventory("meta-llama/Llama-3.1-70B", "bf16")
    assert time.perf_counter() - t0 < 0.05  # a cache hit, not a rebuild
    assert inv.num_params == PUBLISHED["meta-llama/Llama-3.1-70B"]


@pytest.mark.parametrize("content,needle", [
    ('{"hidden_size": 8}', "no 'model_type'"),
    ('{"model_type": "no-such-model"}', "not known to this transformers"),
    ('[1, 2', "is not valid JSON"),
    ('[1, 2]', "is not a transformers config"),
])
def test_bad_configs_raise_one_line_user_errors(tmp_path, content, needle):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(UserError) as err:
        build_inventory(str(path))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_unknown_model_lists_the_catalog():
    with pytest.raises(UserError) as err:
        resolve("llama-3-8b-instruct")
    assert "meta-llama/Meta-Llama-3-8B" in str(err.value) and "tiny-llama" in str(err.value)


def test_a_layernorm_subclass_is_exempt_from_weight_decay():
    """The Trainer's ``get_decay_parameter_names`` tests ``isinstance(module, nn.LayerNorm)``: GOT-OCR2's
    ``GotOcr2LayerNorm`` (whose ``layer_norm2`` names no pattern catches) is in the no-decay group, as the
    estimator's step model groups it."""
    from optimem.estimators.steps import decays
    from optimem.estimators.zoo import zoo_config_path

    inv = build_inventory(str(zoo_config_path("got_ocr2")), task="image-text-to-text")
    rows = [r for r in inv.rows if r.name.endswith("neck.layer_norm2.weight")]
    assert rows and rows[0].layer_norm and rows[0].module_class != "LayerNorm" and not decays(rows[0])
