"""moetile as transformers' experts backend "moetile" (moetile.integrations.transformers) on tiny
random models built locally (no hub), the kernels through the interpreter on CPU.

The reference is the same model run with transformers' "eager" experts after each expert weight was
rounded through quantize -> dequantize: what is left is the backend's own error (f16 operands,
f32 accumulation), bounded by 1e-2 relative per row."""

from __future__ import annotations

import copy
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import row_rel_err  # noqa: E402

from moetile.gguf_io import MoELayerTensors, write_moe_layers  # noqa: E402
from moetile.integrations import transformers as mt  # noqa: E402
from moetile.quant import quantize, random_blocks  # noqa: E402

BOUND = 1e-2
H = F = 256  # the kernels need multiples of 256
E, K = 4, 2
V = 128
GATE_STD = 0.4  # gate/up pre-activations of std ~6: DeepSeek V4's clamp at 10 bites, plain SwiGLU sees |g| > 20
ROOT = Path(__file__).resolve().parents[2]

_COMMON = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=64, max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=2)
FAMILIES = {
    "qwen3_moe": dict(moe_intermediate_size=F, intermediate_size=2 * F, num_experts=E, num_experts_per_tok=K,
                      decoder_sparse_step=1, mlp_only_layers=[]),
    "mixtral": dict(intermediate_size=F, num_local_experts=E, num_experts_per_tok=K),
    "olmoe": dict(intermediate_size=F, num_experts=E, num_experts_per_tok=K),
    "qwen2_moe": dict(moe_intermediate_size=F, intermediate_size=2 * F, shared_expert_intermediate_size=F,
                      num_experts=E, num_experts_per_tok=K, decoder_sparse_step=1, mlp_only_layers=[]),
}


def ds4_config(**kw):
    """Layer 0 a hash layer (tid2eid), layer 1 a top-k layer (sqrt-softplus, bias, x1.5)."""
    from transformers import DeepseekV4Config

    args = dict(vocab_size=V, hidden_size=H, moe_intermediate_size=F, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=64, q_lora_rank=64, num_experts_per_tok=K, n_routed_experts=E,
                o_groups=2, o_lora_rank=32, index_n_heads=2, index_head_dim=32, index_topk=4, sliding_window=8,
                hc_mult=2, mlp_layer_types=["hash_moe", "moe"],
                layer_types=["sliding_attention", "compressed_sparse_attention"], num_nextn_predict_layers=0,
                max_position_embeddings=128)
    return DeepseekV4Config(**{**args, **kw})


def config(family: str, **kw):
    if family == "deepseek_v4":
        return ds4_config(**kw)
    return transformers.AutoConfig.for_model(family, **{**_COMMON, **FAMILIES[family], **kw})


def experts_of(model):
    return [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "_is_expert_parallel")]


def make_model(family: str, seed: int = 0, **kw):
    """A tiny random model; experts, routers, router biases and hash tables drawn so that they
    matter (decisive routing, pre-activations past the clamp), all from ``seed``."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config(family, **kw)).eval()
    randomize_moe(model, seed)
    return model


@torch.no_grad()
def randomize_moe(model, seed: int) -> None:
    g = torch.Generator().manual_seed(1000 + seed)
    for e in experts_of(model):
        block = next(b for b in model.modules() if getattr(b, "experts", None) is e)
        e.gate_up_proj.copy_(torch.randn(e.gate_up_proj.shape, generator=g) * GATE_STD)
        e.down_proj.copy_(torch.randn(e.down_proj.shape, generator=g) * 0.05)
        block.gate.weight.copy_(torch.randn(block.gate.weight.shape, generator=g) * 0.2)
        if hasattr(block.gate, "tid2eid"):
            n, k = block.gate.tid2eid.shape
            block.gate.tid2eid.copy_(torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(n)]))
        if hasattr(block.gate, "e_score_correction_bias"):
            block.gate.e_score_correction_bias.copy_(torch.rand(E, generator=g) * 0.2)
        shared = getattr(block, "shared_experts", None)
        if shared is not None:
            for lin in (shared.gate_proj, shared.up_proj, shared.down_proj):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.05)


def split(e):
    gu = e.gate_up_proj.detach()
    return gu[:, :F], gu[:, F:], e.down_proj.detach()


def round_trip(w: torch.Tensor, qtype: str) -> torch.Tensor:
    return quantize(w.float().contiguous(), qtype).dequantize().to(w.dtype)


@torch.no_grad()
def rounded_reference(model, gq: str, dq: str):
    """A copy of ``model`` on transformers' "eager" experts, every expert weight rounded through
    moetile's quantize -> dequantize (the blocks quantize_experts will make from the same weights)."""
    ref = copy.deepcopy(model)
    ref.set_experts_implementation("eager")
    for e in experts_of(ref):
        g, u, d = split(e)
        e.gate_up_proj.copy_(torch.cat([round_trip(g, gq), round_trip(u, gq)], 1))
        e.down_proj.copy_(round_trip(d, dq))
    return ref


def record_experts_calls(model) -> list:
    calls = []
    for i, e in enumerate(experts_of(model)):
        e.register_forward_hook(lambda mod, args, out, i=i: calls.append((i, args, out)))
    return calls


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (1, n), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- (a) matches eager


CASES = [("deepseek_v4", "q4_K"), ("deepseek_v4", "q2"), ("qwen3_moe", "q4_K"), ("mixtral", "q2_K"),
         ("olmoe", {"gate_up": "Q4_K", "down": "q2_k"}), ("qwen2_moe", "q8_0")]


@pytest.mark.parametrize("family, qtype", CASES, ids=[f"{f}-{q if isinstance(q, str) else 'dict'}" for f, q in CASES])
def test_backend_matches_eager_on_rounded_weights(family, qtype, device):
    """On CPU the kernels run through the interpreter; on a GPU machine the model moves to the GPU."""
    gq, dq = mt._qtypes(qtype)
    model = make_model(family).to(device)
    ref = rounded_reference(model, gq, dq)
    report = mt.quantize_experts(model, qtype)
    assert model.config._experts_implementation == "moetile"
    assert {r.experts.split("/")[0] for r in report.layers} == {gq}
    calls = record_experts_calls(model)
    ids = tokens(8).to(device)
    with torch.no_grad():
        out = model(ids).logits
        want = ref(ids).logits
    assert out.dtype == want.dtype == torch.float32
    assert row_rel_err(out, want).max() < BOUND, f"{family}: logits {row_rel_err(out, want).max():.2e}"
    # each experts call against the eager experts of the reference on the very same inputs
    assert sorted(i for i, *_ in calls) == list(range(len(experts_of(model))))
    ref_experts = experts_of(ref)
    with torch.no_grad():
        for i, args, got in calls:
            exp = ref_experts[i](*args)
            assert exp.norm() > 0
            err = row_rel_err(got, exp)
            assert err.max() < BOUND, f"{family} experts {i}: {err.max():.2e}"
            if family == "deepseek_v4":  # the clamp at 10 bites: without it the eager result is far away
                r = ref_experts[i]
                r.limit, limit = math.inf, r.limit
                assert row_rel_err(got, r(*args)).max() > 10 * BOUND
                r.limit = limit


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_in_same_dtype_out(dtype):
    """Quantized in float32, then the whole model cast: the packed planes (integer buffers) are
    untouched, the backend takes and returns ``dtype``."""
    model = make_model("deepseek_v4")
    ref = rounded_reference(model, "Q4_K", "Q4_K")
    mt.quantize_experts(model, "q4_K")
    model.to(dtype)
    e, r = model.model.layers[1].mlp.experts, ref.model.layers[1].mlp.experts
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(9)])
    w = torch.rand(9, K, generator=g) + 0.2
    with torch.no_grad():
        out = e(x.to(dtype), ids, w.to(dtype))
        exp = r(x.to(dtype).float(), ids, w.to(dtype).float())
    assert out.dtype == dtype
    assert row_rel_err(out.float(), exp).max() < BOUND


# --------------------------------------------------------------------------- (b) generate


@pytest.mark.parametrize("family", ["deepseek_v4", "qwen3_moe"])
def test_generate_gives_the_same_tokens(family):
    model = make_model(family, seed=3, **({} if family == "deepseek_v4" else {"num_hidden_layers": 1}))
    ref = rounded_reference(model, "Q4_K", "Q4_K")
    mt.quantize_experts(model, "q4_K")
    prompt = tokens(5, seed=3)
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with torch.no_grad():
        got = model.generate(prompt, **kw)
        want = ref.generate(prompt, **kw)
    assert got.shape == (1, 13)
    assert torch.equal(got, want), f"{got.tolist()} != {want.tolist()}"


# --------------------------------------------------------------------------- (c) GGUF


def write_model_gguf(path, model, gq="Q4_K", dq="Q2_K", metadata=None):
    """The MoE tensors of ``model`` as ds4 writes them: experts and shared expert (Q8_0) quantized,
    router f32, bias, int32 hash table. Returns {layer: MoELayerTensors}."""
    layers = {}
    for L, layer in enumerate(model.model.layers):
        block = layer.mlp
        g, u, d = split(block.experts)
        gate, sh = block.gate, block.shared_experts
        layers[L] = MoELayerTensors(
            gate=quantize(g.contiguous(), gq), up=quantize(u.contiguous(), gq), down=quantize(d.contiguous(), dq),
            router=gate.weight.detach().float().clone(),
            bias=gate.e_score_correction_bias.clone() if hasattr(gate, "e_score_correction_bias") else None,
            tid2eid=gate.tid2eid.to(torch.int32) if hasattr(gate, "tid2eid") else None,
            shared_gate=quantize(sh.gate_proj.weight.detach(), "Q8_0"),
            shared_up=quantize(sh.up_proj.weight.detach(), "Q8_0"),
            shared_down=quantize(sh.down_proj.weight.detach(), "Q8_0"))
    write_moe_layers(path, layers, metadata={"deepseek4.swiglu_clamp_exp": 10.0, **(metadata or {})})
    return layers


def test_gguf_round_trip_gives_identical_outputs(tmp_path):
    path = tmp_path / "tiny.gguf"
    src = make_model("deepseek_v4", seed=1)
    layers = write_model_gguf(path, src)

    # the file into a model whose MoE tensors are all different (other seed): everything must come from the file
    full = make_model("deepseek_v4", seed=1)
    randomize_moe(full, seed=7)
    report = mt.load_gguf_experts(full, path, include_router=True)
    assert [r.layer for r in report.layers] == [0, 1]
    assert {r.experts for r in report.layers} == {"Q4_K/planar + Q2_K"}
    # experts only: the router, bias, hash table stay the model's (here src's own), the shared expert set by hand
    part = make_model("deepseek_v4", seed=1)
    router_before = part.model.layers[1].mlp.gate.weight.clone()
    mt.load_gguf_experts(part, str(path))
    assert torch.equal(part.model.layers[1].mlp.gate.weight, router_before)
    with torch.no_grad():
        for L, lt in layers.items():
            sh = part.model.layers[L].mlp.shared_experts
            for lin, q in ((sh.gate_proj, lt.shared_gate), (sh.up_proj, lt.shared_up), (sh.down_proj, lt.shared_down)):
                lin.weight.copy_(q.dequantize())
    ids = tokens(10, seed=1)
    with torch.no_grad():
        a, b = full(ids).logits, part(ids).logits
    assert torch.equal(a, b)
    # and both compute the model the file describes: eager on the dequantized blocks
    ref = copy.deepcopy(src)
    ref.set_experts_implementation("eager")
    with torch.no_grad():
        for L, lt in layers.items():
            blk = ref.model.layers[L].mlp
            blk.experts.gate_up_proj.copy_(torch.cat([lt.gate.dequantize(), lt.up.dequantize()], 1))
            blk.experts.down_proj.copy_(lt.down.dequantize())
            for lin, q in ((blk.shared_experts.gate_proj, lt.shared_gate), (blk.shared_experts.up_proj, lt.shared_up),
                           (blk.shared_experts.down_proj, lt.shared_down)):
                lin.weight.copy_(q.dequantize())
        want = ref(ids).logits
    assert row_rel_err(a, want).max() < BOUND


# --------------------------------------------------------------------------- (d) errors


def _file(tmp_path, layers=(0, 1), E_=E, F_=F, H_=H, metadata=None, **extra):
    g = torch.Generator().manual_seed(0)
    lts = {L: MoELayerTensors(random_blocks("Q4_K", (E_, F_, H_), g), random_blocks("Q4_K", (E_, F_, H_), g),
                              random_blocks("Q4_K", (E_, H_, F_), g), router=torch.randn(E_, H_, generator=g),
                              **extra)
           for L in layers}
    path = tmp_path / "bad.gguf"
    write_moe_layers(path, lts, metadata=metadata)
    return path


def test_gguf_mismatches_name_the_layer_and_tensor(tmp_path):
    model = make_model("qwen3_moe")
    with pytest.raises(ValueError, match=r"layer 1 \(model\.layers\.1\.mlp\.experts\) has no tensor "
                                         r"'blk\.1\.ffn_gate_exps\.weight'"):
        mt.load_gguf_experts(model, _file(tmp_path, layers=(0,)))
    with pytest.raises(ValueError, match=r"the file's MoE layers \[2\] are not in the model"):
        mt.load_gguf_experts(model, _file(tmp_path, layers=(0, 1, 2)))
    with pytest.raises(ValueError, match=r"layer 0: tensor 'blk\.0\.ffn_gate_exps\.weight' is Q4_K \(4, 512, 256\) "
                                         r"but model\.layers\.0\.mlp\.experts needs \(4, 256, 256\)"):
        mt.load_gguf_experts(model, _file(tmp_path, F_=512))
    with pytest.raises(ValueError, match=r"swiglu_clamp_exp = 10 but model\.layers\.0\.mlp\.experts's gate is plain"):
        mt.load_gguf_experts(model, _file(tmp_path, metadata={"deepseek4.swiglu_clamp_exp": 10.0}))
    # the router: a tensor the model has no place for, and a shape that disagrees
    with pytest.raises(ValueError, match=r"layer 0: the file's 'blk\.0\.exp_probs_b\.bias' has nowhere to go"):
        mt.load_gguf_experts(model, _file(tmp_path, bias=torch.rand(E)), include_router=True)
    ds4 = make_model("deepseek_v4")
    table = torch.zeros(V // 2, K, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"layer 0: tensor 'blk\.0\.ffn_gate_tid2eid\.weight' has shape \(64, 2\) "
                                         r"but model\.layers\.0\.mlp\.gate\.tid2eid is \(128, 2\)"):
        mt.load_gguf_experts(ds4, _file(tmp_path, tid2eid=table, metadata={"deepseek4.swiglu_clamp_exp": 10.0}),
                             include_router=True)
    # the router's k is checked without include_router too: experts loaded under another k are wrong
    for include_router in (False, True):
        with pytest.raises(ValueError, match=r"layer 0: the file's deepseek4\.expert_used_count = 3 but the "
                                             r"model's router uses 2"):
            mt.load_gguf_experts(ds4, _file(tmp_path, metadata={"deepseek4.swiglu_clamp_exp": 10.0,
                                                                "deepseek4.expert_used_count": 3}),
                                 include_router=include_router)
    # nothing was changed by the failed loads
    assert all(e.gate_up_proj.numel() for e in experts_of(model) + experts_of(ds4))
    assert model.config._experts_implementation != "moetile"


class _ClampAfterSiLU(torch.nn.Module):
    """Step3p7's order: the clamp after the activation (a different function from DeepSeek V4's)."""

    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate).clamp(max=self.limit) * up.clamp(-self.limit, self.limit)


def test_unsupported_gates_and_layouts_are_refused():
    gelu = make_model("qwen3_moe", hidden_act="gelu")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts \(Qwen3MoeExperts\): its gate .*act_fn "
                                         r"GELUActivation\) is not one moetile implements"):
        mt.quantize_experts(gelu)
    ds4 = make_model("deepseek_v4")
    e = ds4.model.layers[1].mlp.experts
    e.__class__ = type("Step3p7LikeExperts", (type(e),), {"_apply_gate": _ClampAfterSiLU._apply_gate})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts \(Step3p7LikeExperts\): its gate .*"
                                         r"differ from the clamped SwiGLU with C=10"):
        mt.quantize_experts(ds4)
    assert all(x.gate_up_proj.numel() for x in experts_of(ds4))  # layer 0 was not quantized either
    narrow = make_model("mixtral", hidden_size=128, head_dim=32)
    with pytest.raises(ValueError, match=r"hidden size H = 128 is not a multiple of 256"):
        mt.quantize_experts(narrow)
    oss = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
        "gpt_oss", **{**_COMMON, "num_hidden_layers": 1}, intermediate_size=F, num_local_experts=E,
        num_experts_per_tok=K, layer_types=["full_attention"]))
    with pytest.raises(ValueError, match=r"\(GptOssExperts\): experts with bias terms"):
        mt.quantize_experts(oss)
    with pytest.raises(ValueError, match=r"unknown qtype 'q3_K'"):
        mt.quantize_experts(make_model("mixtral"), "q3_K")


def test_float_weights_set_after_quantizing_are_not_ignored():
    """New float experts assigned after quantize_experts would be ignored by the packed blocks: refused."""
    model = make_model("mixtral")
    e = experts_of(model)[0]
    shapes = e.gate_up_proj.shape, e.down_proj.shape
    mt.quantize_experts(model, "q8_0")
    with torch.no_grad():
        model(tokens(4))
    for x in experts_of(model):  # a fine-tuned checkpoint's experts, say
        x.gate_up_proj = torch.nn.Parameter(torch.randn(shapes[0]) * 0.02)
        x.down_proj = torch.nn.Parameter(torch.randn(shapes[1]) * 0.02)
    with pytest.raises(RuntimeError, match=r"float expert weights were set again .* quantize_experts\(model\) again"):
        with torch.no_grad():
            model(tokens(4))
    mt.quantize_experts(model, "q8_0")  # which takes the new ones
    with torch.no_grad():
        assert model(tokens(4)).logits.isfinite().all()


def test_meta_experts_and_gradients_are_named():
    with torch.device("meta"):
        meta = make_model("mixtral")
    with pytest.raises(ValueError, match=r"on the meta device \(nothing to quantize\)"):
        mt.quantize_experts(meta)
    model = make_model("mixtral")
    mt.quantize_experts(model, "q8_0")
    with pytest.warns(UserWarning, match="inference only"):
        model(tokens(4))  # grad enabled and the parameters require it


def test_backend_without_moetile_weights_says_what_to_do():
    mt.register()
    model = make_model("mixtral")
    model.set_experts_implementation("moetile")
    with pytest.raises(RuntimeError, match=r"MixtralExperts: experts_implementation is 'moetile' but this experts "
                                           r"module holds no moetile weights; call .*quantize_experts"):
        model(tokens(4))


# --------------------------------------------------------------------------- memory, importance, registry


def test_quantize_experts_frees_the_float_weights_and_reports_memory():
    model = make_model("qwen3_moe")
    float_bytes = sum(e.gate_up_proj.nbytes + e.down_proj.nbytes for e in experts_of(model))
    report = mt.quantize_experts(model, "q2", form="compact")
    held = sum(b.nbytes for e in experts_of(model) for n, b in e.named_buffers() if n.startswith("moetile_"))
    assert report.bytes_before == float_bytes and report.bytes_after == held
    # IQ2_XXS compact 2.0625 bits/weight for gate and up, Q2_K 2.625 for down, against float32
    assert math.isclose(report.ratio, 32 / ((2 * 2.0625 + 2.625) / 3), rel_tol=1e-9)
    assert all(e.gate_up_proj.numel() == 0 and e.down_proj.numel() == 0 for e in experts_of(model))
    assert "2 MoE layers, experts IQ2_XXS/compact + Q2_K" in str(report)
    with pytest.raises(ValueError, match="already replaced by moetile's"):
        mt.quantize_experts(model)
    # a deep copy of a model that already ran (its weights cached) runs on its own buffers
    mt._weights(experts_of(model)[0])
    twin = copy.deepcopy(model)
    te = experts_of(twin)[0]
    assert mt._weights(te).gate.planes["grid"].data_ptr() == te.moetile_gate_grid.data_ptr()
    assert te.moetile_gate_grid.data_ptr() != experts_of(model)[0].moetile_gate_grid.data_ptr()


def test_moving_the_model_frees_the_old_blocks():
    """After a forward the backend caches its weights; model.to() must still free the old buffers at
    once (the cache holds them weakly), and the next call runs on the new ones."""
    import gc
    import weakref

    model = make_model("mixtral")
    mt.quantize_experts(model, "q4_K")
    ids = tokens(4)
    with torch.no_grad():
        want = model(ids).logits
    e = experts_of(model)[0]
    old = weakref.ref(e.moetile_gate_codes)
    model.to(torch.float32)  # a no-op for the packed integer buffers
    assert old() is e.moetile_gate_codes
    keep = {n: t.clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    model.to("meta")
    gc.collect()
    assert old() is None, "the old packed blocks are still held"
    model.to_empty(device="cpu")  # fresh buffers (garbage): the cache must not hand back the old weights
    w = mt._weights(e)
    assert w.gate.planes["codes"].data_ptr() == e.moetile_gate_codes.data_ptr()
    with torch.no_grad():
        for n, t in [*model.named_parameters(), *model.named_buffers()]:
            t.copy_(keep[n])  # the same values in the new tensors: the forward reads them
        assert torch.equal(model(ids).logits, want)


def test_two_modules_for_one_gguf_block_are_refused(tmp_path):
    path = tmp_path / "tiny.gguf"
    src = make_model("deepseek_v4", seed=1)
    write_model_gguf(path, src)
    both = torch.nn.Module()
    both.a, both.b = src.model, copy.deepcopy(src.model)  # a.layers.0 and b.layers.0 -> blk.0 twice
    with pytest.raises(ValueError, match=r"both map to GGUF block blk\.0"):
        mt.load_gguf_experts(both, path)


def test_importance_steers_the_quantizer():
    model = make_model("mixtral")
    g0, _, d0 = (t.clone() for t in split(experts_of(model)[0]))
    imp = torch.rand(H, generator=torch.Generator().manual_seed(0)) ** 4 * 100 + 0.01
    imp_down = torch.rand(E, F, generator=torch.Generator().manual_seed(1)) + 0.5  # one per expert
    mt.quantize_experts(model, "q2_K", importance={0: {"gate_up": imp, "down": imp_down}})
    w0, w1 = mt._weights(experts_of(model)[0]), mt._weights(experts_of(model)[1])
    assert torch.equal(w0.gate.dequantize(), quantize(g0, "Q2_K", imp).dequantize())
    assert not torch.equal(w0.gate.dequantize(), quantize(g0, "Q2_K").dequantize())
    want = torch.stack([quantize(d0[e], "Q2_K", imp_down[e]).dequantize() for e in range(E)])
    assert torch.equal(w0.down.dequantize(), want)
    assert w1.gate.shape == (E, F, H)
    with pytest.raises(ValueError, match=r"importance\[0\]\['gate_up'\] must be a float tensor \[256\] or \[4, 256\]"):
        mt.quantize_experts(make_model("mixtral"), "q2_K", importance={0: {"gate_up": imp[:10]}})
    with pytest.raises(ValueError, match=r"importance: 5 is no MoE layer"):
        mt.quantize_experts(make_model("mixtral"), "q2_K", importance={5: {"down": imp}})


def test_register_is_idempotent_and_transformers_stays_lazy():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    mt.register()
    mt.register()
    assert ALL_EXPERTS_FUNCTIONS["moetile"] is mt.experts_forward
    code = ("import sys, moetile, moetile.moe, moetile.integrations.transformers; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": path, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr


def test_readme_example_runs(capsys):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use with transformers", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    assert "MoE layers" in capsys.readouterr().out
