"""MMFusionForConditionalGeneration (#17, part 1): both connections (cross-attention with GPT-2, BERT and BART
decoders; a prefix for Llama and GPT-2, with and without learned queries) train with a finite gradient on every
weight and generate; greedy generation is a manual argmax loop, one beam is greedy, the KV cache changes nothing, and
the encoder runs once per generate() call; the loss is the hand-computed cross-entropy over the non -100 positions;
neither the padding side nor batch partners change a row's loss, logits or tokens; save/load, AutoModel and
trust_remote_code give the same generations; bad settings raise ValueError naming the field; streamers see the
returned text."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModel,
    BartConfig,
    BertConfig,
    BertTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    TextIteratorStreamer,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.pytorch_utils import Conv1D

from conftest import FUSION_KWARGS, VOCAB, WITHOUT_PROJECT, make_batch, select_samples, tiny_fusion_config
from modeling_mm import MMFusionConfig, MMFusionForConditionalGeneration
from modeling_mm.modeling_mm import MMFusionQueryBlock

BOS, EOS, PAD = 2, 3, 0  # [CLS], [SEP], [PAD] of the test vocabulary
# A larger init than usual: at 0.02 a random LM with tied embeddings mostly repeats its last token, and greedy
# decoding would match a wrong implementation by chance.
SPECIAL = dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.2)
# every row lacks something or has all three, and every modality has a row
GAPS = {"has_image": [1, 1, 0, 1], "has_text": [1, 0, 1, 1], "has_audio": [0, 1, 1, 1]}
PROMPT_LENGTHS = (2, 1, 3, 2)  # bos included
TARGET_LENGTHS = (3, 2, 1, 4)  # eos excluded


def tiny_gpt2_config(width: int = 48) -> GPT2Config:
    return GPT2Config(vocab_size=len(VOCAB), n_embd=width, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, **SPECIAL)


def tiny_bert_decoder_config() -> BertConfig:
    return BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=37, max_position_embeddings=128, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **SPECIAL)


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **SPECIAL)


def tiny_bart_decoder_config() -> BartConfig:
    return BartConfig(vocab_size=len(VOCAB), d_model=32, decoder_layers=2, encoder_layers=1, decoder_attention_heads=4,
                      encoder_attention_heads=4, decoder_ffn_dim=37, encoder_ffn_dim=37, max_position_embeddings=128,
                      dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, init_std=0.2, bos_token_id=BOS,
                      eos_token_id=EOS, pad_token_id=PAD, decoder_start_token_id=BOS, forced_eos_token_id=None)


# connection, decoder config, num_query_tokens
CASES = {
    # GPT-2 48 wide, fusion 32: decoder_input_projection is a Linear
    "cross_attention-gpt2": ("cross_attention", tiny_gpt2_config, 0),
    # BERT 32 wide as the fusion: no projection; learned queries in cross-attention mode
    "cross_attention-bert": ("cross_attention", tiny_bert_decoder_config, 3),
    "prefix-llama": ("prefix", tiny_llama_config, 0),
    "prefix-llama-queries": ("prefix", tiny_llama_config, 4),
    "prefix-gpt2": ("prefix", tiny_gpt2_config, 0),
    "prefix-gpt2-queries": ("prefix", tiny_gpt2_config, 4),
}


def generation_config(case: str, modalities=("vision", "text", "audio"), **overrides) -> MMFusionConfig:
    connection, decoder, queries = CASES[case]
    return tiny_fusion_config(modalities, decoder_config=decoder(), decoder_connection=connection,
                              num_query_tokens=queries, **{"initializer_range": 0.1, **overrides})


def build(case: str, seed: int = 0, **overrides) -> MMFusionForConditionalGeneration:
    torch.manual_seed(seed)
    return MMFusionForConditionalGeneration(generation_config(case, **overrides)).eval()


def fusion_batch(batch_size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    batch = make_batch(batch_size, seed=seed)
    if batch_size == 4:
        batch.update({key: torch.tensor(value).bool() for key, value in GAPS.items()})
    return batch


def pad_rows(rows: list[list[int]], side: str, value: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids padded on `side` to the longest: (ids, attention mask)."""
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), value, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        columns = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
        ids[i, columns], mask[i, columns] = torch.tensor(row), 1
    return ids, mask


def decoder_rows(seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Per row: the prompt [bos, prompt tokens] and the target [target tokens, eos]."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(5, len(VOCAB), (n,), generator=generator).tolist()

    prompts = [[BOS, *tokens(n - 1)] for n in PROMPT_LENGTHS]
    targets = [[*tokens(n), EOS] for n in TARGET_LENGTHS]
    return prompts, targets


def decoder_batch(side: str = "right", seed: int = 0) -> dict[str, torch.Tensor]:
    """decoder_input_ids = [prompt, target, eos] per row, padded on `side`; labels -100 on the prompt and padding."""
    prompts, targets = decoder_rows(seed)
    ids, mask = pad_rows([p + t for p, t in zip(prompts, targets)], side)
    label_rows = [[-100] * len(p) + t for p, t in zip(prompts, targets)]
    labels, _ = pad_rows(label_rows, side, value=-100)
    return {"decoder_input_ids": ids, "decoder_attention_mask": mask, "labels": labels}


def prompt_batch(side: str = "left", seed: int = 0) -> dict[str, torch.Tensor]:
    prompts, _ = decoder_rows(seed)
    ids, mask = pad_rows(prompts, side)
    return {"decoder_input_ids": ids, "decoder_attention_mask": mask}


def greedy(model, fusion, prompts, **kwargs) -> torch.Tensor:
    return model.generate(**fusion, **prompts, max_new_tokens=6, do_sample=False, **kwargs)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ---- 1. both connections train and generate --------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_one_training_step_gives_every_trainable_weight_a_finite_gradient_and_the_model_generates(case):
    model = build(case).train()
    kinds = {type(m) for m in model.modules()}
    assert (MMFusionQueryBlock in kinds) == (CASES[case][2] > 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    fusion, decoder = fusion_batch(), decoder_batch()
    loss = model(**fusion, **decoder).loss
    loss.backward()
    assert torch.isfinite(loss)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(list(model.parameters()))
    missing = [name for name, p in trainable if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    assert not [name for name, p in trainable if not torch.isfinite(p.grad).all()]
    optimizer.step()
    with torch.no_grad():
        assert model(**fusion, **decoder).loss.item() < loss.item()  # one step on this batch lowers its loss
    generated = greedy(model.eval(), fusion, prompt_batch())
    assert generated.dtype == torch.long and generated.shape[0] == 4 and 1 <= generated.shape[1] <= 6


def test_a_batch_without_a_modality_still_gives_every_weight_a_gradient():
    # DDP with find_unused_parameters=False: the audio tower and its fusion stream are unused here
    model = build("prefix-llama-queries").train()
    fusion = {k: v for k, v in fusion_batch().items() if k in ("pixel_values", "input_ids", "attention_mask",
                                                                 "token_type_ids", "has_image", "has_text")}
    fusion["has_text"] = torch.tensor([1, 0, 1, 1]).bool() | ~fusion["has_image"]
    model(**fusion, **decoder_batch()).loss.backward()
    assert not [name for name, p in model.named_parameters() if p.grad is None]
    assert model.model.audio_model.feature_projection.projection.weight.grad.abs().sum() == 0


def test_the_generated_tokens_depend_on_the_fused_inputs():
    model = build("prefix-llama")
    prompts = prompt_batch()
    assert not torch.equal(greedy(model, fusion_batch(seed=0), prompts), greedy(model, fusion_batch(seed=5), prompts))


# ---- 2. generate() is transformers' decoding over one run of the encoder --------------------------------------------

def last_real_position(mask: torch.Tensor) -> torch.Tensor:
    return mask.shape[1] - 1 - mask.flip(1).argmax(1)


def manual_greedy(model, fusion, prompts, max_new_tokens: int = 6) -> torch.Tensor:
    """Argmax decoding through `forward` without a cache: each step reruns the whole model on every token so far
    (prompts right-padded, new tokens appended after the padding: forward lays each row out alone)."""
    ids, mask = prompts["decoder_input_ids"], prompts["decoder_attention_mask"]
    rows = torch.arange(ids.shape[0])
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(**fusion, decoder_input_ids=ids, decoder_attention_mask=mask).logits
            token = logits[rows, last_real_position(mask)].argmax(-1).masked_fill(finished, PAD)
            new.append(token)
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, (~finished).long()[:, None]], dim=1)
            finished |= token == EOS
            if finished.all():
                break
    return torch.stack(new, dim=1)


@pytest.mark.parametrize("case", CASES)
def test_greedy_generate_equals_a_manual_argmax_loop_and_one_beam_is_greedy(case):
    model = build(case)
    fusion = fusion_batch()
    generated = greedy(model, fusion, prompt_batch("left"))
    assert torch.equal(generated, manual_greedy(model, fusion, prompt_batch("right")))
    assert torch.equal(greedy(model, fusion, prompt_batch("left"), num_beams=1), generated)


@pytest.mark.parametrize("case", CASES)
def test_generation_with_and_without_the_kv_cache_is_identical(case):
    model = build(case)
    fusion, prompts = fusion_batch(), prompt_batch()
    for kwargs in ({}, {"num_beams": 3}):
        with_cache = greedy(model, fusion, prompts, use_cache=True, **kwargs)
        assert torch.equal(greedy(model, fusion, prompts, use_cache=False, **kwargs), with_cache), kwargs


@pytest.mark.parametrize("case", ["cross_attention-gpt2", "cross_attention-bert", "prefix-llama-queries"])
def test_the_encoder_and_fusion_run_once_per_generate_call(case):
    model = build(case)
    calls = {"fusion": 0, "vision tower": 0}
    model.model.register_forward_hook(lambda *_: calls.__setitem__("fusion", calls["fusion"] + 1))
    model.model.vision_model.register_forward_hook(lambda *_: calls.__setitem__("vision tower",
                                                                                 calls["vision tower"] + 1))
    for kwargs in ({}, {"num_beams": 3}, {"num_beams": 3, "num_return_sequences": 2}, {"do_sample": True}):
        calls.update({"fusion": 0, "vision tower": 0})
        generated = model.generate(**fusion_batch(), **prompt_batch(), max_new_tokens=5, min_new_tokens=5, **kwargs)
        assert generated.shape == (4 * kwargs.get("num_return_sequences", 1), 5)
        assert calls == {"fusion": 1, "vision tower": 1}, kwargs


@pytest.mark.parametrize("case", ["cross_attention-bert", "prefix-gpt2"])
def test_beam_search_returns_the_new_tokens_of_each_row_in_batch_order(case):
    model = build(case)
    fusion, prompts = fusion_batch(), prompt_batch()
    output = model.generate(**fusion, **prompts, max_new_tokens=4, num_beams=3, num_return_sequences=3,
                            return_dict_in_generate=True, output_scores=True)
    assert output.sequences.shape[0] == 12
    for i in (0, 2):  # row i alone gives the same sequences, at rows 3i..3i+2 of the batched call
        alone = model.generate(**select_samples(fusion, [i]), **select_samples(prompts, [i]), max_new_tokens=4,
                               num_beams=3, num_return_sequences=3)
        assert torch.equal(alone, output.sequences[3 * i : 3 * i + 3, : alone.shape[1]])


@pytest.mark.parametrize("case", ["cross_attention-gpt2", "cross_attention-bert", "prefix-llama"])
def test_a_manual_loop_with_the_cache_returned_by_forward_equals_generate(case):
    model = build(case)
    fusion = select_samples(fusion_batch(), [3])
    prompt = prompt_batch()["decoder_input_ids"][3:4]
    with torch.no_grad():
        context = model.get_decoder_context(**fusion)
        out = model(encoder_outputs=context, decoder_input_ids=prompt, use_cache=True)
        ids, mask = prompt, torch.ones_like(prompt)
        if CASES[case][0] == "prefix":  # the cache holds the prefix too
            mask = torch.cat([context[1].long(), mask], dim=1)
        for _ in range(5):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], dim=1), torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(encoder_outputs=context, decoder_input_ids=token, decoder_attention_mask=mask,
                        cache=out.cache, use_cache=True)
    generated = model.generate(**fusion, decoder_input_ids=prompt, max_new_tokens=5, min_new_tokens=5)
    assert torch.equal(ids[:, prompt.shape[1]:], generated)


def test_a_bart_decoder_joins_by_cross_attention_and_generates_rows_of_equal_length():
    # BART's decoder takes no position_ids: training lays each row out alone as for any decoder, but batched
    # generation can only keep a row's positions when every row has the same length
    torch.manual_seed(0)
    config = tiny_fusion_config(decoder_config=tiny_bart_decoder_config(), decoder_connection="cross_attention")
    model = MMFusionForConditionalGeneration(config).train()
    assert type(model.decoder).__name__ == "BartForCausalLM"
    fusion = fusion_batch()
    model(**fusion, **decoder_batch("left")).loss.backward()
    assert not [name for name, p in model.named_parameters() if p.grad is None]
    model.eval()
    with torch.no_grad():
        left, right = model(**fusion, **decoder_batch("left")).loss, model(**fusion, **decoder_batch("right")).loss
    assert abs(left.item() - right.item()) <= 1e-6
    prompts = {"decoder_input_ids": torch.tensor([[BOS, 7], [BOS, 9], [BOS, 11], [BOS, 13]])}
    generated = greedy(model, fusion, prompts)
    manual = manual_greedy(model, fusion, {**prompts, "decoder_attention_mask": torch.ones(4, 2, dtype=torch.long)})
    assert torch.equal(generated, manual)
    assert torch.equal(greedy(model, fusion, prompts, use_cache=False), generated)
    with pytest.raises(ValueError, match=r"decoder_attention_mask: BartForCausalLM takes no position_ids"):
        greedy(model, fusion, prompt_batch())


def test_without_a_prompt_generation_starts_from_the_start_token():
    model = build("cross_attention-gpt2")
    fusion = fusion_batch()
    assert model.generation_config.decoder_start_token_id == BOS
    start = {"decoder_input_ids": torch.full((4, 1), BOS)}
    assert torch.equal(model.generate(**fusion, max_new_tokens=4), model.generate(**fusion, **start, max_new_tokens=4))


# ---- 3. the loss; padding and batch partners ------------------------------------------------------------------------

def hand_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the labels other than -100, each predicted at the row's previous real token."""
    terms = []
    for i in range(logits.shape[0]):
        positions = batch["decoder_attention_mask"][i].nonzero().flatten().tolist()
        for before, at in zip(positions, positions[1:]):
            label = batch["labels"][i, at].item()
            if label != -100:
                terms.append(F.cross_entropy(logits[i, before].double()[None], torch.tensor([label])))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("case", ["cross_attention-gpt2", "cross_attention-bert", "prefix-llama",
                                  "prefix-gpt2-queries"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_the_loss_is_the_cross_entropy_over_the_positions_without_minus_100(case, side):
    model = build(case)
    fusion, batch = fusion_batch(), decoder_batch(side)
    with torch.no_grad():
        out = model(**fusion, **batch)
        assert abs(out.loss.item() - hand_loss(out.logits, batch).item()) <= 1e-6
        # padding never counts, whatever its label; -100 positions are free to hold anything
        noisy = {**batch, "labels": batch["labels"].where(batch["decoder_attention_mask"].bool(), 7)}
        assert model(**fusion, **noisy).loss.item() == out.loss.item()
        count = int((batch["labels"] != -100).sum())
        summed = model(**fusion, **batch, num_items_in_batch=1).loss
        assert abs(summed.item() - out.loss.item() * count) <= 1e-4


@pytest.mark.parametrize("case", ["cross_attention-gpt2", "cross_attention-bert", "prefix-llama",
                                  "prefix-gpt2-queries"])
def test_left_and_right_padding_give_the_same_loss_logits_and_generated_tokens(case):
    model = build(case)
    fusion = fusion_batch()
    with torch.no_grad():
        right, left = model(**fusion, **decoder_batch("right")), model(**fusion, **decoder_batch("left"))
    assert abs(right.loss.item() - left.loss.item()) <= 1e-6
    right_mask = decoder_batch("right")["decoder_attention_mask"]
    left_mask = decoder_batch("left")["decoder_attention_mask"]
    for i in range(4):
        assert max_diff(right.logits[i][right_mask[i].bool()], left.logits[i][left_mask[i].bool()]) <= 1e-5
    assert torch.equal(greedy(model, fusion, prompt_batch("left")), greedy(model, fusion, prompt_batch("right")))


@pytest.mark.parametrize("case", ["cross_attention-bert", "prefix-llama-queries", "prefix-gpt2"])
def test_a_row_gives_the_same_loss_logits_and_tokens_alone_as_with_batch_partners(case):
    model = build(case)
    fusion, batch, prompts = fusion_batch(), decoder_batch("left"), prompt_batch("left")
    with torch.no_grad():
        together = model(**fusion, **batch)
    generated = greedy(model, fusion, prompts)
    for i in range(4):
        real = batch["decoder_attention_mask"][i].bool()
        row = {key: value[i : i + 1, real] for key, value in batch.items()}
        with torch.no_grad():
            alone = model(**select_samples(fusion, [i]), **row)
        assert max_diff(alone.logits[0], together.logits[i][real]) <= 1e-5
        assert abs(alone.loss.item() - hand_loss(together.logits[i : i + 1], select_samples(batch, [i])).item()) <= 1e-5
        prompt_real = prompts["decoder_attention_mask"][i].bool()
        prompt = {"decoder_input_ids": prompts["decoder_input_ids"][i : i + 1, prompt_real]}
        tokens = greedy(model, select_samples(fusion, [i]), prompt)
        assert torch.equal(tokens[0], generated[i, : tokens.shape[1]]) and (generated[i, tokens.shape[1]:] == PAD).all()


def test_precomputed_encoder_outputs_give_the_same_logits_and_tokens():
    model = build("cross_attention-gpt2")
    fusion, batch = fusion_batch(), decoder_batch()
    with torch.no_grad():
        context = model.get_decoder_context(**fusion)
        direct, reused = model(**fusion, **batch), model(encoder_outputs=context, **batch)
    assert torch.equal(direct.logits, reused.logits) and torch.equal(direct.context_states, context[0])
    prompts = prompt_batch()
    assert torch.equal(greedy(model, fusion, prompts), greedy(model, {"encoder_outputs": context}, prompts))
    with pytest.raises(ValueError, match=r"encoder_outputs and input_ids, pixel_values: give one of them"):
        model(encoder_outputs=context, input_ids=fusion["input_ids"], pixel_values=fusion["pixel_values"], **batch)


# ---- 4. streaming ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["cross_attention-gpt2", "prefix-llama"])
def test_a_text_iterator_streamer_on_a_thread_yields_the_returned_text(case):
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(VOCAB)}, do_lower_case=True)
    model = build(case)
    fusion, prompt = select_samples(fusion_batch(), [1]), {"decoder_input_ids": torch.tensor([[BOS, 40, 41]])}
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    result = {}
    thread = threading.Thread(target=lambda: result.update(ids=model.generate(**fusion, **prompt, max_new_tokens=8,
                                                                               streamer=streamer)))
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    expected = tokenizer.decode(result["ids"][0], skip_special_tokens=True)
    assert expected and streamed.strip() == expected.strip()


# ---- 5. saving and loading ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_models(tmp_path_factory) -> dict[str, tuple[MMFusionForConditionalGeneration, object]]:
    """A cross-attention and a prefix model, each with a changed generation_config, saved."""
    saved = {}
    for case in ("cross_attention-bert", "prefix-llama-queries"):
        folder = tmp_path_factory.mktemp("generation") / case
        model = build(case)
        model.generation_config.max_new_tokens, model.generation_config.min_new_tokens = 7, 2
        model.save_pretrained(folder)
        saved[case] = (model, folder)
    return saved


def test_save_pretrained_writes_the_generation_auto_map_and_generation_config(saved_models):
    for case, (model, folder) in saved_models.items():
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"] == {"AutoConfig": "configuration_mm.MMFusionConfig",
                                      "AutoModel": "modeling_mm.MMFusionForConditionalGeneration"}
        assert config["architectures"] == ["MMFusionForConditionalGeneration"]
        assert config["decoder_connection"] == CASES[case][0] and config["num_query_tokens"] == CASES[case][2]
        assert config["decoder_config"]["add_cross_attention"] is (CASES[case][0] == "cross_attention")
        generation = json.loads((folder / "generation_config.json").read_text())
        assert (generation["max_new_tokens"], generation["min_new_tokens"]) == (7, 2)
        assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"],
                generation["decoder_start_token_id"]) == (BOS, EOS, PAD, BOS)
        assert {"configuration_mm.py", "modeling_mm.py", "model.safetensors"} <= {p.name for p in folder.iterdir()}


@pytest.mark.parametrize("load", [MMFusionForConditionalGeneration.from_pretrained, AutoModel.from_pretrained],
                         ids=["MMFusionForConditionalGeneration", "AutoModel"])
def test_from_pretrained_gives_identical_logits_generations_and_generation_config(saved_models, load):
    fusion, batch, prompts = fusion_batch(), decoder_batch(), prompt_batch()
    for case, (model, folder) in saved_models.items():
        loaded, info = load(folder, output_loading_info=True)
        assert type(loaded) is MMFusionForConditionalGeneration
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        assert loaded.generation_config.to_dict() == model.generation_config.to_dict()
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, loaded.state_dict()[name]), name
        with torch.no_grad():
            assert max_diff(model(**fusion, **batch).logits, loaded(**fusion, **batch).logits) <= 1e-6
        for kwargs in ({}, {"num_beams": 3}):  # greedy with the saved lengths (7, at least 2), and beam search
            assert torch.equal(model.generate(**fusion, **prompts, **kwargs), loaded.generate(**fusion, **prompts,
                                                                                                **kwargs)), case


def test_eager_and_sdpa_attention_give_the_same_logits_and_tokens(saved_models):
    fusion, batch, prompts = fusion_batch(), decoder_batch("left"), prompt_batch()
    for case, (_, folder) in saved_models.items():
        outputs = {}
        for implementation in ("eager", "sdpa"):
            model = MMFusionForConditionalGeneration.from_pretrained(folder, attn_implementation=implementation)
            assert model.config._attn_implementation == implementation
            assert model.decoder.config._attn_implementation == implementation, case
            with torch.no_grad():
                outputs[implementation] = model(**fusion, **batch).logits, greedy(model, fusion, prompts)
        real = batch["decoder_attention_mask"].bool()
        assert max_diff(outputs["eager"][0][real], outputs["sdpa"][0][real]) <= 1e-5, case
        assert torch.equal(outputs["eager"][1], outputs["sdpa"][1]), case


def test_trust_remote_code_generates_the_same_where_the_project_cannot_be_imported(saved_models, tmp_path):
    fusion, prompts = fusion_batch(), prompt_batch()
    cases = {}
    for case, (model, folder) in saved_models.items():
        shutil.copytree(folder, tmp_path / case)
        cases[case] = {"folder": str(tmp_path / case), "tokens": greedy(model, fusion, prompts)}
    torch.save({"fusion": fusion, "prompts": prompts, "cases": cases}, tmp_path / "case.pt")
    (tmp_path / "work").mkdir()
    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    environment.pop("PYTHONPATH", None)
    script = WITHOUT_PROJECT + textwrap.dedent(f"""
        import torch
        from transformers import AutoModel
        saved = torch.load({str(tmp_path / "case.pt")!r})
        for name, case in saved["cases"].items():
            model = AutoModel.from_pretrained(case["folder"], trust_remote_code=True)
            assert type(model).__name__ == "MMFusionForConditionalGeneration", type(model)
            assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
            tokens = model.generate(**saved["fusion"], **saved["prompts"], max_new_tokens=6, do_sample=False)
            assert torch.equal(tokens, case["tokens"]), (name, tokens, case["tokens"])
        print("identical")
    """)
    result = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path / "work", env=environment,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "identical" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("case", ["cross_attention-gpt2", "prefix-llama-queries"])
def test_from_pretrained_without_weights_initialises_like_init(case):
    # as test_modeling_mm's test for the classifier: constants equal, random draws from the same distribution
    config = generation_config(case)
    torch.manual_seed(0)
    built = MMFusionForConditionalGeneration(config).state_dict()
    torch.manual_seed(0)
    loaded = MMFusionForConditionalGeneration.from_pretrained(None, config=config, state_dict={}).state_dict()
    assert set(built) == set(loaded)
    for key, a in built.items():
        b = loaded[key]
        assert torch.isfinite(b).all(), key
        a, b = a.double(), b.double()
        if a.numel() == 1 or bool((a == a.flatten()[0]).all()):
            assert torch.equal(a, b), key
            continue
        n = a.numel()
        assert abs(a.std() - b.std()) <= 5 / (2 * n) ** 0.5 * a.std() + 1e-4, (key, a.std().item(), b.std().item())
        assert abs(a.mean() - b.mean()) <= 5 / n**0.5 * a.std() + 1e-4, (key, a.mean().item(), b.mean().item())


def test_init_weights_covers_every_new_module():
    model = build("prefix-gpt2-queries", initializer_range=0.05)
    new = [(n, p) for n, p in model.named_parameters()
           if n.startswith(("decoder_queries.", "decoder_input_projection."))]
    assert {n.split(".")[0] for n, _ in new} == {"decoder_queries", "decoder_input_projection"}
    for name, param in new:
        if "norm" in name:
            expected = torch.ones_like(param) if name.endswith("weight") else torch.zeros_like(param)
            assert torch.equal(param, expected), name
        elif name.endswith("bias"):
            assert torch.equal(param, torch.zeros_like(param)), name
        else:  # Linear weights, query tokens, sink key/value: N(0, initializer_range)
            assert 0.03 < param.std().item() < 0.07, (name, param.std().item())


def tower_and_decoder_checkpoints(folder) -> dict[str, str]:
    """A GPT-2 LM without cross-attention and a Llama LM, saved with their generation configs."""
    torch.manual_seed(1)
    GPT2LMHeadModel(tiny_gpt2_config()).save_pretrained(folder / "gpt2")
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(folder / "llama")
    return {"gpt2": str(folder / "gpt2"), "llama": str(folder / "llama")}


def test_from_towers_loads_the_decoder_and_adds_cross_attention_where_the_checkpoint_has_none(tmp_path, vit_dir,
                                                                                               bert_dir):
    decoders = tower_and_decoder_checkpoints(tmp_path)
    model = MMFusionForConditionalGeneration.from_towers(vision=vit_dir, text=bert_dir, decoder=decoders["gpt2"],
                                                         decoder_connection="cross_attention", **FUSION_KWARGS)
    saved = GPT2LMHeadModel.from_pretrained(decoders["gpt2"]).state_dict()
    state = model.decoder.state_dict()
    assert set(saved) < set(state)
    assert all(torch.equal(state[name], tensor) for name, tensor in saved.items())
    new = sorted(set(state) - set(saved))
    assert new and all("crossattention" in name or "ln_cross_attn" in name for name in new)
    assert all(torch.isfinite(state[name]).all() for name in new)
    assert 0.1 < state["transformer.h.0.crossattention.c_attn.weight"].std().item() < 0.3  # GPT-2's init (0.2 here)
    assert model.config.decoder_config is model.decoder.config and model.decoder.config.add_cross_attention
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (EOS, PAD)
    fusion = fusion_batch()
    fusion = {k: v for k, v in fusion.items() if k in ("pixel_values", "input_ids", "attention_mask", "token_type_ids")}
    assert model.eval().generate(**fusion, max_new_tokens=3, min_new_tokens=3).shape == (4, 3)
    # BERT as a decoder: the text tower's checkpoint becomes a BertLMHeadModel with cross-attention
    bert = MMFusionForConditionalGeneration.from_towers(vision=vit_dir, decoder=bert_dir,
                                                        decoder_connection="cross_attention", **FUSION_KWARGS)
    assert type(bert.decoder).__name__ == "BertLMHeadModel" and bert.decoder.config.is_decoder
    with pytest.raises(ValueError, match=r"decoder: LlamaForCausalLM has no cross-attention; "
                                         r"use decoder_connection='prefix'"):
        MMFusionForConditionalGeneration.from_towers(vision=vit_dir, decoder=decoders["llama"],
                                                     decoder_connection="cross_attention", **FUSION_KWARGS)
    with pytest.raises(ValueError, match=r"decoder: checkpoint .* \(model_type 'vit' is not a causal language model"):
        MMFusionForConditionalGeneration.from_towers(text=bert_dir, decoder=vit_dir, **FUSION_KWARGS)


def test_from_encoder_takes_a_trained_classifiers_towers_and_fusion_and_leaves_its_head(tmp_path, vit_dir,
                                                                                        bert_dir):
    """BLIP-2's second stage: the encoder of a saved classifier, exactly, under a new decoder; the fused vector the
    classifier's head read leads the decoder's context; a generation model is refused as an encoder."""
    from modeling_mm import MMFusionForSequenceClassification, MMFusionModel

    decoders = tower_and_decoder_checkpoints(tmp_path)
    torch.manual_seed(0)
    classifier = MMFusionForSequenceClassification.from_towers(vision=vit_dir, text=bert_dir, num_labels=3,
                                                               **FUSION_KWARGS)
    classifier.save_pretrained(tmp_path / "classifier")
    for encoder in (tmp_path / "classifier", classifier):
        model = MMFusionForConditionalGeneration.from_encoder(encoder, decoder=decoders["llama"],
                                                              decoder_connection="prefix", num_query_tokens=2)
        state, trained = model.model.state_dict(), classifier.model.state_dict()
        assert state.keys() == trained.keys() and all(torch.equal(state[k], trained[k]) for k in trained)
        connection = (model.config.num_labels, model.config.decoder_connection, model.config.num_query_tokens)
        assert connection == (2, "prefix", 2)
        assert model.config.fusion_hidden_size == classifier.config.fusion_hidden_size
        assert not hasattr(model, "classifier")
    fusion = {k: v for k, v in fusion_batch().items() if k in ("pixel_values", "input_ids", "attention_mask",
                                                               "token_type_ids")}
    model = MMFusionForConditionalGeneration.from_encoder(classifier, decoder=decoders["gpt2"],
                                                          decoder_connection="cross_attention").eval()
    with torch.no_grad():
        states, mask = model.get_decoder_context(**fusion)
        pooled = classifier.model(**fusion).pooler_output
    expected = model.decoder_input_projection(pooled + model.decoder_context_embedding.weight[0])
    assert max_diff(states[:, 0], expected) < 1e-6 and bool(mask[:, 0].all())
    model.save_pretrained(tmp_path / "generation")
    with pytest.raises(ValueError, match=r"^encoder: .* is a generation model already; load it with from_pretrained"):
        MMFusionForConditionalGeneration.from_encoder(tmp_path / "generation", decoder=decoders["gpt2"])
    base = MMFusionModel.from_pretrained(tmp_path / "generation")
    with pytest.raises(ValueError, match=r"^encoder: a generation model already"):
        MMFusionForConditionalGeneration.from_encoder(base, decoder=decoders["gpt2"])


# ---- 6. settings and refusals ---------------------------------------------------------------------------------------

def test_cross_attention_with_a_llama_decoder_raises_naming_prefix():
    with pytest.raises(ValueError, match=r"^decoder: LlamaForCausalLM has no cross-attention; "
                                         r"use decoder_connection='prefix'$"):
        MMFusionForConditionalGeneration(tiny_fusion_config(("text",), decoder_config=tiny_llama_config(),
                                                            decoder_connection="cross_attention"))


def test_a_given_decoder_that_does_not_fit_the_connection_is_refused():
    config = tiny_fusion_config(("text",), decoder_config=tiny_gpt2_config(), decoder_connection="prefix")
    with_cross_attention = GPT2LMHeadModel(GPT2Config(**{**tiny_gpt2_config().to_dict(), "add_cross_attention": True}))
    with pytest.raises(ValueError, match=r"decoder: GPT2LMHeadModel has cross-attention layers, which "
                                         r"decoder_connection='prefix' would leave untrained"):
        MMFusionForConditionalGeneration(config, decoder=with_cross_attention)
    config = tiny_fusion_config(("text",), decoder_config=tiny_gpt2_config(), decoder_connection="cross_attention")
    with pytest.raises(ValueError, match=r"decoder: GPT2LMHeadModel was built without cross-attention layers"):
        MMFusionForConditionalGeneration(config, decoder=GPT2LMHeadModel(tiny_gpt2_config()))


def test_the_config_with_no_arguments_still_builds_and_a_generation_config_round_trips(tmp_path):
    config = MMFusionConfig()
    assert (config.decoder_config, config.decoder_connection, config.num_query_tokens) == (None, "prefix", 0)
    with pytest.raises(ValueError, match=r"decoder_config: MMFusionForConditionalGeneration needs a decoder"):
        MMFusionForConditionalGeneration(tiny_fusion_config(("text",)))
    config = generation_config("cross_attention-bert")
    assert config.decoder_config.is_decoder and config.decoder_config.add_cross_attention
    assert config.get_text_config(decoder=True) is config.decoder_config
    config.save_pretrained(tmp_path)
    loaded = MMFusionConfig.from_pretrained(tmp_path)
    assert type(loaded.decoder_config) is BertConfig
    assert {**loaded.to_dict(), "_name_or_path": ""} == {**config.to_dict(), "_name_or_path": ""}
    from_dict = MMFusionConfig(decoder_config={"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4})
    assert type(from_dict.decoder_config) is LlamaConfig and not from_dict.decoder_config.add_cross_attention


BAD_SETTINGS = [
    ({"decoder_connection": "film"}, r"decoder_connection: must be one of \('cross_attention', 'prefix'\), got 'film'"),
    ({"decoder_connection": None}, r"decoder_connection: must be one of .* got None"),
    ({"num_query_tokens": -1}, r"num_query_tokens: must be an integer >= 0 .* got -1"),
    ({"num_query_tokens": 2.5}, r"num_query_tokens: must be an integer >= 0 .* got 2\.5"),
    ({"num_query_tokens": True}, r"num_query_tokens: must be an integer >= 0 .* got True"),
    ({"decoder_config": {"n_layer": 2}}, r"decoder_config: a dict needs a 'model_type' key"),
    ({"decoder_config": {"model_type": "no-such-model"}}, r"decoder_config: unknown model_type 'no-such-model'"),
    ({"decoder_config": {"model_type": "vit"}}, r"decoder_config: model_type 'vit' is not a causal language model"),
    ({"decoder_config": 42}, r"decoder_config: expected a transformers config or a dict, got int"),
    ({"decoder_config": {"model_type": "gpt2"}, "tasks": [{"name": "t", "problem_type": "regression"}]},
     r"decoder_config, tasks: a generation model has no task heads"),
    ({"decoder_config": {"model_type": "gpt2"}, "is_contrastive": True},
     r"decoder_config, is_contrastive: a generation model is not a contrastive model"),
]


@pytest.mark.parametrize("settings, message", BAD_SETTINGS, ids=[m.split(":")[0] + str(i)
                                                                 for i, (_, m) in enumerate(BAD_SETTINGS)])
def test_bad_generation_settings_raise_value_error_naming_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        MMFusionConfig(**settings)


def test_bad_inputs_raise_value_errors_naming_the_argument():
    model = build("cross_attention-gpt2")
    fusion, batch = fusion_batch(), decoder_batch()
    with pytest.raises(ValueError, match=r"decoder_input_ids: required"):
        model(**fusion)
    with pytest.raises(ValueError, match=r"labels: expected the shape of decoder_input_ids \(4, 7\), got \(4, 6\)"):
        model(**fusion, **{**batch, "labels": batch["labels"][:, :6]})
    with pytest.raises(ValueError, match=r"decoder_input_ids: 2 rows for 4 rows of fusion inputs"):
        model(**fusion, **{k: v[:2] for k, v in batch.items()})
    empty = {"decoder_input_ids": torch.tensor([[BOS], [BOS], [BOS], [PAD]]),
             "decoder_attention_mask": torch.tensor([[1], [1], [1], [0]])}
    with pytest.raises(ValueError, match=r"decoder_attention_mask: rows \[3\] have no prompt token"):
        model.generate(**fusion, **empty)


# ---- 7. transformers citizenship: embeddings, checkpointing, names --------------------------------------------------

def test_embeddings_are_the_decoders_and_resizing_reaches_its_config():
    model = build("prefix-gpt2")
    assert model.get_input_embeddings() is model.decoder.transformer.wte
    assert model.get_output_embeddings() is model.decoder.lm_head
    model.resize_token_embeddings(len(VOCAB) + 3)
    assert model.config.decoder_config.vocab_size == len(VOCAB) + 3 == model.decoder.config.vocab_size
    assert model.decoder.lm_head.weight is model.decoder.transformer.wte.weight  # still tied
    assert model.model.text_model.get_input_embeddings().num_embeddings == len(VOCAB)  # the text tower's own
    with torch.no_grad():
        assert model(**fusion_batch(), **decoder_batch()).logits.shape[-1] == len(VOCAB) + 3


def training_grads(model, fusion, batch) -> dict[str, torch.Tensor | None]:
    model.zero_grad()
    model(**fusion, **batch).loss.backward()
    return {n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", ["cross_attention-bert", "prefix-gpt2"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_covers_the_decoder_and_keeps_the_gradients(case, use_reentrant):
    model = build(case).train()
    fusion, batch = fusion_batch(), decoder_batch()
    plain = training_grads(model, fusion, batch)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    decoder_layers = [m for m in model.decoder.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(decoder_layers) == 2 and all(layer.gradient_checkpointing for layer in decoder_layers)
    checkpointed = training_grads(model, fusion, batch)
    assert not [name for name, grad in checkpointed.items() if grad is None]
    for name, grad in plain.items():
        assert max_diff(grad, checkpointed[name]) <= 1e-5, name


@pytest.mark.parametrize("case", CASES)
def test_new_linear_names_never_repeat_a_tower_or_decoder_linear_name(case):
    model = build(case)
    parts = ("model.vision_model", "model.text_model", "model.audio_model", "decoder.")
    linear = (nn.Linear, Conv1D)  # GPT-2's Conv1D is its Linear

    def names(inside: bool) -> set[str]:
        return {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                if isinstance(m, linear) and n.startswith(parts) == inside}

    assert names(False) and not names(False) & names(True)
    modules = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n.startswith(parts)}
    assert not {"decoder_queries", "decoder_input_projection", "to_kv"} & modules
