"""Expert parallelism (moetile.distributed) on CPU: gloo process groups of 1, 2 and 4 ranks spawned
with torch.multiprocessing, kernels through the interpreter, every rank's output bit-identical to
moe_forward on the unsharded layer for the same tokens (deterministic plans), with uneven and empty
ranks, skewed routing, a hash layer, the mat-vec path, and the mismatch errors."""

from __future__ import annotations

import socket
from dataclasses import replace
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_rows_close, use_row_invariant_dot

from moetile import schedule
from moetile.distributed import EPMoE, ShardedMoE, _decode_max, _wire_dtype, check_agreement, ep_moe_forward, shard
from moetile.moe import MoEWeights, moe_forward
from moetile.ops.router import route
from moetile.quant import random_blocks

E, H, F, K_TOP = 8, 256, 256, 2


def _weights(seed=0, F=F, hash_rows=0) -> MoEWeights:
    g = torch.Generator().manual_seed(seed)
    kw = dict(shared_gate=random_blocks("Q8_0", (F, H), g), shared_up=random_blocks("Q8_0", (F, H), g),
              shared_down=random_blocks("Q8_0", (H, F), g))
    if hash_rows:
        kw["hash_table"] = torch.stack([torch.randperm(E, generator=g)[:K_TOP] for _ in range(hash_rows)]).int()
    return MoEWeights(random_blocks("Q4_K", (E, F, H), g), random_blocks("Q4_K", (E, F, H), g),
                      random_blocks("Q4_K", (E, H, F), g), router=(torch.randn(E, H, generator=g) * 0.1).half(),
                      bias=torch.rand(E, generator=g) * 0.05, top_k=K_TOP, **kw)


def _worker(rank: int, world: int, port: int, case: dict) -> None:
    """One rank. On a GPU machine the ranks share its GPUs (the real kernels; gloo moves the rows
    through host memory); on CPU the kernels run through the interpreter."""
    # a rank left waiting in a collective (a regression of the agreement checks) fails in 2 min, not 30
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        _case(rank, world, case)
        dist.barrier()  # no rank tears gloo down while another still talks to it (seen: SIGABRT under load)
    finally:
        dist.destroy_process_group()


def _case(rank: int, world: int, case: dict) -> None:
    """The body of one rank's case (its checks raise; the caller tears the group down)."""
    use_row_invariant_dot()
    dev = f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
        torch.cuda.set_device(dev)
    if case.get("mismatch"):  # rank 1 loads a layer with another F: every rank must refuse
        w = _weights(F=F if rank != 1 else 2 * F).to(dev)
        with pytest.raises(ValueError, match="disagree.*F differs"):
            EPMoE(w)
        return
    if case.get("bad_gguf"):  # rank 1 cannot open its file: both ranks raise, neither waits
        from moetile.moe import DS4MoE

        path = case["bad_gguf"] if rank == 0 else case["bad_gguf"] + ".missing"
        err, match = (FileNotFoundError, "missing") if rank == 1 else (ValueError, r"rank\(s\) \[1\] failed")
        with pytest.raises(err, match=match):
            DS4MoE.from_gguf(path, 0, device=dev, group=dist.group.WORLD)
        return
    if case.get("agreed_failures"):  # what one rank alone gets wrong: every rank raises, none waits
        w = _weights().to(dev)
        other = r"rank\(s\) \[1\] failed"
        with pytest.raises(ValueError, match="form" if rank == 1 else other):
            EPMoE(w, form="bogus" if rank == 1 else "auto")
        with pytest.raises(ValueError, match="router bytes differs"):  # another layer of the same shapes
            EPMoE(_weights(seed=rank).to(dev))
        layer = EPMoE(w, deterministic=rank == 1)
        with pytest.raises(ValueError, match="disagree on deterministic mode"):
            layer(torch.randn(3, H, device=dev))
        with pytest.raises(TypeError if rank == 1 else ValueError, match="ShardedMoE" if rank == 1 else "failed"):
            ep_moe_forward(torch.randn(3, H, device=dev), w if rank == 1 else layer.sharded)
        return
    w = _weights(hash_rows=16 if case.get("hash") else 0).to(dev)
    if case.get("bad_x"):  # rank 1 passes a wrong hidden size: both raise before any exchange
        layer = EPMoE(w)
        x = torch.randn(3, H if rank == 0 else H // 2, device=dev)
        err = "x must be" if rank == 1 else r"rank\(s\) \[1\] failed their input checks"
        with pytest.raises(ValueError, match=err):
            layer(x)
        return
    sizes = case["sizes"]
    T_all = sum(sizes)
    pool = (torch.randn(T_all, H, generator=torch.Generator().manual_seed(7)) * 2).to(dev)
    tok = torch.randint(0, 16, (T_all,), generator=torch.Generator().manual_seed(8)).to(dev)
    first = sum(sizes[:rank])
    mine = slice(first, first + sizes[rank])
    kw = dict(path=case.get("path", "auto"), deterministic=True)
    if case.get("gguf"):  # each rank loads only its experts from the file
        from moetile.moe import DS4MoE

        layer = DS4MoE.from_gguf(case["gguf"], 0, device=dev, group=dist.group.WORLD, **kw)
        assert isinstance(layer, EPMoE) and layer.sharded.local.gate.shape[0] == E // world
        whole = DS4MoE.from_gguf(case["gguf"], 0, device=dev, **kw)
        assert torch.equal(layer(pool[mine]), whole(pool)[mine]), f"rank {rank}: GGUF layer"
        return
    if case.get("skewed"):  # every pair on the experts of rank 0
        ids = torch.stack([torch.randperm(E // world, generator=torch.Generator().manual_seed(t))[:K_TOP]
                           for t in range(T_all)]).int().to(dev)
        rw = torch.rand(T_all, K_TOP, generator=torch.Generator().manual_seed(9)).to(dev)
        out = ep_moe_forward(pool[mine], shard(w, rank, world), topk_ids=ids[mine], topk_weights=rw[mine], **kw)
        ref = moe_forward(pool, w, topk_ids=ids, topk_weights=rw, **kw)
    elif case.get("mixed_dtypes"):  # rank 0 passes bf16, the others f32; the same bits as one process
        pool = pool.bfloat16().float()
        x = pool[mine].bfloat16() if rank == 0 else pool[mine]
        out = EPMoE(w, **kw)(x)
        ref = moe_forward(pool, w, **kw)
    elif case.get("auto"):  # automatic plans: widths follow each rank's counts, rows may travel as f32
        out = EPMoE(w, path=case.get("path", "auto"))(pool[mine])
        ref = moe_forward(pool, w, path=case.get("path", "auto"))
        assert_rows_close(out, ref[mine], 2e-3, f"rank {rank}")
        return
    else:
        layer = EPMoE(w, **kw)
        out = layer(pool[mine], tok[mine] if case.get("hash") else None)
        ref = moe_forward(pool, w, tok if case.get("hash") else None, **kw)
    assert out.shape == (sizes[rank], H) and out.dtype == torch.float32
    assert not torch.isnan(out).any()
    assert torch.equal(out, ref[mine]), f"rank {rank}: max diff {(out - ref[mine]).abs().max():.3e}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = {
    "one rank": (1, dict(sizes=[7])),
    "two ranks, uneven": (2, dict(sizes=[5, 4])),
    "four ranks, one empty, mat-vec": (4, dict(sizes=[3, 0, 5, 1], path="decode")),
    "skewed onto rank 0": (2, dict(sizes=[4, 5], skewed=True)),
    "hash layer": (2, dict(sizes=[6, 3], hash=True)),
    "ranks disagree": (2, dict(mismatch=True)),
    "one rank fails its input checks": (2, dict(bad_x=True)),
    "one rank's construction, layer or mode differs": (2, dict(agreed_failures=True)),
    "mixed activation dtypes": (2, dict(sizes=[3, 4], mixed_dtypes=True)),
    "automatic plans": (2, dict(sizes=[9, 2], auto=True)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_expert_parallel_matches_one_process(name):
    world, case = CASES[name]
    mp.spawn(_worker, args=(world, _free_port(), case), nprocs=world, join=True)


def test_expert_parallel_layer_from_gguf(tmp_path):
    """DS4MoE.from_gguf(..., group=) on 2 ranks: each holds E/2 experts, outputs equal the whole layer's."""
    from moetile.gguf_io import MoELayerTensors, write_moe_layers

    w = _weights()
    lt = MoELayerTensors(w.gate, w.up, w.down, w.router, w.bias, None, w.shared_gate, w.shared_up, w.shared_down)
    path = tmp_path / "layer.gguf"
    write_moe_layers(path, {0: lt}, metadata={"deepseek4.expert_used_count": K_TOP})
    mp.spawn(_worker, args=(2, _free_port(), dict(sizes=[4, 3], gguf=str(path))), nprocs=2, join=True)
    mp.spawn(_worker, args=(2, _free_port(), dict(bad_gguf=str(path))), nprocs=2, join=True)


def test_shard_keeps_views_of_its_experts():
    w = _weights()
    s = shard(w, 1, 4)
    assert isinstance(s, ShardedMoE) and s.local.dims == (2, H, F) and s.first == 2
    assert torch.equal(s.local.gate.data, w.gate.data[2:4])
    assert s.local.gate.data.data_ptr() == w.gate.data[2].data_ptr()  # a view: no copy
    assert s.router is w.router and s.local.shared_gate is w.shared_gate and s.top_k == K_TOP


@pytest.mark.parametrize("rank, world, match", [(0, 3, "do not split evenly"), (4, 4, "rank must be"),
                                                (0, 0, "world must be")])
def test_shard_refuses(rank, world, match):
    with pytest.raises(ValueError, match=match):
        shard(_weights(), rank, world)


def test_sharded_layer_is_checked():
    """A ShardedMoE built or changed by hand is checked like MoEWeights: the router, bias, hash table,
    k and scale must fit the whole layer (they had given NaN rows instead)."""
    s = shard(_weights(), 0, 2)
    for change, match in (({"router": torch.zeros(2 * E, H)}, "router"), ({"bias": torch.zeros(E + 1)}, "bias"),
                          ({"top_k": E + 1}, "top_k"), ({"scale": float("nan")}, "scale"),
                          ({"num_experts": 3 * E}, "local experts"), ({"hash_table": torch.zeros(4, 3)}, "hash_table")):
        with pytest.raises(ValueError, match=match):
            replace(s, **change)
    with pytest.raises(ValueError, match="scale"):
        replace(_weights(), scale=float("nan"))


def test_wrong_group_is_refused(tmp_path):
    """A shard used in a group of another size is refused before any exchange."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        s = shard(_weights(), 0, 2)
        with pytest.raises(ValueError, match="shard 0 of 2"):
            ep_moe_forward(torch.randn(2, H), s)
        with pytest.raises(ValueError, match="holds shard 0 of 2"):
            check_agreement(s)
    finally:
        dist.destroy_process_group()


def test_rows_travel_as_f16_only_to_prefill_plans():
    """The wire dtype, from the gathered table (counts [src][dst], then each rank's decode limit:
    _decode_max): f16 only when every receiving rank's plan reads f16 rows."""
    big, small = 5000, 1  # pairs: far above and below the mat-vec's limit
    q4 = _decode_max("auto", False, "Q4_K")
    assert q4 == schedule.decode_max_tokens("Q4_K") and _decode_max("auto", True, "Q4_K") == -1
    assert _decode_max("prefill", False, "Q4_K") == -1
    assert _decode_max("decode", True, "Q4_K") > big
    assert _wire_dtype([[big, big, q4], [big, big, q4]]) == torch.float16
    assert _wire_dtype([[big, small, q4], [big, 0, q4]]) == torch.float32  # rank 1 gets 1 row
    assert _wire_dtype([[big, 0, q4], [big, 0, q4]]) == torch.float16  # rank 1 gets none
    assert _wire_dtype([[small, big, q4], [big, big, q4]]) == torch.float16  # own pairs stay home
    assert _wire_dtype([[big, big, q4], [small, big, q4]]) == torch.float32  # rank 0 gets 1 row
    assert _wire_dtype([[small, small, -1], [small, small, -1]]) == torch.float16  # forced prefill
    assert _wire_dtype([[big, big, q4], [big, big, 1 << 62]]) == torch.float32  # rank 1 forced decode
    # ranks of other forms: each receiver's own limit decides (q8x2: IQ2_XXS fast 64, compact 96)
    fast, compact = _decode_max("auto", False, "IQ2_XXS/fast"), _decode_max("auto", False, "IQ2_XXS/compact")
    lo, hi = sorted((fast, compact))
    assert lo < hi
    n = lo + 1  # above one limit, within the other
    assert _wire_dtype([[0, n, lo], [big, 0, hi]]) == torch.float32  # rank 1 (hi) decodes its n rows
    assert _wire_dtype([[0, big, lo], [n, 0, hi]]) == torch.float16  # rank 0 (lo) runs prefill on n


# ----------------------------------------------------------------------------- two GPUs, NCCL, DS4 shapes
def _nccl_worker(rank: int, world: int, port: int, model: str) -> None:
    """DS4 Flash shapes (E=256, k=6, H=4096, F=2048, shared Q8_0) on one GPU per rank over NCCL."""
    import os

    from helpers import row_rel_err

    from moetile.reference import ds4_moe_ref

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on shared hosts
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=dev)
    try:
        E_, H_, F_, k_ = 256, 4096, 2048, 6
        gq, dq = {"q2": ("IQ2_XXS", "Q2_K"), "q4": ("Q4_K", "Q4_K")}[model]
        g = torch.Generator(device=dev).manual_seed(0)  # the same seed on every rank: the same layer
        w = MoEWeights(random_blocks(gq, (E_, F_, H_), g, dev), random_blocks(gq, (E_, F_, H_), g, dev),
                       random_blocks(dq, (E_, H_, F_), g, dev), router=(torch.randn(E_, H_, device=dev, generator=g)
                                                                         * 0.02).half(),
                       bias=torch.rand(E_, device=dev, generator=g) * 0.01,
                       shared_gate=random_blocks("Q8_0", (F_, H_), g, dev),
                       shared_up=random_blocks("Q8_0", (F_, H_), g, dev),
                       shared_down=random_blocks("Q8_0", (H_, F_), g, dev), top_k=k_).packed()
        pool = torch.randn(4200, H_, device=dev, generator=g)
        s = shard(w, rank, world)
        for sizes in ([300, 517], [1, 3], [2048, 0], [0, 5]):  # deterministic plans: the same bits
            first = sum(sizes[:rank])
            mine = slice(first, first + sizes[rank])
            out = ep_moe_forward(pool[mine], s, deterministic=True)
            ref = moe_forward(pool[: sum(sizes)], w, deterministic=True)[mine]
            assert torch.equal(out, ref), f"{model} rank {rank} sizes {sizes}: {(out - ref).abs().max():.3e}"
        ids = torch.stack([torch.randperm(E_ // world, device=dev, generator=g)[:k_] for _ in range(600)]).int()
        rw = torch.rand(600, k_, device=dev, generator=g)  # skewed: every pair on rank 0's experts
        mine = slice(rank * 300, (rank + 1) * 300)
        out = ep_moe_forward(pool[mine], s, topk_ids=ids[mine], topk_weights=rw[mine], deterministic=True)
        assert torch.equal(out, moe_forward(pool[:600], w, topk_ids=ids, topk_weights=rw, deterministic=True)[mine])
        for sizes in ([1, 4], [2048, 1500]):  # automatic plans (decode rows travel as f32): within the bound
            first = sum(sizes[:rank])
            mine = slice(first, first + sizes[rank])
            out = EPMoE(s, validate=False)(pool[mine])
            x = pool[mine][:64]
            ids, rw = route(x, w.router, bias=w.bias, k=k_)
            ref = ds4_moe_ref(x, w, topk_ids=ids, topk_weights=rw, round_f16=True)
            err = row_rel_err(out[:64], ref).max().item()
            assert err < 1e-3, f"{model} rank {rank} sizes {sizes}: {err:.2e}"
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2 or not dist.is_nccl_available(), reason="needs 2 GPUs and NCCL")
@pytest.mark.parametrize("model", ["q2", "q4"])
def test_expert_parallel_nccl_ds4_shapes(model):
    """Two GPUs over NCCL at DS4 Flash shapes: bit-identical to moe_forward on one GPU with
    deterministic plans (uneven, decode-sized, empty ranks, skewed routing); automatic plans within
    the prefill bound of the float64 reference."""
    mp.spawn(_nccl_worker, args=(2, _free_port(), model), nprocs=2, join=True)
