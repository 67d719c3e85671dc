"""Expert parallelism on torch.distributed: each rank holds E/W of a layer's routed experts (router,
bias, hash table and shared expert replicated); a rank's tokens stay on it, and each (token, slot)
pair's row travels to the rank of its expert and its result back, with ``all_to_all_single``. Only
torch.distributed collectives (NCCL on GPUs, gloo on CPUs): no transport of our own.

Letters: W ranks, T tokens of this rank, k slots, P = T*k pairs, E experts of the layer, n = E/W
experts per rank, R pairs this rank computes, H hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from . import moe, schedule
from .moe import MoEWeights
from .ops._launch import use_kernel
from .ops.elementwise import combine_slots
from .ops.router import route
from .routing import check_scale


@dataclass(frozen=True)
class ShardedMoE:
    """Rank ``rank`` of ``world``'s part of one layer: ``local`` holds its experts [first, first + n)
    (and the shared expert); ``router``/``bias``/``hash_table``, ``top_k``, ``scale`` are the whole
    layer's, replicated."""

    local: MoEWeights
    num_experts: int
    rank: int
    world: int
    router: torch.Tensor | None
    bias: torch.Tensor | None
    hash_table: torch.Tensor | None
    top_k: int
    scale: float

    def __post_init__(self):
        if not isinstance(self.local, MoEWeights):
            raise TypeError(f"ShardedMoE.local must be MoEWeights, got {type(self.local).__name__}")
        E, (n, H, _) = self.num_experts, self.local.dims
        if not (isinstance(self.world, int) and isinstance(self.rank, int) and 0 <= self.rank < self.world):
            raise ValueError(f"ShardedMoE: rank {self.rank!r} of world {self.world!r}")
        if E != n * self.world:
            raise ValueError(f"ShardedMoE: {n} local experts x {self.world} ranks != {E} experts")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= E:
            raise ValueError(f"ShardedMoE: top_k must be an int in [1, {E}], got {self.top_k!r}")
        check_scale(self.scale)
        for name, want in (("router", (E, H)), ("bias", (E,))):
            t = getattr(self, name)
            if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != want):
                raise ValueError(f"ShardedMoE: {name} must be a tensor of shape {want}, got "
                                 f"{tuple(getattr(t, 'shape', ())) or type(t).__name__}")
        t = self.hash_table
        if t is not None and (not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != self.top_k):
            raise ValueError(f"ShardedMoE: hash_table must be a [V, top_k={self.top_k}] tensor")

    @property
    def first(self) -> int:
        return self.rank * self.local.dims[0]


def shard(weights: MoEWeights, rank: int, world: int) -> ShardedMoE:
    """Rank ``rank``'s part of ``weights``: experts [rank*E/W, (rank+1)*E/W) as views (no copy)."""
    E = weights.dims[0]
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be an int in [0, {world}), got {rank!r}")
    if E % world:
        raise ValueError(f"{E} experts do not split evenly over {world} ranks (E % world = {E % world})")
    n = E // world
    a, b = rank * n, (rank + 1) * n
    local = MoEWeights(
        weights.gate.experts(a, b), weights.up.experts(a, b), weights.down.experts(a, b),
        shared_gate=weights.shared_gate, shared_up=weights.shared_up, shared_down=weights.shared_down,
        top_k=1, scale=weights.scale, clamp=weights.clamp,
    )
    return ShardedMoE(local, E, rank, world, weights.router, weights.bias, weights.hash_table, weights.top_k,
                      weights.scale)


def check_agreement(sharded: ShardedMoE | None, group=None, failure: BaseException | None = None) -> None:
    """All ranks hold parts of the same layer (E, k, H, F, n, quant types and forms, shared expert,
    hash table, scale, clamp), and the group is the one the layer was sharded for: one small
    all_gather. A mismatch raises the same ValueError on every rank (never a hang, never a wrong
    answer). A rank whose own loading failed calls it with ``failure`` (and no shard): it re-raises
    that, and every other rank raises too."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if sharded is None:
        fields, mine, where = _digest_fields(), [0.0] * len(_digest_fields()), None
        shard_of = [-1, -1]
    else:
        fields, mine = _digest(sharded)
        where, shard_of = sharded.local.gate.device, [sharded.rank, sharded.world]
    t = torch.tensor(mine + [rank, world, *shard_of, float(failure is not None)], dtype=torch.float64,
                     device=_comm_device(where, group))
    every = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(every, t, group=group)
    if failure is not None:
        raise failure
    rows = [e.cpu().tolist() for e in every]
    n = len(fields)
    failed = [int(r[n]) for r in rows if r[n + 4]]
    if failed:
        raise ValueError(f"expert-parallel layer: rank(s) {failed} failed to load their part (see their error)")
    problems = [f"{f} differs: " + ", ".join(f"rank {int(r[n])}: {r[i]:g}" for r in rows)
                for i, f in enumerate(fields) if len({r[i] for r in rows}) > 1]
    problems += [f"rank {int(r[n])} of {int(r[n + 1])} holds shard {int(r[n + 2])} of {int(r[n + 3])}"
                 for r in rows if (r[n], r[n + 1]) != (r[n + 2], r[n + 3])]
    if problems:
        raise ValueError("expert-parallel layer: the ranks disagree: " + "; ".join(problems))


_QTYPE_CODE = {"Q4_K": 1, "Q2_K": 2, "IQ2_XXS": 3, "Q8_0": 4}
_FORM_CODE = {"planar": 1, "fast": 2, "compact": 3}


def _digest_fields() -> list[str]:
    return ["E", "k", "H", "F", "n", "gate", "up", "down", "shared", "shared_F", "router", "bias", "hash_rows",
            "scale", "clamp", "router bytes", "bias bytes", "hash table bytes", "shared expert bytes"]


def _fingerprint(*ts) -> float:
    """An exact checksum of the bytes of tensors (PackedTensor/QuantTensor: their planes or blocks): the
    integer sums of all bytes and of every other byte, the same on every rank that holds the same
    values, whatever the device, memory layout or thread count (integer sums have no rounding)."""
    total = 0
    for t in ts:
        if t is None:
            continue
        parts = [t] if isinstance(t, torch.Tensor) else (
            [t.planes[k] for k in sorted(t.planes)] if hasattr(t, "planes") else [t.data])
        for p in parts:
            b = p.detach().contiguous().reshape(-1).view(torch.uint8)
            total = total * 31 + 3 * int(b.sum(dtype=torch.int64)) + int(b[::2].sum(dtype=torch.int64))
    return float(total % (1 << 52))  # exact in the float64 digest


def _digest(s: ShardedMoE) -> tuple[list[str], list[float]]:
    w = s.local
    E_loc, H, F = w.dims

    def code(t):
        if t is None:
            return 0.0
        return float(_QTYPE_CODE.get(t.qtype, 9) * 10 + _FORM_CODE.get(getattr(t, "form", "planar"), 0))

    d = {"E": s.num_experts, "k": s.top_k, "H": H, "F": F, "n": E_loc, "gate": code(w.gate), "up": code(w.up),
         "down": code(w.down), "shared": code(w.shared_gate), "shared_F": w.shared_gate.shape[0] if w.has_shared else 0,
         "router": 0 if s.router is None else 1, "bias": 0 if s.bias is None else 1,
         "hash_rows": 0 if s.hash_table is None else s.hash_table.shape[0], "scale": s.scale, "clamp": w.clamp,
         # the replicated tensors must be the same layer's on every rank, not only of the same shapes
         "router bytes": _fingerprint(s.router), "bias bytes": _fingerprint(s.bias),
         "hash table bytes": _fingerprint(s.hash_table),
         "shared expert bytes": _fingerprint(w.shared_gate, w.shared_up, w.shared_down)}
    assert list(d) == _digest_fields()
    return list(d), [float(v) for v in d.values()]


def _comm_device(device: torch.device | None, group) -> torch.device:
    """Where a collective's tensors live: CUDA tensors stay on their GPU where NCCL serves the group
    (alone or beside gloo); a group served by gloo alone exchanges through host memory."""
    backend = str(dist.get_backend(group))
    if "nccl" not in backend:
        return torch.device("cpu")
    if device is not None and device.type == "cuda":
        return device
    if "gloo" in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def ep_moe_forward(
    x: torch.Tensor,
    sharded: ShardedMoE,
    token_ids: torch.Tensor | None = None,
    *,
    group=None,
    topk_ids: torch.Tensor | None = None,
    topk_weights: torch.Tensor | None = None,
    include_shared: bool = True,
    tile="auto",
    path: str = "auto",
    gate_up: str = "auto",
    validate: bool = True,
    deterministic: bool | None = None,
    stage_hook=None,
) -> torch.Tensor:
    """f32 [T, H]: moe.moe_forward of this rank's tokens x [T, H] with the experts spread over the
    group (every rank calls it, T may differ per rank and be 0). The router runs here; the ranks
    all-gather their pair counts per destination (the only host sync), then each pair's row goes to
    its expert's rank with its local expert id and route weight (``all_to_all_single``; the rank's
    shared expert runs while they travel), the rank runs its experts on what it received with the
    same kernels, the results come back, and the k slots are summed in slot order plus the shared
    expert, as moe_forward does. Rows travel as f16 when every receiving rank's plan is the prefill
    path (whose kernels read f16 rows: the same bits as converting on arrival), else as f32; results
    travel as f32. Pairs for this rank's own experts never travel, and are computed while the others'
    results travel back. With a deterministic plan (``deterministic=True``) every pair is computed as in
    moe_forward on the unsharded layer, so the output is the same bits; with automatic plans the
    widths follow each rank's counts and agree within the width-to-width tolerance. One rank: the
    layer is moe_forward (nothing is exchanged). ``stage_hook(name)``, if given, is called after
    each stage: route (routing and the counts), send (rows out; the shared expert overlaps it),
    experts (the rows received, then this rank's own pairs while the results travel back), return
    (what is left of that trip), combine (slot sum)."""
    with moe.on_device(x):  # Triton launches on the current device: make it x's
        return _ep_moe_forward(x, sharded, token_ids, group, topk_ids, topk_weights, include_shared, tile, path,
                               gate_up, validate, deterministic, stage_hook)


def _ep_moe_forward(x, sharded, token_ids, group, topk_ids, topk_weights, include_shared, tile, path, gate_up,
                    validate, deterministic, stage_hook) -> torch.Tensor:
    hook = stage_hook or (lambda name: None)
    world = dist.get_world_size(group)
    if isinstance(sharded, ShardedMoE):
        dev = sharded.local.gate.device
    else:
        dev = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    plan_kw = dict(tile=tile, path=path, gate_up=gate_up)
    try:  # this rank's own checks and routing; a failure is announced to every rank before it raises
        if not isinstance(sharded, ShardedMoE):
            raise TypeError(f"ep_moe_forward takes this rank's ShardedMoE (moetile.distributed.shard), got "
                            f"{type(sharded).__name__}")
        w, ids, rw, dest, local_id, order, det = _prepare(x, sharded, token_ids, group, topk_ids, topk_weights,
                                                           validate, deterministic)
        plan_kw["deterministic"] = det
        schedule.plan_layer(1, 1, w.dims[0], schedule.form_key(w.gate), **plan_kw)  # bad overrides fail here
        send = torch.zeros(world + 2, dtype=torch.int64, device=dev)
        send[:world].scatter_add_(0, dest, torch.ones_like(dest))
        send[world] = _decode_max(path, det, schedule.form_key(w.gate))  # how this rank plans the rows it gets
        send[world + 1] = int(det)  # a rank computes others' pairs with its own plan: all must agree
        failure = None
    except (ValueError, TypeError, RuntimeError, LookupError) as exc:
        failure, send = exc, torch.full((world + 2,), -1, dtype=torch.int64, device=dev)
    if world == 1:
        if failure is not None:
            raise failure
        return moe.moe_forward(x, w, topk_ids=ids, topk_weights=rw, include_shared=include_shared,
                               validate=False, stage_hook=stage_hook, **plan_kw)
    cdev = _comm_device(dev, group)
    every = [torch.empty(world + 2, dtype=torch.int64, device=cdev) for _ in range(world)]
    dist.all_gather(every, send.to(cdev), group=group)  # per source rank: counts per destination, decode limit, det
    table = torch.stack(every).tolist()  # the one host sync; -1 counts: the rank failed its checks
    if failure is not None:
        raise failure
    bad = [r for r, row in enumerate(table) if row[0] < 0]
    if bad:
        raise ValueError(f"expert-parallel forward: rank(s) {bad} failed their input checks (see their error); "
                         "nothing was exchanged")
    if len({row[world + 1] for row in table}) > 1:
        raise ValueError("expert-parallel forward: the ranks disagree on deterministic mode (" + ", ".join(
            f"rank {r}: {bool(row[world + 1])}" for r, row in enumerate(table)) + "); nothing was exchanged")
    rank = dist.get_rank(group)
    send_l = table[rank][:world]
    recv_l = [row[rank] for row in table]
    n, H, F = w.dims
    T, k = ids.shape
    R = sum(recv_l)
    wire = _wire_dtype(table)
    hook("route")

    def start(t: torch.Tensor, rows: int, out_splits, in_splits, out: torch.Tensor | None = None):
        t = t.to(cdev).contiguous()
        buf = out if out is not None and cdev == dev else t.new_empty((rows, *t.shape[1:]))
        return buf, out, dist.all_to_all_single(buf, t, out_splits, in_splits, group=group, async_op=True)

    def finish(buf, out, work) -> torch.Tensor:
        work.wait()
        if out is None:
            return buf.to(dev)
        if buf is not out:
            out.copy_(buf)
        return out

    # Pairs for this rank's own experts never travel. The others go first; the shared expert runs while
    # they travel; the rows that arrived are computed first, and their results travel back while this
    # rank computes its own pairs. A pair's result lands in ys: own pairs first, then the others.
    at = [sum(send_l[:d]) for d in range(world)]
    own = order[at[rank]: at[rank] + send_l[rank]]  # [P_own] pair indices
    away = torch.cat([order[: at[rank]], order[at[rank] + send_l[rank]:]])  # [P - P_own], by destination
    send_r = [0 if d == rank else c for d, c in enumerate(send_l)]
    recv_r = [0 if d == rank else c for d, c in enumerate(recv_l)]
    xw = x.to(wire)
    meta = torch.stack([local_id, rw.reshape(-1).view(torch.int32)], 1)  # [P, 2]: local id, weight bits
    rows_in = start(xw[away // k], R - send_l[rank], recv_r, send_r)  # [R_in, H]
    meta_in = start(meta[away], R - send_l[rank], recv_r, send_r)
    shared = None
    if include_shared and w.has_shared and T:
        shared = moe._shared(x, w, plan_kw)  # while the rows travel
    rx, rmeta = finish(*rows_in), finish(*meta_in)
    hook("send")
    ry = _local_experts(rx, rmeta[:, 0].contiguous(), rmeta[:, 1].contiguous().view(torch.float32), w, plan_kw)
    ys = torch.empty((T * k, H), dtype=torch.float32, device=dev)
    n_own = own.numel()
    back = start(ry, T * k - n_own, send_r, recv_r, out=ys[n_own:])  # results home, while the own pairs run
    own_path = schedule.plan_layer(n_own, 1, n, schedule.form_key(w.gate), **plan_kw).path
    xo = xw if own_path == "prefill" and wire == torch.float16 else x  # the prefill kernels read f16 rows
    _local_experts(xo[own // k], local_id[own], rw.reshape(-1)[own], w, plan_kw, out=ys[:n_own])
    hook("experts")
    finish(*back)
    hook("return")
    out = torch.empty((T, H), dtype=torch.float32, device=dev)
    if T:
        where = torch.empty_like(order).index_copy_(0, torch.cat([own, away]), torch.arange(T * k, device=dev))
        combine_slots(ys, out, shared, rows=where.view(T, k))  # where[p]: the row of ys holding pair p
    hook("combine")
    return out


_FORCED_DECODE = 1 << 62


def _decode_max(path: str, det: bool, form: str) -> int:
    """The most rows this rank computes on the mat-vec path (schedule.plan_layer's rule): -1 when its
    plan is always the prefill path, _FORCED_DECODE when always the mat-vec."""
    if path == "decode":
        return _FORCED_DECODE
    if path == "prefill" or det:
        return -1
    return schedule.decode_max_tokens(form)


def _wire_dtype(table: list[list[int]]) -> torch.dtype:
    """f16 when every rank that receives rows from other ranks plans the prefill path for them (its
    kernels read f16 rows, so converting before the trip gives the same bits), else f32. Every rank
    computes this from the same gathered table: counts [src][dst] and, last, each rank's own decode
    limit (_decode_max), so ranks with other forms or overrides still agree."""
    world = len(table)
    for d in range(world):
        R = sum(row[d] for s, row in enumerate(table) if s != d)  # a rank's own pairs do not travel
        if R and R <= table[d][world]:
            return torch.float32
    return torch.float16


def _prepare(x, sharded: ShardedMoE, token_ids, group, topk_ids, topk_weights, validate, deterministic):
    """This rank's part before any exchange: checks, routing, and each pair's destination rank,
    local expert id and place in the send order."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if (rank, world) != (sharded.rank, sharded.world):
        raise ValueError(f"this is rank {rank} of {world}, but the weights are shard {sharded.rank} of "
                         f"{sharded.world}")
    if not use_kernel(x.device if isinstance(x, torch.Tensor) else torch.device("cpu"), "ep_moe_forward"):
        raise RuntimeError("ep_moe_forward runs the Triton kernels: CUDA tensors, or CPU tensors with "
                           "TRITON_INTERPRET=1 set before moetile is imported")
    w = sharded.local.packed()
    n, H, F = w.dims
    E = sharded.num_experts
    if E != n * world:
        raise ValueError(f"the shard holds {n} experts, but {E} experts over {world} ranks need {E // world}")
    moe._check_x(x, H, w.gate.device)
    det = schedule.resolve_deterministic(deterministic)
    T = x.shape[0]
    if topk_ids is None:
        if sharded.router is None:
            raise ValueError("no router weights: pass topk_ids and topk_weights")
        ids, rw = route(x, sharded.router, bias=sharded.bias, token_ids=token_ids, hash_table=sharded.hash_table,
                        k=sharded.top_k, scale=sharded.scale, validate=validate, deterministic=det)
    else:
        ids, rw = moe._check_ids(topk_ids, topk_weights, T, E, validate, x.device)
    flat = ids.reshape(-1).to(torch.int64)  # [P]
    ok = (flat >= 0) & (flat < E)
    dest = torch.where(ok, flat // n, torch.zeros_like(flat))  # a bad id goes to rank 0 as local id -1: NaN row
    local_id = torch.where(ok, flat - dest * n, torch.full_like(flat, -1)).to(torch.int32)
    order = torch.argsort(dest, stable=True)  # [P]: pairs grouped by destination rank
    return w, ids, rw, dest, local_id, order, det


def _local_experts(rx, rid, rrw, w: MoEWeights, plan_kw: dict, out: torch.Tensor | None = None) -> torch.Tensor:
    """f32 [R, H] (in ``out`` if given): route_w * down(SwiGLU(gate x, up x)) for each row rx [R, H]
    on its local expert rid [R] with route weight rrw [R]."""
    R = rx.shape[0]
    n, H, F = w.dims
    if R == 0:
        return out if out is not None else torch.empty((0, H), dtype=torch.float32, device=rx.device)
    plan = schedule.plan_layer(R, 1, n, schedule.form_key(w.gate), **plan_kw)
    return moe._routed(rx, w.gate, w.up, w.down, rid[:, None], rrw[:, None], plan, w.clamp, out=out).view(R, H)


class EPMoE(torch.nn.Module):
    """The DS4 layer with its routed experts spread over a process group. ``forward(x [T, H],
    token_ids [T] | None) -> f32 [T, H]`` is called by every rank with its own tokens (ep_moe_forward).
    Built from the whole layer (sharded here: this rank keeps views of its experts) or from a shard;
    construction checks that every rank holds part of the same layer (check_agreement)."""

    def __init__(self, weights: MoEWeights | ShardedMoE, group=None, *, form: str = "auto", tile="auto",
                 path: str = "auto", gate_up: str = "auto", deterministic: bool | None = None,
                 validate: bool = True):
        super().__init__()
        try:  # a rank that fails here tells the others (check_agreement) instead of leaving them waiting
            if isinstance(weights, MoEWeights):
                weights = shard(weights, dist.get_rank(group), dist.get_world_size(group))
            elif not isinstance(weights, ShardedMoE):
                raise TypeError(f"EPMoE takes MoEWeights or a ShardedMoE, got {type(weights).__name__}")
            sharded = replace(weights, local=weights.local.packed(form))
            schedule.check_overrides(tile, path, gate_up)
            det = schedule.resolve_deterministic(deterministic)
        except (ValueError, TypeError, LookupError, RuntimeError) as exc:
            check_agreement(None, group, failure=exc)
            raise
        self.sharded, self.group = sharded, group
        self.tile, self.path, self.gate_up, self.validate = tile, path, gate_up, validate
        self.deterministic = det
        check_agreement(self.sharded, group)

    @classmethod
    def from_gguf(cls, file, layer: int, device=None, group=None, **kw) -> EPMoE:
        """This rank's part of layer ``layer`` of the GGUF ``file``: the file is memory-mapped and only
        this rank's experts are copied to ``device`` (the other experts' bytes are never read); the
        router, bias, hash table and shared expert are loaded whole. ``kw`` as for EPMoE."""
        from .devices import resolve
        from .gguf_io import open_gguf

        try:  # a rank that cannot load its part tells the others (check_agreement) instead of leaving them waiting
            device = resolve(device)
            f = open_gguf(file)
            where = f"{f.path} layer {layer}"
            hyper = moe.ds4_hyper(f.moe_config(), layer, where)
            t = f.moe_layer(layer)  # views of the mapped file, checked; nothing copied yet
            rank, world = dist.get_rank(group), dist.get_world_size(group)
            E = t.gate.shape[0]
            if E % world:
                raise ValueError(f"{where}: {E} experts do not split evenly over {world} ranks")
            a, b = rank * (E // world), (rank + 1) * (E // world)
            dev = lambda v: None if v is None else v.to(device)  # noqa: E731
            local = MoEWeights(dev(t.gate.experts(a, b)), dev(t.up.experts(a, b)), dev(t.down.experts(a, b)),
                               shared_gate=dev(t.shared_gate), shared_up=dev(t.shared_up),
                               shared_down=dev(t.shared_down), top_k=1, scale=hyper["scale"],
                               clamp=hyper["clamp"])
            sharded = ShardedMoE(local, E, rank, world, dev(t.router), dev(t.bias), dev(t.tid2eid),
                                 hyper["top_k"], hyper["scale"])
        except (OSError, ValueError, LookupError, RuntimeError) as exc:
            check_agreement(None, group, failure=exc)
            raise
        return cls(sharded, group, **kw)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        return ep_moe_forward(x, self.sharded, token_ids, group=self.group, tile=self.tile, path=self.path,
                              gate_up=self.gate_up, validate=self.validate, deterministic=self.deterministic)
