"""Conformance testers: transformers' own ModelTesterMixin and ConfigTester on tiny MoE models of each family.

Not collected by the default `pytest` run (the file name does not start with `test_`); run it through
`python -m tests.conformance` (see `__main__.py`), which runs every family twice in fresh processes:
`MOEPLUG_CONFORMANCE_MODE=eager` (unpatched, eager experts) and `=patched` (every model built by the tests
passed to `moeplug.patch_model`; see `seam.py`). Running it by hand:

    MOEPLUG_CONFORMANCE_MODE=patched python -m pytest tests/conformance/families.py::MixtralConformance

The mixins come from transformers' sdist, fetched at run time into `.cache/` (see `sdist.py`). The tester
classes below are ours: tiny configs from `moeplug.tiny` with an MoE block in every layer.

The sdist lacks transformers' GenerationTesterMixin and ExportTesterMixin (see `sdist.py`), so
`MoEPlugChecks` adds a few checks of our own for what those would have covered and users rely on:
greedy generation with the dynamic and the static cache, `torch.compile(fullgraph=True)`, export
through transformers' own `DynamoExporter` with static and dynamic shapes, and (issue 15) pickling the
whole model with `torch.save` and `copy.deepcopy`. They run in both modes, like the
mixins' tests, so a regression is a test that passes unpatched and fails patched.
"""

from __future__ import annotations

import importlib
import unittest

import torch

from moeplug.hf import SUPPORTED_FAMILIES
from moeplug.tiny import tiny_config
from tests.conformance import sdist, seam

sdist.activate()
MODE = seam.install(SUPPORTED_FAMILIES)

from hf_common_tests.test_configuration_common import ConfigTester  # noqa: E402
from hf_common_tests.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask  # noqa: E402

# On top of moeplug.tiny's configs: an MoE block in every layer (transformers' default for the others).
EVERY_LAYER_MOE = {
    "deepseek_v3": dict(first_k_dense_replace=0),
    "qwen2_moe": dict(decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen3_moe": dict(decoder_sparse_step=1, mlp_only_layers=[]),
}


def model_classes(family: str) -> tuple[type, ...]:
    """Every public model class of the family (base model and heads), as transformers exports them."""
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    classes = [getattr(module, name) for name in module.__all__ if not name.endswith("PreTrainedModel")]
    return tuple(cls for cls in classes if isinstance(cls, type))


class MoEFamilyModelTester:
    """What ModelTesterMixin asks of a model tester, for one family's tiny config."""

    def __init__(self, parent: unittest.TestCase, family: str, batch_size: int = 2, seq_length: int = 7,
                 is_training: bool = True):
        self.parent, self.family = parent, family
        self.batch_size, self.seq_length, self.is_training = batch_size, seq_length, is_training
        config = self.get_config()
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size
        self.num_hidden_layers = config.num_hidden_layers
        self.num_attention_heads = config.num_attention_heads
        self.pad_token_id = config.pad_token_id

    def get_config(self):
        return tiny_config(self.family, **EVERY_LAYER_MOE.get(self.family, {}))

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        return config, {"input_ids": input_ids, "attention_mask": attention_mask}


class MoEPlugChecks:
    """Our own checks for what the sdist's missing generation/export mixins would have covered."""

    def _causal_lm(self, compile_friendly: bool = False):
        """The family's causal LM (patched by the seam in patched mode).

        For compile/export checks the unpatched baseline uses transformers' `batched_mm` experts, which is
        what a user who compiles or exports picks (its eager experts loop over the experts that were hit,
        a data-dependent loop that fullgraph compile and export cannot trace).
        """
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        torch.manual_seed(0)
        model = self._torch_compile_train_cls(config).eval()
        if compile_friendly and seam.mode() == "eager":
            model.set_experts_implementation("batched_mm")
        return model

    def _prompt(self, batch_size=2, seq_length=6):
        generator = torch.Generator().manual_seed(1)
        return torch.randint(3, self.model_tester.vocab_size, (batch_size, seq_length), generator=generator)

    def test_moeplug_generate_matches_forward(self):
        """Greedy generation with the (dynamic) KV cache picks the argmax of full no-cache forwards."""
        model, ids = self._causal_lm(), self._prompt()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=0)
        expected = ids
        with torch.no_grad():
            for _ in range(4):
                logits = model(expected, use_cache=False).logits[:, -1]
                expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], dim=1)
        self.assertEqual(out.tolist(), expected.tolist())

    def test_moeplug_generate_static_cache_matches_dynamic(self):
        """`generate(cache_implementation="static")` gives the tokens of the dynamic cache."""
        model, ids = self._causal_lm(), self._prompt()
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
        dynamic = model.generate(ids, **kwargs)
        static = model.generate(ids, cache_implementation="static", **kwargs)
        self.assertEqual(static.tolist(), dynamic.tolist())

    def test_moeplug_compile_fullgraph_matches_eager(self):
        """`torch.compile(fullgraph=True)` traces the whole forward (AOT autograd, no C++ build) and matches."""
        model, ids = self._causal_lm(compile_friendly=True), self._prompt()
        torch._dynamo.reset()
        with torch.no_grad():
            eager = model(ids, use_cache=False).logits
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(ids, use_cache=False).logits
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)  # same fp32 ops, reordered at most

    def _check_export(self, dynamic: bool):
        from transformers.exporters.configs import DynamoConfig
        from transformers.exporters.exporter_dynamo import DynamoExporter

        model, ids = self._causal_lm(compile_friendly=True), self._prompt()
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad():
            eager = model(**inputs).logits
        exported = DynamoExporter().export(model, inputs, config=DynamoConfig(dynamic=dynamic))
        with torch.no_grad():
            got = exported(**inputs)
        logits = got["logits"] if isinstance(got, dict) else got.logits
        torch.testing.assert_close(logits, eager, rtol=1e-5, atol=1e-5)  # same fp32 ops

    def _loss_and_logits(self, model, ids):
        with torch.no_grad():
            out = model(ids, labels=ids, use_cache=False)
        return out.loss, out.logits

    def test_moeplug_torch_save_whole_model(self):
        """`torch.save(model)` / `torch.load` (pickling the module, as some trainers and users do) round-trips."""
        import io

        model, ids = self._causal_lm(), self._prompt()
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        for got, expected in zip(self._loss_and_logits(loaded, ids), self._loss_and_logits(model, ids)):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)  # same weights, same ops, same process

    def test_moeplug_deepcopy(self):
        """`copy.deepcopy(model)` (reference models, EMA copies) computes what the original computes."""
        import copy

        model, ids = self._causal_lm(), self._prompt()
        clone = copy.deepcopy(model)
        for got, expected in zip(self._loss_and_logits(clone, ids), self._loss_and_logits(model, ids)):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)  # same weights, same ops, same process

    def test_moeplug_export_static(self):
        self._check_export(dynamic=False)

    def test_moeplug_export_dynamic(self):
        self._check_export(dynamic=True)


class _FamilyConformance(MoEPlugChecks, ModelTesterMixin):
    family: str = ""
    # An expert that no token chooses gets no gradient: the check "every parameter has a gradient" does not
    # apply to MoE models (transformers' own MoE testers turn it off too).
    test_all_params_have_gradient = False

    @property
    def all_model_classes(self):
        return model_classes(self.family)

    @property
    def _torch_compile_train_cls(self):
        return next(cls for cls in self.all_model_classes if cls.__name__.endswith("ForCausalLM"))

    def setUp(self):
        self.model_tester = MoEFamilyModelTester(self, self.family)
        self.config_tester = ConfigTester(self, config_class=type(self.model_tester.get_config()), hidden_size=37)

    def test_generation_tester_mixin_inheritance(self):
        self.skipTest("transformers' GenerationTesterMixin is not in its sdist; MoEPlugChecks covers generation")

    def test_config(self):
        self.config_tester.run_common_tests()


class MixtralConformance(_FamilyConformance, unittest.TestCase):
    family = "mixtral"


class Qwen2MoeConformance(_FamilyConformance, unittest.TestCase):
    family = "qwen2_moe"


class Qwen3MoeConformance(_FamilyConformance, unittest.TestCase):
    family = "qwen3_moe"


class OlmoeConformance(_FamilyConformance, unittest.TestCase):
    family = "olmoe"


class DeepseekV3Conformance(_FamilyConformance, unittest.TestCase):
    family = "deepseek_v3"


class GptOssConformance(_FamilyConformance, unittest.TestCase):
    family = "gpt_oss"


TESTERS = {cls.family: cls for cls in _FamilyConformance.__subclasses__()}
assert set(TESTERS) == set(SUPPORTED_FAMILIES), "one tester class per supported family"
