"""video2param.targets across a matrix of tiny random HF causal LMs (see tiny_models.py).

The strong checks compare against the model's *own* code: q/k/v captured where the model hands them to its
attention function (with all position ids 0 so that RoPE is the identity) must equal the role slices of the
projection outputs; fused projections are also checked against the attention module's split method, and a
delta added through a site must reach exactly its role and nothing else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from transformers.modeling_utils import AttentionInterface
from transformers.pytorch_utils import Conv1D

import video2param.targets as targets
from tiny_models import (
    ARCHITECTURES,
    NUM_LAYERS,
    REPRESENTATIVE_ARCHITECTURES,
    VOCAB_SIZE,
    left_padded_batch,
    make_tiny_lm,
    tiny_config,
)
from video2param.targets import (
    ROLES,
    ArchSpec,
    FusedQKV,
    TargetSite,
    UnsupportedModelError,
    arch_spec,
    decoder_layers,
    find_targets,
    hidden_size,
    injection_layers,
    input_embeddings,
    num_layers,
    register_architecture,
)

ARCHS = sorted(ARCHITECTURES)

# Architectures whose attention code transforms q/k after the projection (scaling, q/k norms), so the captured
# q/k are not the raw projection outputs; for them q/k are checked by routing (perturbation) only.
QK_TRANSFORMED = {"opt": "q scaled by head_dim**-0.5", "qwen3": "q/k RMSNorm", "gemma3_text": "q/k RMSNorm"}

# How q/k/v are observed: models call the shared attention interface, except GPT-J in older transformers
# releases, which calls its own `_attn` (used only where the attention module still has it; recent GPT-J code
# goes through the interface). Bloom and Falcon have neither; they are checked against their own split methods.
CAPTURE_BY_METHOD = {"gptj": "_attn"}
NO_CAPTURE = {"bloom", "falcon"}
CAPTURABLE = [a for a in ARCHS if a not in NO_CAPTURE]

# Expected spec per architecture: the generic names cover everything without a fused projection.
SPECIAL = {"gpt2", "gpt_bigcode", "gpt_neox", "bloom", "falcon", "phi3"}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {arch: make_tiny_lm(arch, seed=0) for arch in ARCHS}


def _flat_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) as attention functions get them → (B, S, H*D) as projections produce them."""
    return x.transpose(1, 2).flatten(2)


@contextlib.contextmanager
def capture_attention(model: nn.Module, arch: str) -> Iterator[dict[nn.Module, dict[str, torch.Tensor]]]:
    """Record q, k, v (as (B, S, H*D)) per attention module; attention output := q, so that the o projection's
    input must equal the captured q flattened. Model outputs are meaningless inside this context."""
    captured: dict[nn.Module, dict[str, torch.Tensor]] = {}

    def record(module, query, key, value):
        captured[module] = {"q": _flat_heads(query), "k": _flat_heads(key), "v": _flat_heads(value)}
        return query.transpose(1, 2).contiguous()

    method = CAPTURE_BY_METHOD.get(arch)
    attn_modules = [(name, m) for name, m in model.named_modules() if name.endswith(".attn")]
    if method is not None and any(hasattr(m, method) for _, m in attn_modules):
        patched = []
        for _, module in attn_modules:
            if hasattr(module, method):
                def fake(query, key, value, attention_mask=None, *args, _module=module, **kwargs):
                    return record(_module, query, key, value).transpose(1, 2), None

                setattr(module, method, fake)
                patched.append(module)
        try:
            yield captured
        finally:
            for module in patched:
                delattr(module, method)
        return

    def fake_attention(module, query, key, value, attention_mask, **kwargs):
        return record(module, query, key, value), None

    # the models look up "eager" in the shared interface mapping before falling back to their own function
    mapping = AttentionInterface._global_mapping
    had, previous = "eager" in mapping, mapping.get("eager")
    mapping["eager"] = fake_attention
    try:
        yield captured
    finally:
        if had:
            mapping["eager"] = previous
        else:
            del mapping["eager"]


def _inputs(batch: int = 2, seq: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB_SIZE, (batch, seq), generator=g)
    # all positions 0 → RoPE rotates by 0, so the captured q/k are the projection outputs
    return {"input_ids": ids, "position_ids": torch.zeros_like(ids)}


def _record_outputs(sites: list[TargetSite]) -> tuple[dict[nn.Module, torch.Tensor], list]:
    outputs: dict[nn.Module, torch.Tensor] = {}
    handles = [
        s.module.register_forward_hook(lambda m, args, out: outputs.__setitem__(m, out.detach().clone()))
        for s in {id(s.module): s for s in sites}.values()
    ]
    return outputs, handles


# --------------------------------------------------------------------------------------------------------------
# tiny_models itself: other test files rely on it
# --------------------------------------------------------------------------------------------------------------


def test_required_architectures_present():
    required = {"llama", "qwen2", "qwen3", "mistral", "gemma", "phi", "phi3", "gpt2", "gpt_neox", "opt"}
    assert required <= set(ARCHITECTURES)
    assert set(REPRESENTATIVE_ARCHITECTURES) <= set(ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_config_is_tiny(arch):
    cfg = tiny_config(arch)
    assert cfg.model_type == arch
    assert cfg.num_hidden_layers == NUM_LAYERS == 4
    assert 32 <= cfg.hidden_size <= 64 and 2 <= cfg.num_attention_heads <= 4
    assert 128 <= cfg.vocab_size <= 300
    assert getattr(cfg, "max_position_embeddings", getattr(cfg, "n_positions", 256)) >= 256


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_forward_matches_unpadded(models, arch):
    model = models[arch]
    lengths = [7, 3]
    ids, mask = left_padded_batch(lengths)
    assert mask.tolist() == [[1] * 7, [0] * 4 + [1] * 3] and (ids[1, :4] == 0).all()
    # absolute-position models (GPT-2, BigCode) need positions that skip the padding, as generate() passes them
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        assert logits.shape == (2, 7, VOCAB_SIZE) and torch.isfinite(logits).all()
        for row, n in enumerate(lengths):
            alone = model(input_ids=ids[row:row + 1, 7 - n:]).logits[0]
            torch.testing.assert_close(logits[row, 7 - n:], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_make_tiny_lm_deterministic_and_isolated(arch):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = make_tiny_lm(arch, seed=7)
    after = torch.rand(3)
    assert torch.equal(before, after), "make_tiny_lm must not consume the caller's RNG stream"
    b, c = make_tiny_lm(arch, seed=7), make_tiny_lm(arch, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert not a.training and all(p.dtype == torch.float32 for p in a.parameters())


def test_make_tiny_lm_vocab_and_errors():
    model = make_tiny_lm("qwen2", vocab_size=160)
    assert model.get_input_embeddings().num_embeddings == 160
    assert model.get_output_embeddings().out_features == 160
    with pytest.raises(ValueError, match="unknown tiny architecture 'nope'"):
        make_tiny_lm("nope")
    with pytest.raises(ValueError, match="vocab_size"):
        make_tiny_lm("llama", vocab_size=2)
    with pytest.raises(ValueError, match="lengths"):
        left_padded_batch([3, 0])


# --------------------------------------------------------------------------------------------------------------
# Model-level lookups
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_layers_hidden_size_embeddings(models, arch):
    model = models[arch]
    cfg = model.config
    layers = decoder_layers(model)
    assert isinstance(layers, nn.ModuleList)
    assert len(layers) == num_layers(model) == cfg.num_hidden_layers
    assert hidden_size(model) == cfg.hidden_size
    emb = input_embeddings(model)
    assert emb is model.get_input_embeddings()
    assert emb.num_embeddings == cfg.vocab_size and emb.embedding_dim == cfg.hidden_size
    assert arch_spec(model).name == (arch if arch in SPECIAL else "generic")


def test_multimodal_wrapper_uses_language_model():
    """A Llava-style wrapper: the language model's layers are found, not the vision tower's."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=16)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=tiny_config("llama"),
                                                      image_token_id=5))
    sites = find_targets(model)
    assert len(sites) == NUM_LAYERS * 7
    assert all(s.name.startswith("model.language_model.layers.") for s in sites)
    assert hidden_size(model) == 32 and num_layers(model) == NUM_LAYERS
    assert input_embeddings(model).num_embeddings == VOCAB_SIZE


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "opt", "phi3"])
def test_base_model_without_lm_head(models, arch):
    """The backbone (LlamaModel, GPT2Model, ...) resolves too, with names relative to itself."""
    base = models[arch].base_model
    sites = find_targets(base)
    assert num_layers(base) == NUM_LAYERS
    assert {s.module for s in sites} == {s.module for s in find_targets(models[arch])}
    assert all(base.get_submodule(s.name) is s.module for s in sites)


# --------------------------------------------------------------------------------------------------------------
# Sites: structure
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_every_role_on_every_layer(models, arch):
    model = models[arch]
    sites = find_targets(model)
    assert [s.layer for s in sites] == sorted(s.layer for s in sites)
    assert len({s.key for s in sites}) == len(sites), "keys must be unique"
    for layer in range(NUM_LAYERS):
        here = [s for s in sites if s.layer == layer]
        assert [s.role for s in here] == [r for r in ROLES for s in here if s.role == r], "canonical role order"
        for role in ("q", "k", "v", "o"):
            assert sum(s.role == role for s in here) == 1, f"{role} on layer {layer}"
        mlp = [s for s in here if s.role == "mlp"]
        assert len(mlp) >= 2
        prefix = here[0].name.split(f".{layer}.")[0] + f".{layer}."
        assert all(s.name.startswith(prefix) for s in here)


@pytest.mark.parametrize("arch", ARCHS)
def test_site_fields_consistent(models, arch):
    model = models[arch]
    cfg = model.config
    for s in find_targets(model):
        assert model.get_submodule(s.name) is s.module
        assert isinstance(s.module, (nn.Linear, Conv1D))
        assert s.transposed == isinstance(s.module, Conv1D)
        w_out, w_in = s.module.weight.shape[::-1] if s.transposed else s.module.weight.shape
        assert (s.in_features, s.module_out_features) == (w_in, w_out)
        idx = s.out_index()
        assert idx.dtype == torch.long and idx.numel() == s.out_features == len(set(idx.tolist()))
        assert 0 <= int(idx.min()) and int(idx.max()) < s.module_out_features
        assert s.module_out_features % s.out_groups == 0
        assert 0 <= s.out_slice.start < s.out_slice.stop <= s.module_out_features // s.out_groups
        if s.role in ("q", "k", "v"):
            assert s.in_features == cfg.hidden_size
        if s.role == "o":
            assert s.out_features == cfg.hidden_size
    # the o projection reads what q produces (n_heads * head_dim), the MLP's last linear writes hidden_size
    for layer in range(NUM_LAYERS):
        here = find_targets(model, layers=[layer])
        by_role = {s.role: s for s in here if s.role != "mlp"}
        assert by_role["o"].in_features == by_role["q"].out_features
        assert by_role["k"].out_features == by_role["v"].out_features
        assert [s for s in here if s.role == "mlp"][-1].out_features == cfg.hidden_size


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_modules_partitioned(models, arch):
    """Sites sharing a fused module own disjoint features that together cover its whole output."""
    by_module: dict[nn.Module, list[TargetSite]] = {}
    for s in find_targets(models[arch]):
        by_module.setdefault(s.module, []).append(s)
    for module, sites in by_module.items():
        owned = torch.cat([s.out_index() for s in sites]).sort().values
        assert torch.equal(owned, torch.arange(sites[0].module_out_features)), [s.key for s in sites]
        assert (len(sites) > 1) == sites[0].is_fused
        assert len({s.part for s in sites}) == len(sites)


@pytest.mark.parametrize("arch", ARCHS)
def test_all_layer_linears_are_targets(models, arch):
    """Dense models: every Linear/Conv1D inside a decoder layer is some role's site — nothing missed."""
    model = models[arch]
    site_modules = {s.module for s in find_targets(model)}
    for layer in decoder_layers(model):
        linears = {m for m in layer.modules() if isinstance(m, (nn.Linear, Conv1D))}
        assert linears == {m for m in site_modules if any(m is x for x in layer.modules())}


def test_conv1d_flagged_transposed(models):
    sites = find_targets(models["gpt2"])
    assert all(s.transposed and isinstance(s.module, Conv1D) for s in sites)
    assert not any(s.transposed for s in find_targets(models["llama"]))
    c_attn = [s for s in sites if s.layer == 0 and s.role in "qkv"]
    assert [s.part for s in c_attn] == ["q", "k", "v"]
    assert [s.out_slice for s in c_attn] == [slice(0, 32), slice(32, 64), slice(64, 96)]
    assert {s.name for s in c_attn} == {"transformer.h.0.attn.c_attn"}


def test_phi3_slices_follow_gqa(models):
    q, k, v = find_targets(models["phi3"], roles=("q", "k", "v"), layers=[2])
    # 4 query heads and 2 kv heads of head_dim 8
    assert (q.out_slice, k.out_slice, v.out_slice) == (slice(0, 32), slice(32, 48), slice(48, 64))
    assert q.name == k.name == v.name == "model.layers.2.self_attn.qkv_proj"
    gate, up, down = find_targets(models["phi3"], roles="mlp", layers=[2])
    assert (gate.part, up.part, down.part) == ("gate", "up", "down_proj")
    assert (gate.out_slice, up.out_slice) == (slice(0, 64), slice(64, 128))
    assert (gate.key, up.key, down.key) == (
        "model.layers.2.mlp.gate_up_proj:gate", "model.layers.2.mlp.gate_up_proj:up", "model.layers.2.mlp.down_proj"
    )


def test_neox_interleaved_per_head(models):
    q, k, v = find_targets(models["gpt_neox"], roles=("q", "k", "v"), layers=[0])
    hd = 8
    assert q.out_groups == 4 and q.out_slice == slice(0, hd)
    # output layout (n_heads, 3, head_dim): q of head h starts at h * 3 * head_dim
    assert q.out_index().tolist() == [h * 3 * hd + j for h in range(4) for j in range(hd)]
    assert v.out_index().tolist() == [h * 3 * hd + 2 * hd + j for h in range(4) for j in range(hd)]


# --------------------------------------------------------------------------------------------------------------
# Sites: agreement with the model's own code
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", CAPTURABLE)
def test_qkvo_match_what_attention_receives(models, arch):
    model = models[arch]
    sites = find_targets(model, roles=("q", "k", "v", "o"))
    outputs, handles = _record_outputs(sites)
    o_inputs: dict[nn.Module, torch.Tensor] = {}
    handles += [
        s.module.register_forward_pre_hook(lambda m, args: o_inputs.__setitem__(m, args[0].detach().clone()))
        for s in sites if s.role == "o"
    ]
    try:
        with capture_attention(model, arch) as captured, torch.no_grad():
            model(**_inputs())
    finally:
        for h in handles:
            h.remove()
    checked = {"q": 0, "k": 0, "v": 0, "o": 0}
    for s in sites:
        attn = model.get_submodule(s.name.rsplit(".", 1)[0])
        seen = captured[attn]
        if s.role == "o":
            torch.testing.assert_close(o_inputs[s.module], seen["q"], rtol=0, atol=0)
        elif s.role == "v" or arch not in QK_TRANSFORMED:
            torch.testing.assert_close(s.select_out(outputs[s.module]), seen[s.role], rtol=0, atol=0)
        else:
            continue
        checked[s.role] += 1
    assert checked["v"] == checked["o"] == NUM_LAYERS
    assert checked["q"] == checked["k"] == (0 if arch in QK_TRANSFORMED else NUM_LAYERS)


@pytest.mark.parametrize("arch", CAPTURABLE)
def test_delta_reaches_only_its_role(models, arch):
    """A delta added through a q/k/v site changes that role's attention input and leaves the other two alone."""
    model = models[arch]
    layer = 1
    attn_name = find_targets(model, roles="v", layers=[layer])[0].name.rsplit(".", 1)[0]
    attn = model.get_submodule(attn_name)
    inputs = _inputs(seed=1)
    with capture_attention(model, arch) as captured, torch.no_grad():
        model(**inputs)
        base = dict(captured[attn])
        for site in find_targets(model, roles=("q", "k", "v"), layers=[layer]):
            delta = torch.randn(2, 5, site.out_features, generator=torch.Generator().manual_seed(3))
            handle = site.module.register_forward_hook(lambda m, a, out, s=site, d=delta: s.add_to_output(out, d))
            try:
                model(**inputs)
            finally:
                handle.remove()
            for role in ("q", "k", "v"):
                changed = not torch.equal(captured[attn][role], base[role])
                assert changed == (role == site.role), f"delta on {site.key} ({site.role}) vs captured {role}"
                if role == site.role and (role == "v" or arch not in QK_TRANSFORMED):
                    torch.testing.assert_close(captured[attn][role] - base[role], delta, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["bloom", "falcon", "gpt_neox", "gpt_bigcode"])
def test_fused_qkv_matches_own_split_method(models, arch):
    """Feed a fused projection output through the attention module's own head-split code."""
    model = models[arch]
    cfg = model.config
    q, k, v = find_targets(model, roles=("q", "k", "v"), layers=[1])
    attn = model.get_submodule(q.name.rsplit(".", 1)[0])
    fused = torch.randn(2, 5, q.module_out_features, generator=torch.Generator().manual_seed(0))
    nh, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    if arch == "bloom":  # _reshape → (B, H, S, D) each
        own = [_flat_heads(t) for t in attn._reshape(fused)]
    elif arch == "falcon":
        n_kv = cfg.num_kv_heads
        if hasattr(attn, "_split_heads"):  # transformers <= 5.24: (B, S, H, D), k/v broadcast to all query heads
            sq, sk, sv = attn._split_heads(fused)
            first_of_group = lambda t: t.unflatten(2, (n_kv, nh // n_kv))[:, :, :, 0].flatten(2)  # noqa: E731
            own = [sq.flatten(2), first_of_group(sk), first_of_group(sv)]
        else:  # 5.25 moved the split into forward: per kv group [its queries..., key, value]
            grouped = fused.view(2, 5, n_kv, -1, hd)
            own = [grouped[..., :-2, :].flatten(2), grouped[..., -2, :].flatten(2), grouped[..., -1, :].flatten(2)]
    elif arch == "gpt_neox":  # the forward's own expression
        own = [_flat_heads(t) for t in fused.view(2, 5, -1, 3 * hd).transpose(1, 2).chunk(3, dim=-1)]
    else:  # GPT-BigCode multi-query: split by (embed_dim, kv_dim, kv_dim)
        own = list(fused.split((attn.embed_dim, attn.kv_dim, attn.kv_dim), dim=-1))
    for site, expected in zip((q, k, v), own):
        torch.testing.assert_close(site.select_out(fused), expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["phi3", "llama"])
def test_gate_up_match_mlp_computation(models, arch):
    """gate feeds the activation, and down_proj's input is act(gate) * up — for fused and separate layouts."""
    model = models[arch]
    gate, up, down = find_targets(model, roles="mlp", layers=[0])
    mlp = model.get_submodule(down.name.rsplit(".", 1)[0])
    act = mlp.activation_fn if arch == "phi3" else mlp.act_fn
    outputs, handles = _record_outputs([gate, up])
    seen: dict[str, torch.Tensor] = {}
    handles.append(act.register_forward_pre_hook(lambda m, a: seen.__setitem__("act_in", a[0].detach().clone())))
    handles.append(down.module.register_forward_pre_hook(lambda m, a: seen.__setitem__("down_in", a[0].detach())))
    try:
        with torch.no_grad():
            model.model.layers[0].mlp(torch.randn(2, 5, 32))
    finally:
        for h in handles:
            h.remove()
    g, u = gate.select_out(outputs[gate.module]), up.select_out(outputs[up.module])
    torch.testing.assert_close(g, seen["act_in"], rtol=0, atol=0)
    torch.testing.assert_close(act(g) * u, seen["down_in"], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------
# Scatter helpers
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["phi3", "gpt2", "gpt_neox", "falcon", "llama"])
def test_scatter_helpers_agree(models, arch):
    gen = torch.Generator().manual_seed(0)
    for site in find_targets(models[arch], layers=[0]):
        y = torch.randn(2, 3, site.module_out_features, generator=gen)
        delta = torch.randn(2, 3, site.out_features, generator=gen)
        out = site.add_to_output(y, delta)
        idx = site.out_index()
        torch.testing.assert_close(site.select_out(out) - site.select_out(y), delta)
        torch.testing.assert_close(site.select_out(y), y[..., idx], rtol=0, atol=0)
        others = torch.ones(site.module_out_features, dtype=torch.bool)
        others[idx] = False
        assert torch.equal(out[..., others], y[..., others])
        # any dim: features on dim 0
        torch.testing.assert_close(site.select_out(y.movedim(-1, 0), dim=0), y[..., idx].movedim(-1, 0))
        torch.testing.assert_close(site.embed_out(delta.movedim(-1, 0), dim=0).movedim(0, -1), out - y)
        # broadcasting: one delta vector for every token
        vec = torch.randn(site.out_features, generator=gen)
        torch.testing.assert_close(site.select_out(site.add_to_output(y, vec)), site.select_out(y) + vec)


@pytest.mark.parametrize("arch", ["phi3", "gpt2", "gpt_neox", "falcon"])
def test_weight_delta_embedding_equals_output_delta(models, arch):
    """Merging `embed_out(dW, dim=0)` (transposed for Conv1D) into the weight == adding x dWᵀ to the role's output."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 32, generator=gen)
    for site in find_targets(models[arch], layers=[3]):
        d_w = torch.randn(site.out_features, site.in_features, generator=gen)
        full = site.embed_out(d_w, dim=0)
        if site.transposed:
            full = full.T
        assert full.shape == site.module.weight.shape
        x_in = x if site.in_features == 32 else torch.randn(4, site.in_features, generator=gen)
        with torch.no_grad():
            expected = site.add_to_output(site.module(x_in), x_in @ d_w.T)
            merged = site.module(x_in)
            site.module.weight.add_(full)
            try:
                merged = site.module(x_in)
            finally:
                site.module.weight.sub_(full)
        torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)


def test_scatter_helpers_reject_wrong_width(models):
    site = find_targets(models["phi3"], roles="k", layers=[0])[0]
    with pytest.raises(ValueError, match=r"qkv_proj:k: expected 16 features"):
        site.embed_out(torch.zeros(3, 17))
    with pytest.raises(ValueError, match=r"expected the module's 64 output features"):
        site.select_out(torch.zeros(3, 16))


def test_sites_hashable_and_comparable(models):
    a = find_targets(models["phi3"], layers=[0])
    b = find_targets(models["phi3"], layers=[0])
    assert a == b and len(set(a) | set(b)) == len(a)


# --------------------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "phi3"])
def test_selection_by_roles_and_layers(models, arch):
    model = models[arch]
    every2 = injection_layers(num_layers(model), every=2)
    sites = find_targets(model, roles=("v", "q"), layers=every2)
    assert {s.layer for s in sites} == {0, 2}
    assert [(s.layer, s.role) for s in sites] == [(0, "q"), (0, "v"), (2, "q"), (2, "v")]
    last_o = [s for s in find_targets(model) if s.layer == 3 and s.role == "o"]
    assert find_targets(model, roles="o", layers=(3,)) == last_o
    assert find_targets(model, roles=["k", "k"]) == find_targets(model, roles="k")
    mlp_only = find_targets(model, roles="mlp", layers=[1])
    assert mlp_only and all(s.role == "mlp" and s.layer == 1 for s in mlp_only)
    assert find_targets(model, layers=[3, 1]) == [s for s in find_targets(model) if s.layer in (1, 3)]


def test_injection_layers_rules():
    assert injection_layers(4, every=2) == [0, 2]
    assert injection_layers(32, every=4) == list(range(0, 32, 4)) and len(injection_layers(32, every=4)) == 8
    assert injection_layers(5, every=2) == [0, 2, 4]
    assert injection_layers(4, every=1) == [0, 1, 2, 3]
    assert injection_layers(4, every=9) == [0]
    assert injection_layers(4, explicit=[3, 1]) == [1, 3]
    assert injection_layers(4, explicit=(torch.tensor(2),)) == [2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_layers": 4, "explicit": [1, 4]}, r"layer index 4 out of range .* 4 layers \(valid: 0\.\.3\)"),
        ({"n_layers": 4, "explicit": [-1]}, r"layer index -1 out of range"),
        ({"n_layers": 4, "explicit": [1, 1]}, r"layer index 1 given twice"),
        ({"n_layers": 4, "explicit": [1.0]}, r"layer index 1\.0 is not an int"),
        ({"n_layers": 4, "explicit": [True]}, r"layer index True is not an int"),
        ({"n_layers": 4, "explicit": []}, r"no layers selected"),
        ({"n_layers": 4, "explicit": 2}, r"iterable of ints"),
        ({"n_layers": 4, "every": 2, "explicit": [0]}, r"exactly one of `every` and `explicit`"),
        ({"n_layers": 4}, r"exactly one of `every` and `explicit`"),
        ({"n_layers": 4, "every": 0}, r"every must be a positive int"),
        ({"n_layers": 0, "every": 1}, r"n_layers must be a positive int"),
    ],
)
def test_injection_layers_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        injection_layers(**kwargs)


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


def test_unknown_role(models):
    with pytest.raises(ValueError, match=r"unknown role 'gate'; valid roles are \('q', 'k', 'v', 'o', 'mlp'\)"):
        find_targets(models["llama"], roles=("q", "gate"))
    with pytest.raises(ValueError, match="no roles given"):
        find_targets(models["llama"], roles=())


def test_bad_layer_index(models):
    with pytest.raises(ValueError, match=r"layer index 4 out of range for a model with 4 layers"):
        find_targets(models["llama"], layers=[0, 4])
    with pytest.raises(ValueError, match=r"given twice"):
        find_targets(models["gpt2"], layers=[2, 2])


def test_plain_module_is_unsupported():
    plain = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(UnsupportedModelError,
                       match=r"Sequential: no decoder layer list found \(looked for .*model\.layers"):
        find_targets(plain)
    with pytest.raises(UnsupportedModelError, match="Sequential: no input token embedding"):
        input_embeddings(plain)
    assert issubclass(UnsupportedModelError, ValueError)


def test_renamed_layer_list_is_unsupported():
    model = make_tiny_lm("llama")
    model.model.blocks = model.model.layers
    del model.model.layers
    with pytest.raises(UnsupportedModelError, match=r"LlamaForCausalLM \(model_type='llama'\): no decoder layer list"):
        decoder_layers(model)
    with pytest.raises(UnsupportedModelError, match=r"transformer\.h"):
        find_targets(model)


def test_missing_role_module_named():
    model = make_tiny_lm("mistral")
    del model.model.layers[2].self_attn.v_proj
    assert len(find_targets(model, roles=("q", "k", "o", "mlp"))) == 4 * 6  # other roles still resolve
    with pytest.raises(UnsupportedModelError, match=r"MistralForCausalLM .*layer 2 has no module for role 'v' "
                                                    r"\(looked for self_attn\.v_proj, self_attn\.value"):
        find_targets(model, roles="v")


def test_missing_attention_and_mlp_named():
    model = make_tiny_lm("qwen2")
    model.model.layers[1].self_attn = nn.Identity()
    with pytest.raises(UnsupportedModelError, match=r"layer 1 has no module for role 'q'"):
        find_targets(model, roles="q")
    model = make_tiny_lm("qwen2")
    model.model.layers[3].mlp = nn.Identity()
    with pytest.raises(UnsupportedModelError, match=r"layer 3 has no module for role 'mlp' \(looked for .*gate_proj"):
        find_targets(model, roles="mlp")
    model = make_tiny_lm("qwen2")
    del model.model.layers[0].self_attn
    with pytest.raises(UnsupportedModelError, match=r"layer 0 has no attention module \(looked for self_attn, attn"):
        find_targets(model, roles="o")


def test_non_linear_role_module_named():
    model = make_tiny_lm("llama")
    model.model.layers[0].self_attn.q_proj = nn.Conv2d(1, 1, 1)
    with pytest.raises(UnsupportedModelError, match=r"'self_attn\.q_proj' for role 'q' is a Conv2d"):
        find_targets(model)


def test_mixture_of_experts_mlp_named():
    model = make_tiny_lm("llama")
    moe = nn.Module()
    moe.gate = nn.Linear(32, 4)  # a router, not a gate projection
    moe.experts = nn.ModuleList([nn.Linear(32, 32) for _ in range(4)])
    model.model.layers[0].mlp = moe
    with pytest.raises(UnsupportedModelError, match=r"layer 0 has a mixture-of-experts MLP \('mlp\.experts'\)"):
        find_targets(model)
    assert len(find_targets(model, roles=("q", "k", "v", "o"))) == 16


def test_fused_projection_never_guessed(monkeypatch):
    """Without a table entry a fused q/k/v or gate/up projection is refused, not split by guesswork."""
    model = make_tiny_lm("phi3")
    monkeypatch.delitem(targets.ARCH_SPECS, "phi3")
    assert arch_spec(model).name == "generic"
    with pytest.raises(UnsupportedModelError, match=r"fused q/k/v projection 'self_attn\.qkv_proj' whose output "
                                                    r"layout is unknown .*register_architecture"):
        find_targets(model, roles="k")
    with pytest.raises(UnsupportedModelError, match=r"fused MLP projection 'mlp\.gate_up_proj'"):
        find_targets(model, roles="mlp")
    assert len(find_targets(model, roles="o")) == NUM_LAYERS


def test_fused_width_mismatch_named():
    model = make_tiny_lm("phi3")
    model.config.num_key_value_heads = 4  # qkv_proj is 64 wide; 4 kv heads would need 96
    with pytest.raises(UnsupportedModelError, match=r"output width 64 does not match the concat q/k/v layout of "
                                                    r"4 heads, 4 kv heads, head_dim 8"):
        find_targets(model, roles="v")


def test_register_architecture(monkeypatch):
    monkeypatch.setattr(targets, "ARCH_SPECS", dict(targets.ARCH_SPECS))
    model = make_tiny_lm("llama")
    model.model.blocks = model.model.layers
    del model.model.layers
    spec = ArchSpec(
        name="renamed_llama", layers=("model.blocks",), attention=("self_attn",), q=("q_proj",), k=("k_proj",),
        v=("v_proj",), o=("o_proj",), mlp=("gate_proj", "up_proj", "down_proj"),
    )
    with pytest.raises(ValueError, match="'gpt2' is already registered"):
        register_architecture("gpt2", spec)
    with pytest.raises(TypeError, match="ArchSpec"):
        register_architecture("x", {"layers": ()})
    register_architecture("llama", spec, overwrite=True)
    sites = find_targets(model)
    assert len(sites) == 4 * 7 and sites[0].name == "model.blocks.0.self_attn.q_proj"


def test_fused_spec_for_custom_model(monkeypatch):
    """A registered FusedQKV entry is all it takes to support a new fused layout (here: GPT-2 named differently)."""
    monkeypatch.setattr(targets, "ARCH_SPECS", dict(targets.ARCH_SPECS))
    model = make_tiny_lm("gpt2")
    monkeypatch.setattr(type(model.config), "model_type", "my_gpt")
    assert arch_spec(model).name == "generic"
    with pytest.raises(UnsupportedModelError, match="c_attn"):
        find_targets(model)
    register_architecture("my_gpt", ArchSpec(
        name="my_gpt", layers=("transformer.h",), attention=("attn",), q=(), k=(), v=(), o=("c_proj",),
        fused_qkv=(FusedQKV("c_attn", "concat", lambda cfg: cfg.num_attention_heads),), mlp=("c_fc", "c_proj"),
    ))
    monkeypatch.setattr(type(model.config), "model_type", "gpt2")
    expected = [(s.name, s.out_slice) for s in find_targets(model)]
    monkeypatch.setattr(type(model.config), "model_type", "my_gpt")
    assert [(s.name, s.out_slice) for s in find_targets(model)] == expected
