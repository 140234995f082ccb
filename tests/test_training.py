"""The embedded model's training mechanics, on tiny models and synthetic text."""

import numpy as np
import pandas as pd
import pytest
import torch
from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

from moecollab import models, routing_health, tokens, training


def test_balance_loss_is_one_for_uniform_routing():
    logits = [torch.zeros(32, 8), torch.zeros(32, 8)]
    assert float(training.per_layer_balance_loss(logits, top_k=2)) == pytest.approx(1.0)


def test_a_balance_window_reads_the_loads_of_recent_batches():
    from collections import deque

    generator = torch.Generator().manual_seed(0)
    first = [torch.randn(12, 6, generator=generator) for _ in range(2)]
    second = [torch.randn(12, 6, generator=generator) for _ in range(2)]
    window = deque(maxlen=2)
    training.per_layer_balance_loss(first, top_k=2, recent_counts=window)
    windowed = training.per_layer_balance_loss(second, top_k=2, recent_counts=window)
    # By hand: loads f from both batches, probabilities P from the second alone.
    expected = []
    for before, now in zip(first, second, strict=True):
        both = torch.cat([before, now])
        counts = torch.bincount(both.topk(2, dim=-1).indices.reshape(-1), minlength=6).float()
        expected.append(6 * (counts / counts.sum() * now.softmax(-1).mean(0)).sum())
    torch.testing.assert_close(windowed, torch.stack(expected).mean())
    # A window of one is the plain per-batch loss, and only the current batch has a gradient.
    assert torch.equal(training.per_layer_balance_loss(second, top_k=2, recent_counts=deque(
        maxlen=1)), training.per_layer_balance_loss(second, top_k=2))
    assert len(window) == 2 and not any(counts.requires_grad for counts in window)


def test_per_layer_loss_sees_a_collapse_that_the_pooled_loss_hides():
    # Layer 0 sends every token to experts 0-1, layer 1 to experts 2-3: pooled over layers the
    # four experts look evenly used, but each layer has collapsed onto two of its four experts.
    tokens = 64
    layer0 = torch.full((tokens, 4), -10.0)
    layer0[:, :2] = 10.0
    layer1 = torch.full((tokens, 4), -10.0)
    layer1[:, 2:] = 10.0
    uniform = (torch.zeros(tokens, 4), torch.zeros(tokens, 4))
    pooled = float(load_balancing_loss_func((layer0, layer1), num_experts=4, top_k=2))
    pooled_uniform = float(load_balancing_loss_func(uniform, num_experts=4, top_k=2))
    per_layer = float(training.per_layer_balance_loss([layer0, layer1], top_k=2))
    per_layer_uniform = float(training.per_layer_balance_loss(list(uniform), top_k=2))
    assert pooled == pytest.approx(pooled_uniform)      # the pooled loss cannot tell them apart
    assert per_layer_uniform == pytest.approx(1.0)
    assert per_layer == pytest.approx(2.0, abs=1e-3)    # 4 · (0.5 · 0.5 + 0.5 · 0.5)


class FakeTokenizer:
    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[int(word) for word in text.split()] for text in texts]}


def test_pack_blocks_keeps_each_block_within_one_domain():
    texts = {"a": ["1 2 3", "4 5"] * 4, "b": ["7 8 9 10"] * 3}
    blocks = training.pack_blocks(texts, FakeTokenizer(), seq_len=4, seed=0)
    assert blocks.input_ids.shape[1] == 4
    for row, domain in zip(blocks.input_ids.tolist(), blocks.domains, strict=True):
        allowed = {0, 1, 2, 3, 4, 5} if domain == "a" else {0, 7, 8, 9, 10}
        assert set(row) <= allowed
    assert blocks.domains.count("a") == (4 * (4 + 3)) // 4
    limited = training.pack_blocks(texts, FakeTokenizer(), 4, seed=0, max_blocks_per_domain=2)
    assert limited.domains == ["a", "a", "b", "b"]


def test_pack_blocks_keeps_the_blocks_it_packed_before_the_packers_were_one():
    # Worked by hand, and recorded from training's own packer before it became a view of
    # tokens.pack_documents: seed 0 orders "b" as [2, 0, 1, 3] (4 5 6 | 1 2 | 3 | 7), then
    # "a" and "c" (one text each); EOS (0) follows every text and short tails are dropped.
    texts = {"b": ["1 2", "3", "4 5 6", "7"], "a": ["8 9 10"], "c": ["11"]}
    blocks = training.pack_blocks(texts, FakeTokenizer(), 3, seed=0)
    assert blocks.input_ids.dtype == torch.int64
    assert blocks.input_ids.tolist() == [[4, 5, 6], [0, 1, 2], [0, 3, 0], [8, 9, 10]]
    assert blocks.domains == ["b", "b", "b", "a"]
    limited = training.pack_blocks(texts, FakeTokenizer(), 3, seed=0, max_blocks_per_domain=1)
    assert limited.input_ids.tolist() == [[4, 5, 6], [8, 9, 10]]
    assert limited.domains == ["b", "a"]
    # The capture packer cuts the same blocks from the same texts (one packing, two views).
    entries = pd.DataFrame({"text": [text for group in texts.values() for text in group],
                            "domain": [domain for domain, group in texts.items() for _ in group],
                            "entry_id": range(6), "split": "train"})
    documents = tokens.pack_documents(entries, FakeTokenizer(), seq_len=3,
                                      max_tokens_per_domain=None, seed=0)
    assert documents.input_ids.tolist() == blocks.input_ids.tolist()
    assert documents.domains == blocks.domains


def _synthetic_blocks(n_blocks: int, seed: int) -> training.TokenBlocks:
    """Two 'domains' with disjoint vocabularies and a simple repeating grammar."""
    rng = np.random.default_rng(seed)
    rows, domains = [], []
    for index in range(n_blocks):
        domain = "low" if index % 2 == 0 else "high"
        start = 2 if domain == "low" else 33
        phrase = rng.integers(start, start + 31, size=8)
        rows.append(np.tile(phrase, 4))
        domains.append(domain)
    return training.TokenBlocks(torch.tensor(np.stack(rows)), domains)


def _tiny_config():
    return models.embedded_config(vocab_size=64, n_layers=2, hidden_size=32, n_heads=2,
                                  n_experts=8, top_k=2, expert_size=16, seq_len=32)


def _train_tiny(balance_coef: float, specialisation_coef: float = 0.0):
    model = models.build_model(_tiny_config(), seed=0)
    train_blocks, validation_blocks = _synthetic_blocks(128, seed=1), _synthetic_blocks(32, seed=2)
    log = training.train(model, train_blocks, validation_blocks, n_steps=40, batch_size=8,
                         lr=3e-3, balance_coef=balance_coef,
                         specialisation_coef=specialisation_coef, eval_every=20, seed=0,
                         device="cpu", progress=False)
    with torch.inference_mode():
        output = model(input_ids=train_blocks.input_ids, output_router_logits=True)
    ids = np.stack([logits.topk(2, dim=-1).indices.numpy() for logits in output.router_logits],
                   axis=1)
    return log, routing_health.expert_share(ids, n_experts=8)


def test_training_lowers_loss_and_the_balance_term_keeps_experts_alive():
    balanced_log, balanced_share = _train_tiny(balance_coef=0.1)
    free_log, free_share = _train_tiny(balance_coef=0.0)
    assert balanced_log.validation_loss[0] == free_log.validation_loss[0]  # same start
    assert balanced_log.validation_loss[-1] < 0.9 * balanced_log.validation_loss[0]
    assert balanced_log.tokens_seen == 40 * 8 * 32
    # Without the balancing term an expert dies on this data; with it every expert keeps at
    # least a fifth of its uniform share and the per-layer balance loss ends lower.
    assert free_share.min() < 0.2
    assert balanced_share.min() >= 0.2, balanced_share.round(2)
    assert np.mean(balanced_log.balance_loss[-10:]) < np.mean(free_log.balance_loss[-10:])


def test_the_log_counts_starved_experts_as_the_routing_check_does():
    free_log, _ = _train_tiny(balance_coef=0.0)
    balanced_log, _ = _train_tiny(balance_coef=0.1)
    assert free_log.eval_steps == [0, 20, 40]
    assert len(free_log.starved_experts) == len(free_log.eval_steps)
    # The same count routing_health makes, on the validation blocks the log reads.
    model = models.build_model(_tiny_config(), seed=0)
    validation_blocks = _synthetic_blocks(32, seed=2)
    loss, share = training.evaluate_blocks(model, validation_blocks, batch_size=8, device="cpu")
    assert loss == free_log.validation_loss[0]
    np.testing.assert_allclose(share.mean(axis=1), 1.0)
    with torch.inference_mode():
        output = model(input_ids=validation_blocks.input_ids, output_router_logits=True)
    ids = np.stack([logits.topk(2, dim=-1).indices.numpy() for logits in output.router_logits],
                   axis=1)
    np.testing.assert_allclose(share, routing_health.expert_share(ids, n_experts=8))
    assert free_log.starved_experts[0] == int((share < 0.2).sum())
    # Without balancing, most experts of this tiny model starve by the end; with it few do.
    assert free_log.starved_experts[-1] > 3 * max(balanced_log.starved_experts[-1], 1)


def test_the_specialisation_term_raises_block_expert_information():
    plain_log, _ = _train_tiny(balance_coef=0.1)
    special_log, _ = _train_tiny(balance_coef=0.1, specialisation_coef=0.5)
    assert len(special_log.sequence_information) == 40
    # Same start, more information by the end, and the language model still learns.
    assert special_log.sequence_information[0] == plain_log.sequence_information[0]
    assert (np.mean(special_log.sequence_information[-10:])
            > 1.5 * np.mean(plain_log.sequence_information[-10:]))
    assert special_log.validation_loss[-1] < 0.9 * special_log.validation_loss[0]


def test_training_is_deterministic_for_a_seed():
    blocks = _synthetic_blocks(16, seed=1)
    weights = []
    for _ in range(2):
        model = models.build_model(_tiny_config(), seed=3)
        training.train(model, blocks, blocks.select(range(2)), n_steps=4, batch_size=4, lr=1e-3,
                       balance_coef=0.01, eval_every=2, seed=5, device="cpu", progress=False)
        weights.append(torch.cat([p.detach().ravel() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_training_on_two_threads_is_deterministic_too():
    # 128 experts: enough parallel work for two threads to sum the experts' token gradients
    # in a varying order, which made two runs of the default model part after 6 steps.
    config = models.embedded_config(vocab_size=512, n_layers=2, hidden_size=64, n_heads=2,
                                    n_experts=128, top_k=4, expert_size=16, seq_len=64)
    blocks = training.TokenBlocks(
        torch.randint(0, 512, (64, 64), generator=torch.Generator().manual_seed(0)), ["a"] * 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        weights = []
        for _ in range(3):
            model = models.build_model(config, seed=0)
            training.train(model, blocks, blocks.select(range(4)), n_steps=3, batch_size=16,
                           lr=3e-3, balance_coef=0.2, eval_every=100, seed=0, device="cpu",
                           progress=False)
            weights.append(torch.cat([p.detach().ravel() for p in model.parameters()]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(weights[0], weights[1]) and torch.equal(weights[0], weights[2])
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is back


def test_tokenizer_round_trips_text():
    tokenizer = models.train_tokenizer(["the acid reacts with the base"] * 50 +
                                       ["a writ issued by authority of law"] * 50, vocab_size=300)
    ids = tokenizer("the acid reacts")["input_ids"]
    assert tokenizer.decode(ids) == "the acid reacts"
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"


def test_resolve_device_rejects_unknown_names():
    with pytest.raises(ValueError, match="device must be"):
        models.resolve_device("gpu")
    assert models.resolve_device("cpu").type == "cpu"


def test_load_model_refuses_a_folder_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors"):
        models.load_model(tmp_path)
