"""Expert-major map, tile lists and the tile-width policy."""

import pytest
import torch

from moetile import schedule


def test_expert_map_counts_offsets_and_order():
    ids = torch.tensor([[2, 0], [0, 1], [2, 1], [5, 0]], dtype=torch.int32)
    m = schedule.build_expert_map(ids, 4)  # id 5 is out of range -> bin 4
    assert m.counts.tolist() == [3, 2, 2, 0, 1]
    assert m.offsets.tolist() == [0, 3, 5, 7, 7, 8]
    assert m.sorted_pairs.tolist() == [1, 2, 7, 3, 5, 0, 4, 6]  # ascending pair id inside each expert


@pytest.mark.parametrize("width", schedule.WIDTHS)
def test_tiles_cover_every_pair_exactly_once(width, device):
    g = torch.Generator().manual_seed(width)
    E = 9
    ids = torch.randint(0, E, (301, 3), generator=g, dtype=torch.int32)
    ids[:150, 0] = 4  # one hot expert
    m = schedule.build_expert_map(ids.to(device), E)
    t = schedule.build_tiles(m, width)
    assert t.n_tiles == -(-ids.numel() // width) + E + 1
    covered = torch.zeros(ids.numel(), dtype=torch.int64)
    for e, r in zip(t.expert.tolist(), t.row.tolist(), strict=True):
        cnt = m.counts[e].item()
        if r >= cnt:
            continue
        start = m.offsets[e].item()
        covered[m.sorted_pairs[start + r : start + min(r + width, cnt)].long().cpu()] += 1
    assert (covered == 1).all()


def test_ds4_rule_and_env_cap(monkeypatch):
    monkeypatch.delenv(schedule.TILE_MAX_ENV, raising=False)
    assert schedule.choose_tile("ds4", 2048, 6, 256) == 128
    assert schedule.choose_tile("ds4", 192, 6, 256) == 64
    assert schedule.choose_tile("ds4", 100, 6, 256) == 32
    monkeypatch.setenv(schedule.TILE_MAX_ENV, "32")
    assert schedule.choose_tile("ds4", 2048, 6, 256) == 32
    assert schedule.choose_tile("auto", 8192, 6, 256) == 32
    assert schedule.choose_tile(128, 8192, 6, 256) == 128  # a forced width ignores the cap
    monkeypatch.setenv(schedule.TILE_MAX_ENV, "48")
    with pytest.raises(ValueError, match="MOETILE_TILE_MAX='48'"):
        schedule.choose_tile("ds4", 2048, 6, 256)


def test_auto_follows_rows_per_expert(monkeypatch):
    monkeypatch.delenv(schedule.TILE_MAX_ENV, raising=False)
    assert schedule.choose_tile("auto", 1, 6, 256) == 16
    assert schedule.choose_tile("auto", 512, 6, 256) == 16  # 12 rows per expert
    assert schedule.choose_tile("auto", 2048, 6, 256) == 64  # 48
    assert schedule.choose_tile("auto", 8192, 6, 256) == 256  # 192
    assert schedule.choose_tile("auto", 4096, 6, 256) == 128  # 96
    # one expert (the shared expert): a quarter of its rows per tile
    assert [schedule.choose_tile("auto", T, 1, 1) for T in (8, 128, 512, 2048, 8192)] == [16, 32, 128, 256, 256]


@pytest.mark.parametrize("bad", [0, 48, 512, 8, "wide", True, 3.0])
def test_bad_tile_arguments(bad):
    with pytest.raises((ValueError, TypeError)):
        schedule.choose_tile(bad, 128, 6, 256)


@pytest.mark.parametrize("form", ["Q4_K", "Q2_K", "IQ2_XXS/fast", "IQ2_XXS/compact", "Q8_0"])
@pytest.mark.parametrize("width", schedule.WIDTHS)
def test_mm_config_matches_width_and_divides_n(form, width):
    for n in (64, 192, 2048, 4096):
        for fused in (False, True):
            cfg = schedule.mm_config(width, n, form, fused=fused)
            assert cfg.block_m == width and cfg.asm
            assert cfg.block_n == 64 or n % cfg.block_n == 0
            assert cfg.block_k in (64, 128, 256)
    assert not schedule.mm_config(width, 64, form, interpreter=True).asm


def test_two_width_classes_cover_every_pair_once(device):
    """The narrow and the wide tile lists of a two-width plan split the experts by row count; every
    pair (invalid ids included, in the narrow class) is in exactly one tile of one list."""
    g = torch.Generator().manual_seed(0)
    E, T, k = 8, 300, 2
    ids = torch.randint(0, E, (T, k), generator=g, dtype=torch.int32)
    ids[:, 0] = 2  # 300+ rows on expert 2
    ids[:7, 1] = E + 3  # invalid ids
    m = schedule.build_expert_map(ids.to(device), E)
    plan = schedule.LayerPlan("prefill", 16, "split", wide=256, wide_rows=33)
    covered = torch.zeros(ids.numel(), dtype=torch.int64)
    for tiles, _ in plan.tile_lists(m):
        for e, r in zip(tiles.expert.tolist(), tiles.row.tolist(), strict=True):
            cnt = m.counts[e].item()
            if r >= cnt:
                continue
            assert (cnt >= 33) == (tiles.width == 256) or e == E
            start = m.offsets[e].item()
            covered[m.sorted_pairs[start + r : start + min(r + tiles.width, cnt)].long().cpu()] += 1
    assert (covered == 1).all()
    assert schedule.plan_layer(T, k, E, "Q4_K").wide == 256
    assert schedule.plan_layer(T, k, E, "Q4_K", tile=16).wide == 0  # a forced width: one class


@pytest.mark.parametrize("E", [1, 6, 8, 256])
@pytest.mark.parametrize("width", [16, 64, 256])
def test_tile_list_kernel_matches_reference(E, width, device):
    """The one-launch tile list equals the torch reference, for one class and for each class of a
    two-width split, with empty experts, invalid ids and E + 1 not a power of two."""
    from moetile.reference import tile_list_ref

    g = torch.Generator().manual_seed(E * width)
    T, k = 300, min(3, E)
    ids = torch.randint(0, E, (T, k), generator=g, dtype=torch.int32)
    ids[:5, 0] = E + 1  # invalid
    if E > 1:
        ids[:, 0] = torch.where(torch.rand(T, generator=g) < 0.7, 0, ids[:, 0])  # a crowded expert
    m = schedule.build_expert_map(ids.to(device), E)
    for lo, hi in ((0, None), (0, 2 * width + 1), (2 * width + 1, None)):
        t = schedule.build_tiles(m, width, lo, hi)
        e_ref, r_ref = tile_list_ref(m.counts, width, t.n_tiles, lo, hi)
        assert torch.equal(t.expert.cpu().long(), e_ref), (lo, hi)
        assert torch.equal(t.row.cpu().long(), r_ref), (lo, hi)


@pytest.mark.parametrize("T", [1, 7, 300])
def test_single_expert_map_is_the_sorted_map(T, device):
    """The shared expert's map, built without a sort, is the map build_expert_map gives."""
    got = schedule.single_expert_map(T, device)
    want = schedule.build_expert_map(torch.zeros(T, 1, dtype=torch.int32, device=device), 1)
    for f in ("sorted_pairs", "offsets", "counts"):
        a, b = getattr(got, f), getattr(want, f)
        assert a.dtype == b.dtype and torch.equal(a, b), f
    assert (got.num_tokens, got.top_k, got.num_experts) == (T, 1, 1)
