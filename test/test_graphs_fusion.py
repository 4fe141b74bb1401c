"""Fast-path equality: every fused / graph-safe stage returns what its eager engine version returns.

CPU, float32, tiny shapes. CUDA capture itself is exercised on the device by the benchmark
(python -m flashdrive_ros.bench), which compares graphed and eager outputs before timing.
"""

import copy

import pytest
import torch

from flashdrive_ros.engine import graphs
from flashdrive_ros.engine.config import tiny_config
from flashdrive_ros.engine.expert import Expert
from flashdrive_ros.engine.kv_cache import StaticKVCache
from flashdrive_ros.engine.rope import extend_positions, rope_index
from flashdrive_ros.engine.streaming import causal_mask
from flashdrive_ros.engine.text_model import TextModel
from flashdrive_ros.engine.vision import build_vision_tower, encode_images

TOL = dict(rtol=1e-4, atol=1e-5)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.05
            p.copy_(noise + 1.0 if "norm" in name and p.dim() == 1 else noise)


@pytest.fixture(scope="module")
def parts():
    cfg = tiny_config()
    lm = TextModel(cfg.text).eval()
    ex = Expert(cfg.expert_text_config()).eval()
    _randomize(lm, 1)
    _randomize(ex, 2)
    return cfg, lm, ex


def _cache(cfg, max_len: int, batch: int = 1, seed: int = 3) -> StaticKVCache:
    # A prompt with two 2x4-token images so positions are genuinely 3-D.
    ids = torch.zeros(max_len - 30, dtype=torch.long)
    ids[5:13] = 7
    ids[20:28] = 7
    pos, _ = rope_index(ids, torch.tensor([[1, 4, 8], [1, 4, 8]]), 7, 2)
    pos = extend_positions(pos, max_len)
    c = StaticKVCache.for_config(cfg.text, batch, max_len, pos)
    g = torch.Generator().manual_seed(seed)
    # Stale garbage everywhere: the fast path must mask it, never read it.
    c.k.copy_(torch.randn(c.k.shape, generator=g))
    c.v.copy_(torch.randn(c.v.shape, generator=g))
    c.set_positions(pos)
    return c


def test_fusion_keeps_keys_values_and_outputs(parts):
    cfg, lm, _ = parts
    fused = copy.deepcopy(lm)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    n = graphs.fuse_projections(fused)
    assert n == 2 * cfg.text.num_hidden_layers
    after = fused.state_dict()
    assert list(after) == list(before)  # checkpoint keys unchanged, no extra keys
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    # one copy of the data: q_proj.weight is a view of the fused buffer
    attn = fused.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()
    assert graphs.fuse_projections(fused) == 0  # idempotent

    x = torch.randn(1, 9, cfg.text.hidden_size)
    for a, b in ((lm.layers[1].self_attn, fused.layers[1].self_attn),):
        for ta, tb in zip(a.project(x), b.project(x)):
            torch.testing.assert_close(tb, ta, **TOL)
    torch.testing.assert_close(fused.layers[2].mlp(x), lm.layers[2].mlp(x), **TOL)

    c1, c2 = _cache(cfg, 80), _cache(cfg, 80)
    slots = torch.arange(0, 40)
    m = causal_mask(slots, 40)
    e = torch.randn(1, 40, cfg.text.hidden_size)
    h1, _ = lm(e, c1, slots, m, 40)
    h2, _ = fused(e, c2, slots, m, 40)
    torch.testing.assert_close(h2, h1, **TOL)
    torch.testing.assert_close(c2.k_rot, c1.k_rot, **TOL)


@pytest.fixture(params=["sdpa", "math"])
def attention_impl(request):
    graphs.force_attention(request.param)
    yield request.param
    graphs.force_attention(None)


@pytest.mark.parametrize("fuse", [False, True])
def test_lm_forward_prefill_and_masked_decode_match_eager(parts, fuse, attention_impl):
    cfg, lm, _ = parts
    fast = copy.deepcopy(lm)
    if fuse:
        graphs.fuse_projections(fast)
    max_len = 90
    c_ref, c_fast = _cache(cfg, max_len), _cache(cfg, max_len)
    H = cfg.text.hidden_size
    # prefill 50 tokens with deepstack on 16 "image" rows
    slots = torch.arange(50)
    vis = torch.zeros(50, dtype=torch.bool)
    vis[5:13] = True
    vis[20:28] = True
    deep = [torch.randn(16, H) for _ in range(3)]
    x = torch.randn(1, 50, H)
    ref, cap_ref = lm(x, c_ref, slots, causal_mask(slots, 50), 50, vis, deep, capture_layers=(1, 3))
    out, cap = graphs.lm_forward(fast, x, c_fast, slots, graphs.causal_slot_mask(slots, 50, x.dtype), 50,
                                 vis.nonzero().flatten(), deep, capture_layers=(1, 3))
    torch.testing.assert_close(out, ref, **TOL)
    for i in (1, 3):
        torch.testing.assert_close(cap[i], cap_ref[i], **TOL)
    # decode: eager reads exactly [0, cur]; the fast path reads all max_len slots (stale garbage
    # beyond cur) and must mask them away.
    for cur in range(50, 54):
        t = torch.randn(1, 1, H)
        s = torch.tensor([cur])
        ref, _ = lm(t, c_ref, s, None, cur + 1)
        out, _ = graphs.lm_forward(fast, t, c_fast, s, graphs.causal_slot_mask(s, max_len, t.dtype), max_len)
        torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(c_fast.k_rot[:, :, :, :54], c_ref.k_rot[:, :, :, :54], **TOL)
    # verify block of 8 (q = 8, causal within the block)
    s = torch.arange(54, 62)
    t = torch.randn(1, 8, H)
    ref, _ = lm(t, c_ref, s, causal_mask(s, 62), 62)
    out, _ = graphs.lm_forward(fast, t, c_fast, s, graphs.causal_slot_mask(s, max_len, t.dtype), max_len)
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("k_samples", [1, 2])
def test_expert_forward_matches_eager(parts, k_samples, attention_impl):
    cfg, _, ex = parts
    fast = copy.deepcopy(ex)
    graphs.fuse_projections(fast)
    T = cfg.action_space.n_waypoints
    n_ctx = 57
    max_len = n_ctx + 8 + T  # room for the action slots (and garbage between)
    c_ref = _cache(cfg, max_len, batch=1, seed=5)
    c_fast = _cache(cfg, max_len, batch=1, seed=5)
    emb = torch.randn(k_samples, T, cfg.expert.hidden_size)
    act_slots = torch.arange(n_ctx, n_ctx + T)
    positions = c_ref.positions[:, act_slots]
    ref = ex(emb, c_ref, n_ctx, positions)
    shared = k_samples != c_fast.batch
    n_keys = max_len
    mask = graphs.action_mask(torch.tensor(n_ctx), act_slots, n_keys, emb.dtype, shared_batch=shared)
    out = graphs.expert_forward(fast, emb, c_fast, act_slots, mask, n_keys)
    torch.testing.assert_close(out, ref, **TOL)
    # the context part of the cache is untouched
    torch.testing.assert_close(c_fast.k[:, :, :, :n_ctx], c_ref.k[:, :, :, :n_ctx], rtol=0, atol=0)


def test_vision_forward_matches_tower():
    cfg = tiny_config()
    tower = build_vision_tower(cfg.vision).eval()
    _randomize(tower, 4)
    grid = torch.tensor([[1, 8, 14]] * 3)
    pix = torch.randn(3 * 8 * 14, 3 * 2 * 16 * 16)
    ref = encode_images(tower, pix, grid)
    st = graphs.vision_static(tower, grid)
    emb, deep = graphs.vision_forward(tower, pix, st)
    torch.testing.assert_close(emb, ref.embeds, **TOL)
    assert len(deep) == len(ref.deepstack)
    for a, b in zip(deep, ref.deepstack):
        torch.testing.assert_close(a, b, **TOL)


def test_vision_static_position_table_follows_weight_updates():
    """The interpolated position embedding is computed once per grid; a pos_embed weight changed in place
    afterwards must not be used silently with the old table: vision_forward refuses, a rebuilt static
    matches the tower again."""
    cfg = tiny_config()
    tower = build_vision_tower(cfg.vision).eval()
    _randomize(tower, 5)
    grid = torch.tensor([[1, 8, 14]] * 2)
    pix = torch.randn(2 * 8 * 14, 3 * 2 * 16 * 16)
    st = graphs.vision_static(tower, grid)
    with torch.no_grad():
        tower.pos_embed.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="pos_embed"):
        graphs.vision_forward(tower, pix, st)
    emb, _ = graphs.vision_forward(tower, pix, graphs.vision_static(tower, grid))
    torch.testing.assert_close(emb, encode_images(tower, pix, grid).embeds, **TOL)


def test_cache_write_and_shift_match_cache_methods(parts):
    cfg, _, _ = parts
    a, b = _cache(cfg, 64, seed=7), _cache(cfg, 64, seed=7)
    slots = torch.tensor([3, 9, 40])
    k = torch.randn(1, cfg.text.num_key_value_heads, 3, cfg.text.head_dim)
    v = torch.randn_like(k)
    a.write(2, slots, k, v)
    graphs.cache_write(b, 2, slots, k, v, b.cos[slots], b.sin[slots])
    src, dst = torch.arange(10, 20), torch.arange(0, 10)
    a.shift(src, dst)
    graphs.cache_shift(b, src, dst)
    for name in ("k", "v", "k_rot"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), **TOL)


def test_stage_graph_eager_path_uses_static_buffers():
    calls = []

    def fn(x, y):
        calls.append((x.data_ptr(), y.data_ptr()))
        return x * 2 + y

    x0, y0 = torch.ones(3), torch.zeros(3)
    sg = graphs.StageGraph(fn, {"x": x0, "y": y0}, shared=("y",))
    assert sg.graph is None  # CPU: no capture
    assert sg.buffers["y"] is y0 and sg.buffers["x"] is not x0
    out = sg(x=torch.full((3,), 5.0))
    torch.testing.assert_close(out, torch.full((3,), 10.0))
    y0.fill_(1.0)  # shared buffer: the next call sees the producer's new content
    out = sg()
    torch.testing.assert_close(out, torch.full((3,), 11.0))
    assert all(p == calls[0] for p in calls)


def test_fused_elementwise_chains_match_modules(parts):
    cfg, lm, _ = parts
    layer = lm.layers[0]
    x = torch.randn(2, 5, cfg.text.hidden_size)
    a = torch.randn_like(x)
    n = layer.input_layernorm
    torch.testing.assert_close(graphs.fused_rms_norm(x, n.weight, n.eps), n(x), rtol=0, atol=0)
    y, h = graphs.fused_add_rms_norm(x, a, n.weight, n.eps)
    torch.testing.assert_close(h, n(x + a), rtol=0, atol=0)
    gu = torch.randn(2, 5, 2 * cfg.text.intermediate_size)
    g, u = gu.chunk(2, -1)
    torch.testing.assert_close(graphs.fused_swiglu(gu), torch.nn.functional.silu(g) * u)
    s = torch.randn(1, 2, 4, 9)
    m = torch.zeros(1, 1, 4, 9)
    m[..., 5:] = torch.finfo(m.dtype).min
    ref = torch.softmax(s * 0.5 + m, -1)
    torch.testing.assert_close(graphs.fused_softmax(s, m, 0.5), ref)


def test_greedy_token_bans_range():
    logits = torch.zeros(2, 20)
    logits[0, 5] = 3.0
    logits[0, 2] = 1.0
    logits[1, 12] = 2.0
    tok = graphs.greedy_token(logits, (4, 8))
    assert tok.tolist() == [2, 12]


def test_fast_path_is_bitwise_equal_to_eager_in_bf16_on_cpu(parts):
    """Without torch.compile (CPU) the fused fast path does the eager arithmetic exactly, also in bf16."""
    cfg, lm, _ = parts
    eager = copy.deepcopy(lm).to(torch.bfloat16)
    fast = copy.deepcopy(eager)
    graphs.fuse_projections(fast)
    L = 40
    pos = torch.arange(L + 8).expand(3, -1)
    c1 = StaticKVCache.for_config(cfg.text, 1, L + 8, pos, torch.bfloat16)
    c2 = StaticKVCache.for_config(cfg.text, 1, L + 8, pos, torch.bfloat16)
    x = torch.randn(1, L, cfg.text.hidden_size, dtype=torch.bfloat16)
    slots = torch.arange(L)
    ref, _ = eager(x, c1, slots, causal_mask(slots, L).bfloat16(), L)
    out, _ = graphs.lm_forward(fast, x, c2, slots, graphs.causal_slot_mask(slots, L, torch.bfloat16), L)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_output_head_is_padded_to_a_gemm_friendly_width_without_changing_logits():
    head = torch.nn.Linear(32, 1001, bias=False)  # an odd vocabulary, like the real 155 697
    _randomize(head, 5)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = head

    net = Net()
    x = torch.randn(3, 7, 32)
    ref = net.lm_head(x)
    keys = {k: v.clone() for k, v in net.state_dict().items()}
    assert graphs.fuse_projections(net) == 1
    assert graphs.fuse_projections(net) == 0  # idempotent
    assert net.lm_head.padded_weight.shape == (1024, 32)
    assert not net.lm_head.padded_weight[1001:].any()
    assert net.lm_head.weight.data_ptr() == net.lm_head.padded_weight.data_ptr()  # one copy of the data
    out = net.lm_head(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert net.state_dict().keys() == keys.keys()
    torch.testing.assert_close(net.state_dict()["lm_head.weight"], keys["lm_head.weight"], rtol=0, atol=0)
    banned = (990, 1000)
    assert torch.equal(graphs.greedy_token(out, banned), graphs.greedy_token(ref, banned))


def test_stages_stated_with_key_limit_match_eager_modules():
    """key_limit (row q sees keys j < key_limit[q]) is the form the Triton kernels take; without them
    (CPU, no interpreter) it becomes the equivalent additive mask and must give the eager result."""
    from kernel_path_check import run

    err = run()
    assert err.pop("kernels") == 0.0  # this process runs the PyTorch path
    bad = {k: v for k, v in err.items() if not v < 1e-5}
    assert not bad, bad


@pytest.mark.parametrize("fuse", [False, True])
def test_drafter_fast_forward_matches_drafter_forward(fuse):
    from flashdrive_ros.engine.speculative import Drafter, DrafterConfig

    cfg = tiny_config()
    drafter = Drafter(DrafterConfig.for_target(cfg.text)).eval()
    _randomize(drafter, 7)
    fast = copy.deepcopy(drafter)
    if fuse:
        graphs.fuse_projections(fast)
    c, s = drafter.cfg.context_len, drafter.cfg.block_size
    context = torch.randn(2, c, len(drafter.cfg.target_layers) * cfg.text.hidden_size)
    block = torch.randn(2, s, cfg.text.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(fast.forward_fast(block, context), drafter(block, context), **TOL)


def test_skinny_gemm_is_used_only_for_shapes_tuned_on_this_gpu_model():
    """No tuning at run time: the Triton skinny GEMM runs for a shape only where a shipped tuning record
    for this GPU model measured it faster than cuBLAS; on the CPU, graphs.linear is F.linear."""
    assert graphs.tuned_linear_file("NVIDIA H100 80GB HBM3").name == "linear_nvidia_h100_80gb_hbm3.json"
    x, w, b = torch.randn(2, 3, 16), torch.randn(24, 16), torch.randn(24)
    assert torch.equal(graphs.linear(x, w, b), torch.nn.functional.linear(x, w, b))
    for path in graphs.TUNED_DIR.glob("linear_*.json"):
        data = __import__("json").loads(path.read_text())
        assert data["gpu"] and data["command"]
        for r in data["records"]:
            assert {"dtype", "m", "n", "k", "bias", "block_n", "block_k", "kernel_us", "cublas_us"} <= r.keys()


def _record(m, n, k, kernel_us, cublas_us, swiglu=None, **extra):
    """A shipped tuning record as scripts/gpu_linear_check.py --records writes it (no device)."""
    r = dict(dtype="bfloat16", m=m, n=n, k=k, bias=False, block_n=64, block_k=128, split_k=1, num_warps=4,
             num_stages=4, kernel_us=kernel_us, cublas_us=cublas_us, **extra)
    return r if swiglu is None else dict(r, swiglu=swiglu)


def test_shipped_records_pick_the_kernels_that_won_by_five_percent(monkeypatch, tmp_path):
    """Without programmatic dependent launch, a plain record ships its kernel when it beat cuBLAS by 5%; a
    swiglu record when it beat both two-kernel paths (cuBLAS + SwiGLU, skinny GEMM + SwiGLU) by 5%. Records
    without "swiglu" are plain; a balanced ("stream-K") record loads as its balanced config."""
    from flashdrive_ros.engine import linear_kernel as L

    monkeypatch.setattr(graphs, "_shipping_margin", lambda device: graphs.SHIPPED_MARGIN)

    records = [
        _record(8, 24576, 4096, 69.0, 74.0),                         # plain gate|up, old format: 0.93x -> ships
        _record(8, 6144, 4096, 21.0, 21.0, swiglu=False),            # plain qkv, a tie -> cuBLAS
        _record(8, 24576, 4096, 66.0, 80.0, swiglu=True, skinny_linear_us=68.0),  # < 5% over skinny -> no
        _record(64, 16512, 2048, 24.0, 31.0, swiglu=True, skinny_linear_us=28.0),  # 0.86x of the best -> ships
        _record(1, 24576, 4096, 66.0, 72.0, swiglu=True),            # only cuBLAS + SwiGLU timed: 0.92x -> ships
        dict(_record(8, 4096, 12288, 30.0, 40.0, swiglu=False), split_k=0, programs=264),  # balanced -> ships
    ]
    (tmp_path / "linear_fake_gpu.json").write_text(__import__("json").dumps(dict(gpu="Fake GPU", command="-",
                                                                                   records=records)))
    monkeypatch.setattr(graphs, "TUNED_DIR", tmp_path)
    monkeypatch.setattr(graphs, "_SHIPPED", {"loaded": set(), "use": set()})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    try:
        graphs._load_shipped_tuning(L, torch.device("cuda", 0))
        assert graphs._SHIPPED["use"] == {(0, "bfloat16", 8, 24576, 4096, False, False),
                                          (0, "bfloat16", 64, 16512, 2048, False, True),
                                          (0, "bfloat16", 1, 24576, 4096, False, True),
                                          (0, "bfloat16", 8, 4096, 12288, False, False)}
        assert len(L._TUNED) == 6  # every record seeds the kernel's config cache, shipped or not
        balanced = L._TUNED[(0, "bfloat16", 8, 4096, 12288, False, False)].config
        assert balanced == L.Config(64, 128, 0, 4, 4, programs=264)
        assert graphs.linear_choices() == {"bfloat16 M1 N24576 K4096 swiglu": "triton+swiglu",
                                           "bfloat16 M64 N16512 K2048 swiglu": "triton+swiglu",
                                           "bfloat16 M8 N24576 K4096": "triton",
                                           "bfloat16 M8 N4096 K12288": "triton"}
    finally:
        L.clear_tuned()


class _FakeSkinny:
    """Stands in for linear_kernel on CPU tensors: records which kernel ran, computes its specification."""

    def __init__(self):
        from flashdrive_ros.engine import linear_kernel as L

        self.L, self.calls = L, []

    def skinny_linear(self, x, w, b=None, tune=True):
        self.calls.append(("linear", w.shape[0]))
        return self.L.skinny_linear_reference(x, w, b)

    def skinny_swiglu(self, x, w, tune=True):
        assert not tune  # graphs never tunes or times at run time
        self.calls.append(("swiglu", w.shape[0]))
        return self.L.skinny_swiglu_reference(x, w)


def _fused_mlp(seed=5):
    from flashdrive_ros.engine.config import TextConfig
    from flashdrive_ros.engine.text_model import MLP

    mlp = MLP(TextConfig(hidden_size=32, intermediate_size=24)).eval()
    _randomize(mlp, seed)
    graphs.fuse_projections(mlp)
    return mlp


@pytest.mark.parametrize("shipped", ["none", "swiglu", "swiglu_other_rows", "plain_gate_up"])
def test_mlp_runs_the_swiglu_epilogue_exactly_where_a_record_ships_it(monkeypatch, shipped):
    mlp, h = _fused_mlp(), torch.randn(2, 4, 32)
    gate_up = (-1, "float32", 8, 48, 32, False)
    use = {"none": set(), "swiglu": {(*gate_up, True)}, "swiglu_other_rows": {(-1, "float32", 64, 48, 32, False, True)},
           "plain_gate_up": {(*gate_up, False)}}[shipped]
    fake = _FakeSkinny()
    monkeypatch.setattr(graphs, "_skinny_kernels", lambda x: fake)  # as on a GPU with the kernels usable
    monkeypatch.setattr(graphs, "_SHIPPED", {"loaded": set(), "use": use})
    with torch.no_grad():
        out = graphs._mlp(mlp, h)
        unfused = mlp.down_proj(graphs.fused_swiglu(torch.nn.functional.linear(h, mlp.gate_up_weight)))
    assert fake.calls == {"none": [], "swiglu": [("swiglu", 48)], "swiglu_other_rows": [],
                          "plain_gate_up": [("linear", 48)]}[shipped]
    if shipped in ("none", "swiglu_other_rows"):
        assert torch.equal(out, unfused)  # the old path, op for op
    else:
        torch.testing.assert_close(out, unfused, **TOL)


def test_on_the_cpu_the_mlp_never_consults_the_skinny_kernels(monkeypatch):
    """On the CPU the MLP is the unchanged composition, even with a record for its shape."""
    mlp, h = _fused_mlp(), torch.randn(2, 4, 32)
    monkeypatch.setattr(graphs, "_SHIPPED", {"loaded": set(), "use": {(-1, "float32", 8, 48, 32, False, True)}})
    monkeypatch.setattr(graphs, "_kernel_module", lambda *a: pytest.fail("kernel module consulted"))
    with torch.no_grad():
        out = graphs._mlp(mlp, h)
        assert torch.equal(out, mlp.down_proj(graphs.fused_swiglu(torch.nn.functional.linear(h, mlp.gate_up_weight))))
    assert graphs._skinny_kernels(h) is None


def test_with_pdl_a_record_ships_when_its_kernel_was_faster_at_all(monkeypatch):
    """With PDL (sm_90+, attention_kernel.PDL) our kernels also overlap their neighbours and cuBLAS's do not,
    so the margin is 1: faster alone is enough, a tie is not. Before sm_90, or with PDL off: 5 %."""
    from flashdrive_ros.engine import attention_kernel as A

    qkv = _record(8, 6144, 4096, 20.57, 21.13, swiglu=False)  # the H100 record of the LM's qkv at M = 8
    tie = _record(8, 6144, 4096, 21.0, 21.0, swiglu=False)
    cuda0 = torch.device("cuda", 0)
    for capability, pdl, margin in (((9, 0), True, 1.0), ((8, 6), True, 0.95), ((9, 0), False, 0.95)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        monkeypatch.setattr(A, "PDL", pdl)
        assert graphs._shipping_margin(cuda0) == margin
        assert graphs._record_wins(qkv, graphs._shipping_margin(cuda0)) == (margin == 1.0)
        assert not graphs._record_wins(tie, graphs._shipping_margin(cuda0))
