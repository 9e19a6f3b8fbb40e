"""Named models: the real embedded ones, random shapes, quantized loading, parameter counting."""
from __future__ import annotations

import pytest
import torch

import adapters
from adapters.loading import ByteTokenizer
from adapters.models import MODELS, model_status, random_config, resolve_model


def test_smollm2_is_the_real_model(smollm2):
    """The converted cache holds the real SmolLM2: greedy decoding knows the capital of France."""
    tok = smollm2.tokenizer
    ids = torch.tensor([tok.encode("The capital of France is", add_special_tokens=False)])
    with torch.no_grad():
        out = smollm2.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                     do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:].tolist())
    assert (adapters.models.cache_dir() / "smollm2-135m" / "model.safetensors").exists()


def test_minilm_is_the_real_model():
    """The real all-MiniLM-L6-v2: related sentences embed closer than unrelated ones."""
    base = adapters.load_base_model("minilm-l6", task="sequence-classification", labels=["a", "b"])
    encoder = base.model.base_model

    def embed(text):
        enc = base.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = encoder(**enc).last_hidden_state
        return torch.nn.functional.normalize(hidden.mean(1), dim=-1)[0]

    cat, kitten, tax = embed("A cat sits on the mat."), embed("A kitten rests on a rug."), embed("Tax law changed.")
    assert cat @ kitten > cat @ tax + 0.2


def test_llama_1b_shape_is_published_one():
    from transformers import AutoModelForCausalLM

    config = random_config("llama-1b")
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (2048, 8192, 16)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (32, 8, 128256)
    assert config.tie_word_embeddings
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # Llama-3.2-1B has 1.236 B parameters.
    assert abs(adapters.count_parameters(model).total - 1_235_814_400) < 1_000


def test_llama_8b_shape_counts_8b_parameters():
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(random_config("llama-8b"))
    assert abs(adapters.count_parameters(model).total - 8_030_261_248) < 1_000


@pytest.mark.parametrize("quantization", ["nf4", "fp4", "int8"])
def test_quantized_load_keeps_the_logical_parameter_count(quantization):
    plain = adapters.load_base_model("random:tiny")
    quantized = adapters.load_base_model("random:tiny", quantization=quantization)
    assert adapters.count_parameters(quantized.model).total == adapters.count_parameters(plain.model).total
    kinds = {type(m).__name__ for m in quantized.model.modules()}
    assert {"nf4": "Linear4bit", "fp4": "Linear4bit", "int8": "Linear8bitLt"}[quantization] in kinds
    # Heads stay unquantized so probes and classifiers train in the compute dtype.
    assert type(quantized.model.lm_head) is torch.nn.Linear


def test_fingerprint_ignores_quantization_but_not_weights():
    none, nf4 = adapters.load_base_model("random:tiny"), adapters.load_base_model("random:tiny", quantization="nf4")
    assert none.fingerprint == nf4.fingerprint
    with torch.no_grad():
        none.model.get_input_embeddings().weight[0] += 1
    assert adapters.fingerprint(none.model) != nf4.fingerprint


def test_unknown_model_and_task_errors_name_the_input():
    with pytest.raises(adapters.AdaptersError, match="unknown model 'smollm3'.*smollm2-135m"):
        resolve_model("smollm3")
    with pytest.raises(adapters.AdaptersError, match="random:llama-1b"):
        resolve_model("random:llama-2b")
    with pytest.raises(adapters.AdaptersError, match="minilm-l6.*causal-lm"):
        adapters.load_base_model("minilm-l6", task="causal-lm")
    with pytest.raises(adapters.AdaptersError, match="quantization 'q3'"):
        adapters.load_base_model("random:tiny", quantization="q3")


def test_local_checkpoint_needing_remote_code_is_refused(tmp_path):
    base = adapters.load_base_model("random:tiny")
    base.model.config.auto_map = {"AutoModelForCausalLM": "evil.Model"}
    base.model.save_pretrained(tmp_path)
    with pytest.raises(adapters.AdaptersError, match="remote code"):
        adapters.load_base_model(str(tmp_path))


def test_models_listing_covers_every_name():
    rows = {r["name"]: r for r in model_status()}
    assert set(rows) == set(MODELS)
    assert rows["minilm-l6"]["available"] and rows["minilm-l6"]["tasks"] == ["sequence-classification"]
    assert {"random:llama-1b", "random:llama-8b", "random:smollm2-135m"} <= set(rows)


def test_byte_tokenizer_round_trips_text():
    tok = ByteTokenizer()
    ids = tok.encode("déjà vu")
    assert min(ids) > tok.eos_token_id and tok.decode(ids) == "déjà vu"
