"""Mapping heads, scores and loss against METHOD.md ("Mappings", "Scores", "Loss", ablations).

The reference numbers come from a small numpy transcription of METHOD.md written here with
plain loops; it imports nothing from the code under test.
"""
from __future__ import annotations

import dataclasses
import weakref

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from multigrounding.errors import UnknownNameError
from multigrounding.heads.losses import grounding_loss, matching_loss
from multigrounding.heads.model import GroundingHeads, HeadsConfig, HeadsConfigError
from multigrounding.heads.scores import (HeadsInputError, auto_chunk, best_level_scores,
                                         cross_scores, l2_normalize, sentence_grounding,
                                         word_grounding)

TOL = 1e-5
GAMMA1, GAMMA2 = 5.0, 10.0
B, T, M, L, D = 3, 4, 3, 3, 8          # N = M*M = 9 cells
N = M * M
MASK = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)


# ============================================================ numpy transcription of METHOD.md
def np_unit(x):
    norm = np.sqrt((x * x).sum())
    return x / norm if norm > 1e-12 else np.zeros_like(x)


def np_level_relevance(s, v, heatmap):
    """One text vector s [D] against one image v [N, L, D] → heatmap [N, L], relevance [L]."""
    cells, levels, _ = v.shape
    heat, relevance = np.zeros((cells, levels)), np.zeros(levels)
    for l in range(levels):
        sims = np.array([s @ v[n, l] for n in range(cells)])
        if heatmap == "relu":
            h = np.maximum(0.0, sims)
        else:                                   # softmax over the N cells of this level
            e = np.exp(sims - sims.max())
            h = e / e.sum()
        attended = np_unit(sum(h[n] * v[n, l] for n in range(cells)))
        heat[:, l], relevance[l] = h, attended @ s
    return heat, relevance


def np_cross_scores(words, mask, sentence, visual, heatmap="relu", gamma1=GAMMA1):
    captions, images = words.shape[0], visual.shape[0]
    word_scores, sentence_scores = np.zeros((captions, images)), np.zeros((captions, images))
    for b in range(captions):
        for c in range(images):
            best = [np_level_relevance(words[b, t], visual[c], heatmap)[1].max()
                    for t in range(words.shape[1]) if mask[b, t]]
            word_scores[b, c] = np.log(np.exp(gamma1 * np.array(best)).sum()) / gamma1
            sentence_scores[b, c] = np_level_relevance(sentence[b], visual[c], heatmap)[1].max()
    return word_scores, sentence_scores


def np_matching_loss(scores, gamma2=GAMMA2):
    total = 0.0
    for b in range(scores.shape[0]):
        column, row = gamma2 * scores[:, b], gamma2 * scores[b, :]
        total += column[b] - np.log(np.exp(column).sum())      # log P(S_b | I_b)
        total += row[b] - np.log(np.exp(row).sum())            # log P(I_b | S_b)
    return -total / scores.shape[0]


def np_leaky(x, slope=0.25):
    return np.where(x > 0, x, slope * x)


def np_mlp(x, layers, activate=True):
    for weight, bias in layers:
        x = x @ weight.T + bias
        if activate:
            x = np_leaky(x)
    return x


def np_rows_unit(x):
    return np.apply_along_axis(np_unit, -1, x)


# =================================================================================== fixtures
def unit(*shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return l2_normalize(torch.randn(*shape, generator=g, dtype=dtype))


@pytest.fixture
def inputs():
    """Mapped, L2-normalised words (with padding), sentences and visual maps, float64."""
    return {"words": unit(B, T, D, seed=1), "mask": torch.from_numpy(MASK),
            "sentence": unit(B, D, seed=2), "visual": unit(B, N, L, D, seed=3)}


def config(**kw) -> HeadsConfig:
    base = dict(visual_channels=[5, 6, 7, 4], text_layers=3, text_dim=6, sentence_vectors=2,
                dim=D, visual_widths=[10, 12, D])
    base.update(kw)
    return HeadsConfig(**base)


def cached(batch=B, length=T, seed=0, dtype=torch.float16, cfg=None):
    """Cached (frozen) inputs as the cache stores them: float16, channels last."""
    cfg = cfg or config()
    g = torch.Generator().manual_seed(seed)
    levels = [torch.randn(batch, M, M, c, generator=g).abs().to(dtype)
              for c in cfg.visual_channels]
    tokens = torch.randn(batch, length, cfg.text_layers, cfg.text_dim, generator=g).to(dtype)
    sentence = torch.randn(batch, cfg.sentence_vectors, cfg.text_dim, generator=g).to(dtype)
    return levels, tokens, sentence


def step(heads, levels, tokens, mask, sentence, use_words=True, use_sentence=True):
    """One training loss as the trainer computes it (a switched-off term is not computed)."""
    v = heads.map_visual(levels)
    s = heads.map_words(tokens) if use_words else None
    s_bar = heads.map_sentence(sentence) if use_sentence else None
    R_w, R_s = cross_scores(s, mask, s_bar, v)
    return grounding_loss(R_w, R_s, heads.l2_penalty(), use_words=use_words,
                          use_sentence=use_sentence)


# ===================================================================== scores against numpy
@pytest.mark.parametrize("heatmap", ["relu", "softmax"])
@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_cross_scores_match_numpy(inputs, heatmap, chunk):
    R_w, R_s = cross_scores(inputs["words"], inputs["mask"], inputs["sentence"], inputs["visual"],
                            gamma1=GAMMA1, heatmap=heatmap, chunk=chunk)
    want_w, want_s = np_cross_scores(*(inputs[k].numpy() for k in
                                       ("words", "mask", "sentence", "visual")), heatmap=heatmap)
    assert R_w.shape == R_s.shape == (B, B) and R_w.dtype == torch.float64
    np.testing.assert_allclose(R_w.detach().numpy(), want_w, atol=TOL, rtol=0)
    np.testing.assert_allclose(R_s.detach().numpy(), want_s, atol=TOL, rtol=0)


def test_cross_scores_rectangular_and_one_sided(inputs):
    more_images = unit(5, N, L, D, seed=9)
    R_w, R_s = cross_scores(inputs["words"], inputs["mask"], inputs["sentence"], more_images)
    want_w, want_s = np_cross_scores(inputs["words"].numpy(), MASK, inputs["sentence"].numpy(),
                                     more_images.numpy())
    np.testing.assert_allclose(R_w.numpy(), want_w, atol=TOL, rtol=0)
    only_w, none_s = cross_scores(inputs["words"], inputs["mask"], None, more_images)
    none_w, only_s = cross_scores(None, None, inputs["sentence"], more_images)
    assert none_s is None and none_w is None
    np.testing.assert_allclose(only_w.numpy(), want_w, atol=TOL, rtol=0)
    np.testing.assert_allclose(only_s.numpy(), want_s, atol=TOL, rtol=0)


@pytest.mark.parametrize("heatmap", ["relu", "softmax"])
def test_word_and_sentence_grounding_match_numpy(inputs, heatmap):
    words, sentence, visual = (inputs[k] for k in ("words", "sentence", "visual"))
    out = word_grounding(words, inputs["mask"], visual, heatmap=heatmap)
    assert out["heatmaps"].shape == (B, T, N, L) and out["relevance"].shape == (B, T, L)
    assert out["level"].shape == out["score"].shape == (B, T)
    for b in range(B):
        for t in range(T):
            if not MASK[b, t]:
                assert out["level"][b, t] == -1 and out["score"][b, t] == 0
                assert not out["heatmaps"][b, t].any() and not out["relevance"][b, t].any()
                continue
            heat, relevance = np_level_relevance(words[b, t].numpy(), visual[b].numpy(), heatmap)
            np.testing.assert_allclose(out["heatmaps"][b, t].numpy(), heat, atol=TOL, rtol=0)
            np.testing.assert_allclose(out["relevance"][b, t].numpy(), relevance, atol=TOL, rtol=0)
            assert out["level"][b, t] == relevance.argmax()
            assert abs(out["score"][b, t].item() - relevance.max()) < TOL
    sent = sentence_grounding(sentence, visual, heatmap=heatmap)
    assert sent["heatmaps"].shape == (B, N, L) and sent["relevance"].shape == (B, L)
    for b in range(B):
        heat, relevance = np_level_relevance(sentence[b].numpy(), visual[b].numpy(), heatmap)
        np.testing.assert_allclose(sent["heatmaps"][b].numpy(), heat, atol=TOL, rtol=0)
        np.testing.assert_allclose(sent["relevance"][b].numpy(), relevance, atol=TOL, rtol=0)
        assert sent["level"][b] == relevance.argmax()
        assert abs(sent["score"][b].item() - relevance.max()) < TOL
    # the matched pairs are the diagonal of the all-pairs scores
    R_w, R_s = cross_scores(words, inputs["mask"], sentence, visual, heatmap=heatmap)
    per_word = out["score"].masked_fill(~inputs["mask"], -np.inf)
    diagonal = torch.logsumexp(GAMMA1 * per_word, dim=1) / GAMMA1
    torch.testing.assert_close(R_w.diagonal(), diagonal, atol=1e-12, rtol=0)
    torch.testing.assert_close(R_s.diagonal(), sent["score"], atol=1e-12, rtol=0)


def test_softmax_heatmaps_are_distributions_per_level(inputs):
    out = sentence_grounding(inputs["sentence"], inputs["visual"], heatmap="softmax")
    torch.testing.assert_close(out["heatmaps"].sum(1), torch.ones(B, L, dtype=torch.float64))


# ======================================================================= loss against numpy
@pytest.mark.parametrize("use_words, use_sentence", [(True, True), (True, False), (False, True)])
def test_loss_matches_numpy(inputs, use_words, use_sentence):
    visual = inputs["visual"].clone().requires_grad_()
    R_w, R_s = cross_scores(inputs["words"], inputs["mask"], inputs["sentence"], visual)
    want_w, want_s = np_cross_scores(*(inputs[k].numpy() for k in
                                       ("words", "mask", "sentence", "visual")))
    penalty = torch.tensor(3.25, dtype=torch.float64)
    out = grounding_loss(R_w, R_s, penalty, gamma2=GAMMA2, weight_decay=5e-4,
                         use_words=use_words, use_sentence=use_sentence)
    L_w, L_s = np_matching_loss(want_w), np_matching_loss(want_s)
    want = use_words * L_w + use_sentence * L_s + 5e-4 * 3.25
    assert abs(out["loss"].item() - want) < TOL
    assert abs(out["word"].item() - L_w) < TOL and abs(out["sentence"].item() - L_s) < TOL
    assert abs(out["l2"].item() - 5e-4 * 3.25) < 1e-12
    assert out["word"].requires_grad == use_words and out["sentence"].requires_grad == use_sentence
    assert abs(matching_loss(R_w, GAMMA2).item() - L_w) < TOL


def test_loss_refuses_inconsistent_switches(inputs):
    R = torch.zeros(B, B)
    with pytest.raises(ValueError, match="both off"):
        grounding_loss(R, R, 0.0, use_words=False, use_sentence=False)
    with pytest.raises(ValueError, match="sentence term is on"):
        grounding_loss(R, None, 0.0)
    assert grounding_loss(R, None, None, use_sentence=False)["sentence"] is None
    with pytest.raises(ValueError, match="square"):
        matching_loss(torch.zeros(3, 4))


# ================================================================== mappings against numpy
def test_mappings_and_penalty_match_numpy():
    cfg = config()
    heads = GroundingHeads(cfg).double()
    with torch.no_grad():                     # move the mix away from its uniform start
        heads.word_mix.weights.copy_(torch.tensor([0.3, -0.2, 0.5]))
        heads.word_mix.gamma.fill_(1.7)
        for p in heads.parameters():
            if p.dim() == 1 and p.numel() > 3:
                p.copy_(torch.randn_like(p) * 0.1)   # non-zero biases
    levels, tokens, sentence = cached(dtype=torch.float64)
    P = {k: p.detach().numpy() for k, p in heads.state_dict().items()}
    v = heads.map_visual(levels).detach().numpy()
    assert v.shape == (B, N, 4, D)
    for k, x in enumerate(levels):
        layers = [(P[f"visual.level{k}.{i}.weight"], P[f"visual.level{k}.{i}.bias"])
                  for i in (0, 2, 4)]
        want = np_rows_unit(np_mlp(x.numpy(), layers)).reshape(B, N, D)
        np.testing.assert_allclose(v[:, :, k], want, atol=TOL, rtol=0)
    mix = np.exp(P["word_mix.weights"]) / np.exp(P["word_mix.weights"]).sum()
    mixed = P["word_mix.gamma"] * sum(mix[k] * tokens.numpy()[:, :, k] for k in range(3))
    want = np_rows_unit(np_mlp(mixed, [(P["word.0.weight"], P["word.0.bias"]),
                                       (P["word.2.weight"], P["word.2.bias"])]))
    np.testing.assert_allclose(heads.map_words(tokens).detach().numpy(), want, atol=TOL, rtol=0)
    weighted = sum(P["sentence_mix.weight"][0, k] * sentence.numpy()[:, k] for k in range(2))
    want = np_rows_unit(np_mlp(weighted, [(P["sentence.0.weight"], P["sentence.0.bias"]),
                                          (P["sentence.2.weight"], P["sentence.2.bias"])]))
    np.testing.assert_allclose(heads.map_sentence(sentence).detach().numpy(), want, atol=TOL,
                               rtol=0)
    kernels = [P[f"visual.level{k}.{i}.weight"] for k in range(4) for i in (0, 2, 4)]
    want = 0.5 * sum((w ** 2).sum() for w in kernels)
    assert abs(heads.l2_penalty().item() - want) < TOL


# =========================================================================== gradients
def straightforward(words, mask, sentence, visual, heatmap):
    """METHOD.md as dense autograd: the full B×B×T×N×L heatmap and B×B×T×L×D attended tensor."""
    def best(text, vis):                                 # text [Bt, K, D] → [Bt, Bi, K]
        p = torch.einsum("bkd,cnld->bcknl", text, vis)
        h = torch.softmax(p, dim=3) if heatmap == "softmax" else torch.relu(p)
        a = torch.einsum("bcknl,cnld->bckld", h, vis)
        norm = a.norm(dim=-1, keepdim=True)
        a = torch.where(norm > 1e-12, a / norm.clamp_min(1e-12), torch.zeros_like(a))
        return torch.einsum("bckld,bkd->bckl", a, text).max(dim=-1).values
    per_word = best(words, visual).masked_fill(~mask[:, None, :], -np.inf)
    return (torch.logsumexp(GAMMA1 * per_word, dim=2) / GAMMA1,
            best(sentence[:, None], visual)[:, :, 0])


@pytest.mark.parametrize("heatmap", ["relu", "softmax"])
def test_gradients_equal_the_straightforward_formula(inputs, heatmap):
    leaves = {k: inputs[k].clone().requires_grad_() for k in ("words", "sentence", "visual")}
    got, want = [], []
    for fn, out in ((lambda *a: cross_scores(*a, heatmap=heatmap, chunk=2), got),
                    (lambda *a: straightforward(*a, heatmap), want)):
        R_w, R_s = fn(leaves["words"], inputs["mask"], leaves["sentence"], leaves["visual"])
        loss = grounding_loss(R_w, R_s, None)["loss"]
        out.extend(torch.autograd.grad(loss, list(leaves.values())))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("heatmap", ["relu", "softmax"])
def test_best_level_scores_gradcheck(heatmap):
    rows = unit(4, 6, seed=4).requires_grad_()
    visual = unit(3, 4, 2, 6, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda r, v: best_level_scores(r, v, heatmap=heatmap, chunk=2)[0], (rows, visual),
        fast_mode=True)


# ============================================================================== masking
def test_padding_words_change_nothing(inputs):
    """Extra padding positions, with any values, change no score, loss or gradient."""
    def run(words, mask):
        words = words.clone().requires_grad_()
        R_w, R_s = cross_scores(words, mask, inputs["sentence"], inputs["visual"])
        loss = grounding_loss(R_w, R_s, None)["loss"]
        (grad,) = torch.autograd.grad(loss, words)
        return R_w, loss, grad
    base = run(inputs["words"], inputs["mask"])
    junk = unit(B, 3, D, seed=7) * 5.0                        # not even unit vectors
    words = torch.cat([inputs["words"], junk], dim=1)
    mask = torch.cat([inputs["mask"], torch.zeros(B, 3, dtype=torch.bool)], dim=1)
    words[~mask] = unit(int((~mask).sum()), D, seed=8)        # refill old padding too
    padded = run(words, mask)
    torch.testing.assert_close(padded[0], base[0], atol=0, rtol=0)
    torch.testing.assert_close(padded[1], base[1], atol=0, rtol=0)
    torch.testing.assert_close(padded[2][:, :T][inputs["mask"]], base[2][inputs["mask"]],
                               atol=0, rtol=0)
    assert not padded[2][~mask].any()


def test_padding_tokens_change_nothing_through_the_heads():
    torch.manual_seed(0)
    heads = GroundingHeads(config()).double()
    levels, tokens, sentence = cached(dtype=torch.float64)
    mask = torch.from_numpy(MASK)

    def grads(tokens, mask):
        heads.zero_grad()
        out = step(heads, levels, tokens, mask, sentence)
        out["loss"].backward()
        return out["loss"].detach(), [p.grad.clone() for p in heads.parameters()]
    loss, base = grads(tokens, mask)
    noise = torch.randn(B, 2, *tokens.shape[2:], dtype=torch.float64) * 3
    longer = torch.cat([tokens, noise], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(B, 2, dtype=torch.bool)], dim=1)
    loss2, padded = grads(longer, longer_mask)
    assert loss2 == loss
    for a, b in zip(padded, base):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


# ============================================================== what receives gradients
def chosen_levels(heads, levels, tokens, mask, sentence, use_words, use_sentence) -> set[int]:
    """The cached levels some (text, image) pair of the trained terms selects (max over levels)."""
    with torch.no_grad():
        rows = torch.cat([heads.map_words(tokens)[mask]] * use_words +
                         [heads.map_sentence(sentence)] * use_sentence)
        _, chosen = best_level_scores(rows, heads.map_visual(levels))
    return {heads.config.used_levels[i] for i in chosen.unique().tolist()}


@pytest.mark.parametrize("use_words, use_sentence", [(True, True), (True, False), (False, True)])
def test_gradients_reach_the_mappings_only(use_words, use_sentence):
    torch.manual_seed(0)
    heads = GroundingHeads(config())
    with torch.no_grad():                 # zero biases make the word mix's gamma a no-op
        for name, p in heads.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    levels, tokens, sentence = cached(length=6)
    mask = torch.ones(B, 6, dtype=torch.bool)
    mask[0, 4:] = False
    frozen = [x.clone() for x in (*levels, tokens, sentence)]
    out = step(heads, levels, tokens, mask, sentence,
               use_words=use_words, use_sentence=use_sentence)
    out["loss"].backward()
    for x, before in zip((*levels, tokens, sentence), frozen):
        assert not x.requires_grad and x.grad is None and torch.equal(x, before)
    # a level no pair selects gets no gradient from the scores (max over levels), only from the
    # L2 penalty; so check the data exercise most levels, and those levels' parameters
    chosen = chosen_levels(heads, levels, tokens, mask, sentence, use_words, use_sentence)
    assert len(chosen) >= 2
    for name, p in heads.named_parameters():
        off = (name.startswith("word") and not use_words) or \
              (name.startswith("sentence") and not use_sentence)
        if off:
            assert p.grad is None, name
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if not name.startswith("visual.") or int(name.split(".")[1][5:]) in chosen:
            assert p.grad.abs().sum() > 0, name


def test_l2_penalty_covers_visual_kernels_only():
    heads = GroundingHeads(config())
    heads.l2_penalty().backward()
    for name, p in heads.named_parameters():
        is_kernel = name.startswith("visual.") and name.endswith(".weight")
        assert (p.grad is not None) == is_kernel, name
        if is_kernel:
            torch.testing.assert_close(p.grad, p.detach())


# ============================================================================ ablations
def count_layers(module):
    return (sum(isinstance(m, nn.Linear) for m in module.modules()),
            sum(isinstance(m, nn.LeakyReLU) for m in module.modules()))


def test_fixed_level_ablation_gives_one_level():
    heads = GroundingHeads(config(levels=[3]))
    levels, _, _ = cached()
    assert list(heads.visual) == ["level3"] and heads.num_levels == 1
    v = heads.map_visual(levels)
    assert v.shape == (B, N, 1, D)
    torch.testing.assert_close(heads.map_visual([levels[3]]), v)   # just the used level is fine


def test_layer_counts_of_the_linear_ablations():
    default = GroundingHeads(config())
    assert all(count_layers(m) == (3, 3) for m in default.visual.values())
    assert count_layers(default.word) == (2, 2) and count_layers(default.sentence) == (2, 2)
    linear_v = GroundingHeads(config(linear_visual=True, visual_widths=None))
    assert all(count_layers(m) == (1, 0) for m in linear_v.visual.values())
    assert count_layers(linear_v.word) == (2, 2)
    linear_t = GroundingHeads(config(linear_text=True))
    assert count_layers(linear_t.word) == (1, 0) and count_layers(linear_t.sentence) == (1, 0)
    assert all(count_layers(m) == (3, 3) for m in linear_t.visual.values())
    levels, tokens, sentence = cached()
    for heads in (linear_v, linear_t):           # still a working model
        out = step(heads, levels, tokens, torch.from_numpy(MASK), sentence)
        out["loss"].backward()
        assert all(p.grad is not None for p in heads.parameters())
    assert GroundingHeads(config(visual_widths=None)).config.conv_widths == [D, D, D]


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match=r"visual_widths ends with 12 but dim is 8"):
        config(visual_widths=[10, 12])
    assert issubclass(HeadsConfigError, ValueError)
    with pytest.raises(ValueError, match="out of range"):
        config(levels=[4])
    with pytest.raises(ValueError, match="twice"):
        config(levels=[1, 1])
    with pytest.raises(ValueError, match="linear_visual"):
        config(linear_visual=True)                     # three widths given for one conv
    with pytest.raises(ValueError, match="text_dim"):
        config(text_dim=0)
    cfg = config(levels=[2, 0])
    assert dataclasses.asdict(cfg)["levels"] == [2, 0] and cfg.used_levels == [2, 0]


def test_input_errors_are_clear(inputs):
    heads = GroundingHeads(config())
    levels, tokens, sentence = cached()
    with pytest.raises(ValueError, match="cached level 1 must be"):
        heads.map_visual([levels[0], levels[2], levels[2], levels[3]])
    with pytest.raises(ValueError, match="expected the 4 cached levels"):
        heads.map_visual(levels[:2])
    with pytest.raises(ValueError, match="another encoder"):
        heads.map_words(tokens[:, :, :2])
    with pytest.raises(ValueError, match="map_sentence expects"):
        heads.map_sentence(sentence[:, :1])
    mask = inputs["mask"].clone()
    mask[1] = False
    with pytest.raises(HeadsInputError, match=r"caption\(s\) \[1\]"):
        cross_scores(inputs["words"], mask, inputs["sentence"], inputs["visual"])
    with pytest.raises(UnknownNameError, match="Did you mean 'softmax'"):
        cross_scores(inputs["words"], inputs["mask"], None, inputs["visual"], heatmap="sotfmax")
    with pytest.raises(HeadsInputError, match="chunk"):
        cross_scores(inputs["words"], inputs["mask"], None, inputs["visual"], chunk=0)


# ================================================================== zero maps, dtypes
@pytest.mark.parametrize("heatmap", ["relu", "softmax"])
def test_all_zero_visual_map_is_finite(inputs, heatmap):
    words = inputs["words"].clone().requires_grad_()
    sentence = inputs["sentence"].clone().requires_grad_()
    visual = torch.zeros(B, N, L, D, dtype=torch.float64, requires_grad=True)
    R_w, R_s = cross_scores(words, inputs["mask"], sentence, visual, heatmap=heatmap)
    assert not R_s.any()                                       # attended feature 0 → score 0
    n_words = torch.from_numpy(MASK.sum(1)).double()
    torch.testing.assert_close(R_w, (torch.log(n_words) / GAMMA1)[:, None].expand(B, B))
    grounding_loss(R_w, R_s, None)["loss"].backward()
    for x in (words, sentence, visual):
        assert torch.isfinite(x.grad).all()
    out = word_grounding(words, inputs["mask"], visual, heatmap=heatmap)
    assert all(torch.isfinite(t).all() for t in out.values())


def test_all_zero_cached_maps_through_the_heads_are_finite():
    heads = GroundingHeads(config())
    levels, tokens, sentence = cached()
    zeros = [torch.zeros_like(x) for x in levels]
    assert not heads.map_visual(zeros).any()                   # zero biases at init: v = 0
    for heatmap in ("relu", "softmax"):
        heads.zero_grad()
        v = heads.map_visual(zeros)
        R_w, R_s = cross_scores(heads.map_words(tokens), torch.from_numpy(MASK),
                                heads.map_sentence(sentence), v, heatmap=heatmap)
        out = grounding_loss(R_w, R_s, heads.l2_penalty())
        out["loss"].backward()
        assert torch.isfinite(out["loss"])
        assert all(torch.isfinite(p.grad).all() for p in heads.parameters())


def test_dtypes_half_cache_and_bf16_autocast():
    heads = GroundingHeads(config())
    levels, tokens, sentence = cached(dtype=torch.float16)
    v, s, s_bar = heads(levels, tokens, sentence)
    assert v.dtype == s.dtype == s_bar.dtype == torch.float32
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(B, N, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v, s, s_bar = heads(levels, tokens, sentence)
        R_w, R_s = cross_scores(s, torch.from_numpy(MASK), s_bar, v)
        out = grounding_loss(R_w, R_s, heads.l2_penalty())
    assert R_w.dtype == R_s.dtype == out["loss"].dtype == torch.float32
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in heads.parameters())


# ================================================================================ memory
class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages allocated while active and still alive (a proxy for the CPU
    allocator's peak: every op's fresh output storage counts until it is freed)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._alive = {}

    def _free(self, key, nbytes):
        self._alive.pop(key, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = id(storage), storage.nbytes()
            if storage.data_ptr() in inputs or nbytes == 0 or key in self._alive:
                continue                                       # a view, in-place, or seen
            self._alive[key] = weakref.ref(storage, lambda _, k=key, n=nbytes: self._free(k, n))
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out


@pytest.fixture
def one_thread():
    """The numbers do not depend on threads; one keeps the test quick on a loaded machine (two
    OpenMP threads that share two busy cores spin-wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cross_scores_memory_stays_bounded(one_thread):
    """Proxy: the peak of live tensor storage allocated during forward + backward (a dispatch
    mode that counts every op's fresh output storage until it is freed), minus the gradients."""
    batch, length, grid, levels, dim = 32, 15, 18, 4, 256
    words = unit(batch, length, dim, seed=1, dtype=torch.float32).requires_grad_()
    sentence = unit(batch, dim, seed=2, dtype=torch.float32).requires_grad_()
    visual = unit(batch, grid * grid, levels, dim, seed=3, dtype=torch.float32).requires_grad_()
    mask = torch.ones(batch, length, dtype=torch.bool)
    assert auto_chunk(batch * length + batch, batch, grid * grid, levels, dim) < batch
    with PeakTensorMemory() as memory:
        R_w, R_s = cross_scores(words, mask, sentence, visual)
        grounding_loss(R_w, R_s, None)["loss"].backward()
    naive_attended = batch * batch * length * levels * dim * 4           # bytes, float32
    gradients = sum(x.grad.numel() * 4 for x in (words, sentence, visual))
    working = memory.peak - gradients        # the gradients themselves are unavoidable
    assert working < naive_attended / 4, (working, naive_attended)
