"""The transformers zoo as data: one tiny, valid config per registered model type of the training tasks.

    python -m optimem.estimators.zoo            # regenerate estimators/configs/zoo/ for the installed transformers
    python -m optimem.estimators.zoo --check    # say whether the stored zoo was made for the installed version

Each type's config is made by one generic rule, :func:`tiny_config`: transformers' own test rule for a tiny model
(``tests/causal_lm_tester.py``: ``CausalLMModelTester.get_config`` passes the tester's sizes -- :data:`TESTER_SIZES`
-- to every config ``__init__`` argument of the same name and keeps the class's defaults for the rest), applied to
the config class and to each of its sub-configs (``text_config``, ``vision_config``, ...), with the same sizes under
the class's other names (:data:`ALIASES`, ``attribute_map``) and one alignment (:data:`ALIGNED`). It is a rule, not a
per-type tester: the per-type ``ModelTester`` subclasses override some sizes (MLA ranks, expert counts) that this
rule leaves at the class default. A type whose rule-made config builds no model (or one over
:data:`MAX_ZOO_PARAMS` parameters) is made again by the rule's second pass (:mod:`optimem.estimators.zoo_rules`:
the class's refusals answered, generic sizes for the names the tester misses, its own tester's sizes where the
generic ones cannot work); a type neither pass builds keeps its build error in the index (``index.json``:
``types[type]["build"][task]``).

The index pins the transformers version the zoo was made for; :func:`zoo_types` lists a task's types,
:func:`zoo_config_path` gives a type's config file (any config path works as ``--model``).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
import inspect
from pathlib import Path
from .catalog import resolve
from .errors import UserError
from .inventory import instantiate
from .params import TASK_CLASSES
from .zoo_rules import (TESTER_OVERRIDES, answer_refusal, chosen_defaults, integral_sizes, second_pass_sizes,
                        rope_per_layer_type, token_ids_in_vocab, widths_to_text)

ZOO_DIR = Path(__file__).with_name("configs") / "zoo"
TASK_MAPPINGS = {
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "masked-lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "seq2seq-lm": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "sequence-classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "image-text-to-text": "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
}
"""The zoo's tasks and the transformers Auto mapping that registers each one's model types."""
TASK_AUTO = {"causal-lm": "AutoModelForCausalLM", "masked-lm": "AutoModelForMaskedLM",
             "seq2seq-lm": "AutoModelForSeq2SeqLM", "sequence-classification": "AutoModelForSequenceClassification",
             "image-text-to-text": "AutoModelForImageTextToText"}
TESTER_SIZES = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
    intermediate_size=37, hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    max_position_embeddings=512, type_vocab_size=16, initializer_range=0.02, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, head_dim=16, moe_intermediate_size=12, shared_expert_intermediate_size=36,
    num_experts_per_tok=2, num_experts=8, mamba_n_groups=1, mamba_n_heads=16, mamba_d_state=16, mamba_d_conv=4,
    mamba_expand=2, mamba_chunk_size=16, expert_interval=1, is_decoder=False)
"""``CausalLMModelTester.__init__``'s defaults in huggingface/transformers ``tests/causal_lm_tester.py`` (the
attributes its ``get_config`` passes by name; ``head_dim`` is its ``hidden_size // num_attention_heads``)."""
ALIGNED = {"intermediate_size": 40, "rotary_dim": 4}
"""Where the rule departs from the tester: its odd ``intermediate_size`` 37 rounded up to a multiple of 8, since
torch's ``grouped_mm`` (the routed experts of most MoE types) needs 16-byte row strides on the CPU -- 37 fp32 values
are 148 bytes, and such a model fails on its own in the first forward -- and ``rotary_dim`` 4, the per-type testers'
value for the types that name it (CodeGen, GPT-J: the class default 64 is more than a tiny head has)."""
FORCED = ("pad_token_id",)
"""``CausalLMModelTester.forced_config_args``: passed even where the config's signature does not name them."""


def _config_fields(cls) -> set[str]:
    return {k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "kwargs")}


RETRIES = 6
"""How many tester sizes the rule gives up, one at a time, when the config class refuses them (see
:func:`tiny_config`)."""


def _build(cls, kwargs: dict, second: bool = False):
    """``cls(**kwargs)``; when the class's validation refuses, ``kwargs`` changed and built again, at most
    :data:`RETRIES` times; then what the class raises is raised. The first pass gives back the size the message
    names (else the last one passed) to the class default; the second (``second``) answers the refusal as
    :func:`optimem.estimators.zoo_rules.answer_refusal` says."""
    fields = _config_fields(cls)
    for attempt in range(RETRIES * (2 if second else 1) + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return cls(**kwargs)
        except Exception as exc:  # noqa: BLE001 - a validator refused a size: answer it and retry
            if attempt == RETRIES * (2 if second else 1) or not kwargs:
                raise
            text = " ".join(str(exc).split())
            if second:
                if not answer_refusal(kwargs, text, fields):
                    raise
                continue
            named = [k for k in kwargs if k in text]
            kwargs.pop(max(named, key=len) if named else list(kwargs)[-1])
    raise AssertionError("unreachable")


def _config_class(model_type: str, cls):
    """The class the zoo makes ``model_type``'s config of: its own, or -- for a type whose causal-LM class takes
    one of its own class's sub-configs and that no other zoo task registers (MusicGen's ``MusicgenForCausalLM`` is
    its decoder, ``MusicgenDecoderConfig``; ``MusicgenConfig`` is the text-to-audio composite) -- that class."""
    import transformers  # lazy: pulls in transformers, yaml, which importing this module does not
    from transformers.models.auto import modeling_auto  # lazy: pulls in torch, transformers

    causal = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    other = any(model_type in getattr(modeling_auto, m) for t, m in TASK_MAPPINGS.items() if t != "causal-lm")
    causal_cls = getattr(transformers, causal, None) if causal else None
    own = getattr(causal_cls, "config_class", None)
    subs = (getattr(cls, "sub_configs", None) or {}).values()
    if own is None or own not in subs or other or getattr(own, "model_type", None) not in transformers.CONFIG_MAPPING:
        return cls
    return own


def tiny_config(model_type: str, second: bool = False) -> dict:
    """The rule-made tiny config of ``model_type`` as a dict (``to_dict()`` of the built config). When the config
    class's validation refuses the tester's sizes, the config is built again as :func:`_build` says. ``second``:
    the rule's second pass (:mod:`optimem.estimators.zoo_rules`), for a type whose first-pass config builds no
    model: the type's own tester sizes (:data:`~optimem.estimators.zoo_rules.TESTER_OVERRIDES`) and refusals
    answered, in sub-configs too. The causal-LM class (``architectures``) is set when the type has one, so that
    the default task (``causal-lm``: the config's architecture) builds it."""
    from transformers import CONFIG_MAPPING  # lazy: pulls in torch, transformers, which importing this module does not
    # lazy: pulls in torch, transformers, which importing this module does not
    from transformers.models.auto import modeling_auto

    own = CONFIG_MAPPING[model_type]
    cls = _config_class(model_type, own)
    config = _build(cls, _tiny_kwargs(cls, second), second)
    out = token_ids_in_vocab(chosen_defaults(integral_sizes(config.to_dict())), TESTER_SIZES["pad_token_id"])
    if second:
        out = rope_per_layer_type(out, getattr(cls, "default_theta", None))
    out["model_type"] = model_type if cls is own else cls.model_type
    if out.get("is_encoder_decoder") and out.get("decoder_start_token_id") is None:
        out["decoder_start_token_id"] = TESTER_SIZES["pad_token_id"]  # as the encoder-decoder testers pass (T5's: 0)
    for k in ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
        out.pop(k, None)
    causal = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    import transformers  # lazy: pulls in transformers, yaml, which importing this module does not

    causal_cls = getattr(transformers, causal, None) if causal else None
    if causal_cls is not None and getattr(causal_cls, "config_class", None) is cls:  # else the Auto class picks
        out["architectures"] = [causal]
    return out


ALIASES = {
    "hidden_size": ("d_model", "n_embd"),
    "num_hidden_layers": ("encoder_layers", "decoder_layers", "num_decoder_layers", "num_layers", "n_layer", "n_layers"),
    "num_attention_heads": ("encoder_attention_heads", "decoder_attention_heads", "num_heads", "n_head", "n_heads"),
    "intermediate_size": ("encoder_ffn_dim", "decoder_ffn_dim", "ffn_dim", "d_ff", "n_inner"),
    "max_position_embeddings": ("n_positions", "max_seq_len"),
}
"""The tester's sizes under the other names config classes give them (GPT-2-style ``n_embd``/``n_layer``, an
encoder-decoder's per-side ``encoder_layers``/``decoder_layers``), used where the class's ``attribute_map`` does not
already point the standard name at its own field."""
MAX_ZOO_PARAMS = 40_000_000
"""A rule-made config with more parameters than this is not trained in the zoo run (the class keeps a large size
under a name the rule does not know; its fp32 AdamW step would not fit the shared CPU machine)."""


def _tiny_kwargs(cls, second: bool = False) -> dict:
    fields = _config_fields(cls)
    amap = dict(getattr(cls, "attribute_map", None) or {})
    kwargs = {}
    for k, v in {**TESTER_SIZES, **ALIGNED}.items():
        target = amap.get(k, k)
        if target in fields or k in FORCED:
            kwargs[target] = v
        for alias in ALIASES.get(k, ()):
            if alias in fields and alias not in kwargs:
                kwargs[alias] = v
    subs = getattr(cls, "sub_configs", None) or {}
    base = None
    if any(getattr(sub, "__name__", "") == "AutoConfig" for sub in subs.values()):
        try:  # an AutoConfig sub-config: its class is the one the composite's defaults hold
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                base = cls()
        except Exception:  # noqa: BLE001
            base = None
    for name, sub in subs.items():
        sub_cls = sub if isinstance(sub, type) else None
        if getattr(sub_cls, "__name__", "") == "AutoConfig":
            sub_cls = type(getattr(base, name)) if getattr(base, name, None) is not None else None
            spec = (getattr(cls, "sub_configs_defaults", None) or {}).get(name)
            if sub_cls is None and second and getattr(spec, "model_type", None):  # the defaults build nothing:
                from transformers import CONFIG_MAPPING  # lazy: pulls in torch, transformers  # the class's spec
                sub_cls = CONFIG_MAPPING[spec.model_type] if spec.model_type in CONFIG_MAPPING else None
        if sub_cls is None or not getattr(sub_cls, "model_type", None) or name not in fields:
            continue
        try:
            if second:
                kwargs[name] = _build(sub_cls, _tiny_kwargs(sub_cls, True), True).to_dict()
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    kwargs[name] = sub_cls(**_tiny_kwargs(sub_cls)).to_dict()
        except Exception:  # noqa: BLE001 - a sub-config the rule cannot shrink keeps its defaults
            pass
    if second:
        kwargs.update(second_pass_sizes(dict(inspect.signature(cls.__init__).parameters), kwargs))
        kwargs = widths_to_text(kwargs)
    kwargs.update(TESTER_OVERRIDES.get(getattr(cls, "model_type", None), {}))
    return kwargs


def registered_types(task: str) -> list[str]:
    """The model types transformers registers for ``task`` (its Auto mapping), sorted."""
    # lazy: pulls in torch, transformers, which importing this module does not
    from transformers.models.auto import modeling_auto

    return sorted(getattr(modeling_auto, TASK_MAPPINGS[task]))


def _build_error(path: Path, task: str) -> str | None:
    """None when the model of ``task`` builds on the meta device from the config at ``path`` with at most
    :data:`MAX_ZOO_PARAMS` parameters, else why not."""
    try:
        model = instantiate(resolve(str(path)), device="meta", task=None if task == "causal-lm" else task)
    except UserError as exc:
        return str(exc).replace(str(path), path.name)  # the same index from any checkout
    except Exception as exc:  # noqa: BLE001 - one line per type, never a traceback
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    n = sum(p.numel() for p in model.parameters())
    if n > MAX_ZOO_PARAMS:
        return f"the rule's config has {n:,} parameters (over {MAX_ZOO_PARAMS:,}: a size it leaves at the class default)"
    return None


def generate(out_dir: Path = ZOO_DIR, tasks=tuple(TASK_MAPPINGS)) -> dict:
    """Write every task's types' configs and ``index.json`` into ``out_dir``; return the index."""
    import transformers  # lazy: pulls in transformers, yaml, which importing this module does not


    out_dir.mkdir(parents=True, exist_ok=True)
    index: dict = {"transformers": transformers.__version__, "rule": "CausalLMModelTester sizes by name "
                   "(optimem.estimators.zoo.tiny_config), second pass optimem.estimators.zoo_rules", "tasks": {},
                   "types": {}}
    by_type: dict[str, list[str]] = {}
    for task in tasks:
        index["tasks"][task] = registered_types(task)
        for t in index["tasks"][task]:
            by_type.setdefault(t, []).append(task)
    for t, its in by_type.items():
        entry = index["types"][t] = {"config": None, "error": None, "build": {}}
        best = None
        for second in (False, True):  # the second pass only for a type whose first-pass config builds no model
            try:
                cfg = tiny_config(t, second)
            except Exception as exc:  # noqa: BLE001
                error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
                best = best or (None, error, {})
                continue
            path = out_dir / f"{t}.json"
            path.write_text(json.dumps(cfg, indent=1, sort_keys=True, default=str) + "\n")
            build = {task: _build_error(path, task) if task in TASK_CLASSES else
                     f"task {task} is not one optimem builds (--task takes {', '.join(TASK_CLASSES)})" for task in its}
            failing = sum(1 for task in its if task in TASK_CLASSES and build[task])
            if best is None or best[0] is None or failing < best[3]:
                best = (cfg, None, build, failing)
            if not failing:
                break
        cfg, error, build = best[:3]
        if cfg is not None:
            (out_dir / f"{t}.json").write_text(json.dumps(cfg, indent=1, sort_keys=True, default=str) + "\n")
            entry["config"], entry["build"] = f"{t}.json", build
        else:
            entry["error"] = error
    (out_dir / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return index


def load_index(zoo_dir: Path = ZOO_DIR) -> dict:
    """The stored zoo index (see :func:`generate`)."""
    return json.loads((zoo_dir / "index.json").read_text())


def zoo_types(task: str, zoo_dir: Path = ZOO_DIR) -> list[str]:
    """The model types of ``task`` in the stored zoo."""
    return list(load_index(zoo_dir)["tasks"].get(task, []))


def zoo_config_path(model_type: str, zoo_dir: Path = ZOO_DIR) -> Path | None:
    """The stored config file of ``model_type`` (None: the rule could not make one)."""
    entry = load_index(zoo_dir)["types"].get(model_type) or {}
    return zoo_dir / entry["config"] if entry.get("config") else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m optimem.estimators.zoo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ZOO_DIR), help="where to write the zoo (default: the bundled one)")
    p.add_argument("--check", action="store_true", help="only compare the stored zoo's transformers version")
    args = p.parse_args(argv)
    import transformers  # lazy: pulls in transformers, yaml, which importing this module does not

    if args.check:
        made = load_index(Path(args.out))["transformers"]
        print(f"zoo made for transformers {made}; installed {transformers.__version__}")
        return 0 if made == transformers.__version__ else 1
    index = generate(Path(args.out))
    n_ok = sum(1 for e in index["types"].values() if e["config"])
    print(f"{n_ok} of {len(index['types'])} types have a tiny config (transformers {index['transformers']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
