"""Pretraining losses against values computed by hand on small tensors."""

import math

import pytest
import torch

from trainer import losses as L


def close(a, b, tol=1e-5):
    return abs(float(a) - float(b)) < tol


def test_itm_loss_is_two_way_cross_entropy():
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    itm = torch.tensor([1, 1])
    # row 0: -log(1/2); row 1: -log(3/4)
    assert close(L.itm_loss(logits, itm), (math.log(2) + math.log(4 / 3)) / 2)


def test_cit_loss_symmetric_infonce_over_matched_pairs_only():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    text = torch.stack([e1, e2, e1])
    image = torch.stack([e1, e2, e2])  # row 2 is a mismatched pair
    expected = math.log(1 + math.exp(-1))  # logits [[1,0],[0,1]] at temperature 1 (clamped 0.5)
    got = L.cit_loss(text, image, 1.0, matched=torch.tensor([1, 1, 0]), temp_max=1.0)
    assert close(got, expected)
    # the mismatched row would change the value if it were used
    assert not close(L.cit_loss(text, image, 1.0, temp_max=1.0), expected)
    # temperature 10 is clamped to the default maximum 0.5: logits doubled
    clamped = L.cit_loss(text, image, 10.0, matched=torch.tensor([1, 1, 0]))
    assert close(clamped, math.log(1 + math.exp(-2)))


def test_cit_loss_is_symmetric_in_text_and_image():
    torch.manual_seed(0)
    t = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    i = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    assert close(L.cit_loss(t, i, 0.07), L.cit_loss(i, t, 0.07))


def test_cit_loss_without_matched_pairs_is_zero_but_differentiable():
    t = torch.randn(2, 3, requires_grad=True)
    temp = torch.tensor(0.07, requires_grad=True)
    loss = L.cit_loss(t, t.detach(), temp, matched=torch.tensor([0, 0]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and t.grad is not None and temp.grad is not None


def mask_set(box, grid=(4, 4), min_cover=0.5):
    m = L.box_patch_mask(torch.tensor([box]), grid, min_cover)[0]
    return set(torch.nonzero(m).flatten().tolist())


def test_box_patch_mask_known_boxes():
    # 4x4 grid: patch (r, c) covers x in [c/4, (c+1)/4), y in [r/4, (r+1)/4), index r*4 + c
    assert mask_set([0.0, 0.0, 1.0, 1.0]) == set(range(16))
    assert mask_set([0.0, 0.0, 0.5, 0.5]) == {0, 1, 4, 5}
    assert mask_set([0.5, 0.75, 1.0, 1.0]) == {14, 15}
    # half of row 1 is covered: in at min_cover 0.5, out at 0.6
    assert mask_set([0.0, 0.0, 0.5, 0.375]) == {0, 1, 4, 5}
    assert mask_set([0.0, 0.0, 0.5, 0.375], min_cover=0.6) == {0, 1}
    # non-square grid (2 rows, 3 cols)
    assert mask_set([0.0, 0.5, 0.34, 1.0], grid=(2, 3)) == {3}


def test_box_patch_mask_box_smaller_than_a_patch_takes_its_centre_patch():
    assert mask_set([0.1, 0.1, 0.2, 0.2]) == {0}  # centre (0.15, 0.15)
    assert mask_set([0.30, 0.55, 0.35, 0.60]) == {9}  # centre (0.325, 0.575): row 2, col 1
    assert mask_set([0.99, 0.99, 1.0, 1.0]) == {15}
    assert mask_set([0.6, 0.6, 0.6, 0.6]) == {10}  # degenerate box: a point
    # a box straddling four patches but covering too little of each: its centre patch only
    assert mask_set([0.2, 0.2, 0.3, 0.3]) == {5}


def test_pool_patches_means_masked_states():
    states = torch.arange(8.0).view(1, 4, 2)  # patches [0,1] [2,3] [4,5] [6,7]
    masks = torch.tensor([[[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]]]).bool()
    pooled = L.pool_patches(states, masks)
    assert torch.equal(pooled[0, 0], torch.tensor([2.0, 3.0]))
    assert torch.equal(pooled[0, 1], torch.tensor([6.0, 7.0]))
    assert torch.equal(pooled[0, 2], torch.tensor([0.0, 0.0]))  # empty (padding) stays finite


def test_dense_soft_labels_renormalise_topk_rows():
    idx = torch.tensor([[2, 0], [0, 0]])
    prob = torch.tensor([[0.3, 0.1], [0.0, 0.0]])
    dense = L.dense_soft_labels(idx, prob, 4, "renormalise")
    assert torch.allclose(dense[0], torch.tensor([0.25, 0.0, 0.75, 0.0]))
    assert torch.equal(dense[1], torch.zeros(4))  # padding row


def test_dense_soft_labels_spread_the_leftover_mass_by_default():
    # a full distribution over 5 classes, truncated to its top 2 as label-objects stores it
    q = torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05])
    top, idx = torch.topk(q, 2)
    dense = L.dense_soft_labels(idx[None], top[None], 5)[0]
    # kept: 0.5 + 0.3; the other 0.2 spread over the 3 classes that were not kept
    assert torch.allclose(dense, torch.tensor([0.2 / 3, 0.5, 0.2 / 3, 0.3, 0.2 / 3]))
    assert dense.sum().item() == pytest.approx(1.0)
    entropy = lambda p: -(p * p.clamp(min=1e-12).log()).sum()  # noqa: E731
    sharp = L.dense_soft_labels(idx[None], top[None], 5, "renormalise")[0]
    assert entropy(sharp) < entropy(q) <= entropy(dense) + 1e-6  # the max-entropy completion
    # padding rows stay zero; k = all classes keeps q exactly; hard labels are the same argmax
    pad = L.dense_soft_labels(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2), 5)
    assert torch.equal(pad, torch.zeros(1, 5))
    full = L.dense_soft_labels(torch.arange(5)[None], q[None], 5)[0]
    assert torch.allclose(full, q)
    assert torch.equal(L.hard_labels(dense[None]), L.hard_labels(sharp[None]))
    with pytest.raises(ValueError, match="label_mass"):
        L.dense_soft_labels(idx[None], top[None], 5, "other")


def test_hard_labels_one_hot_argmax():
    q = torch.tensor([[0.2, 0.5, 0.3], [0.0, 0.0, 0.0]])
    assert torch.equal(L.hard_labels(q), torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))


def test_soft_cross_entropy_hand_values_and_masking():
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)], [5.0, -5.0]])
    q = torch.tensor([[0.25, 0.75], [0.5, 0.5], [0.0, 1.0]])
    row0 = math.log(2)
    row1 = 0.5 * math.log(4) + 0.5 * math.log(4 / 3)
    valid = torch.tensor([True, True, False])
    assert close(L.soft_cross_entropy(logits, q, valid), (row0 + row1) / 2)
    assert close(L.coe_loss(logits[None], q[None], valid[None]), (row0 + row1) / 2)
    assert close(L.cir_loss(logits[:1], q[:1]), row0)


def test_pretrain_loss_weights_and_switches():
    torch.manual_seed(0)
    out = {
        "itm_logits": torch.randn(2, 2),
        "text_emb": torch.nn.functional.normalize(torch.randn(2, 4), dim=-1),
        "image_emb": torch.nn.functional.normalize(torch.randn(2, 4), dim=-1),
        "temp": torch.tensor(0.07),
        "ent_logits": torch.randn(2, 1, 3),
        "rel_logits": torch.randn(2, 5),
    }
    batch = {
        "itm": torch.tensor([1, 0]),
        "box_mask": torch.tensor([[True], [True]]),
        "ent_idx": torch.tensor([[[0, 2]], [[1, 0]]]),
        "ent_prob": torch.tensor([[[0.6, 0.2]], [[0.5, 0.1]]]),
        "rel_idx": torch.tensor([[4, 1], [0, 2]]),
        "rel_prob": torch.tensor([[0.5, 0.5], [0.9, 0.1]]),
    }
    lambdas = {"itm": 1.0, "cit": 0.5, "coe": 2.0, "cir": 1.0}
    total, parts = L.pretrain_loss(out, batch, lambdas)
    assert set(parts) == {"itm", "cit", "coe", "cir"}
    assert close(total, sum(lambdas[k] * parts[k] for k in parts))
    # COE / CIR average over both pairs (eqs. 8, 10): the mismatched row's labels are its
    # image's; with align_pairs="matched" over the matched row 0 only
    q_rel = torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.5], [0.9, 0.0, 0.1, 0.0, 0.0]])
    assert close(parts["cir"], L.soft_cross_entropy(out["rel_logits"], q_rel))
    assert close(parts["cit"], 0.0)  # one matched pair: log(1) = 0
    _, matched = L.pretrain_loss(out, batch, lambdas, align_pairs="matched")
    assert close(matched["cir"], L.soft_cross_entropy(out["rel_logits"][:1], q_rel[:1]))
    assert close(matched["itm"], parts["itm"]) and close(matched["cit"], parts["cit"])
    q_ent = L.dense_soft_labels(batch["ent_idx"], batch["ent_prob"], 3)
    assert close(parts["coe"], L.soft_cross_entropy(out["ent_logits"], q_ent))
    assert close(matched["coe"], L.soft_cross_entropy(out["ent_logits"][:1], q_ent[:1]))
    # the rows each loss averages over: pairs, matched pairs, aligned objects, aligned pairs
    assert L.batch_totals(batch).tolist() == [2.0, 1.0, 2.0, 2.0]
    assert L.batch_totals(batch, "matched").tolist() == [2.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="align_pairs"):
        L.batch_totals(batch, "some")
    _, off = L.pretrain_loss(out, batch, {"itm": 1.0, "cit": 0.0, "coe": 0.0, "cir": 0.0})
    assert set(off) == {"itm"}
    _, hard = L.pretrain_loss(out, batch, {"cir": 1.0}, hard=True)
    # a tie goes to the first maximum
    q_hard = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    assert close(hard["cir"], L.soft_cross_entropy(out["rel_logits"], q_hard))
    with pytest.raises(ValueError):
        L.pretrain_loss(out, batch, {"itm": 0.0})
