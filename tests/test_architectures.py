"""Every architecture of the matrix: identity at birth, per-sample deltas, merge, register of a user's method."""

import pytest
import torch
from conftest import DV, random_features
from tiny_models import ARCHITECTURES, make_tiny_lm

from video2param import VideoAdapterConfig, wrap_model

VIPE = {"hidden_dim": 32, "num_heads": 4, "depth": 2}


def _ids(llm, batch=2, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = llm.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on the second row
    return ids, mask


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_identity_at_birth_and_video_path(arch):
    llm = make_tiny_lm(arch)
    ids, mask = _ids(llm)
    base = llm(input_ids=ids, attention_mask=mask).logits
    modules = dict(llm.named_modules())

    vm = wrap_model(llm, VideoAdapterConfig(method="vipe", vision_hidden_size=DV, num_frames=4, rank=4,
                                            inject_every=2, options=VIPE))
    feats = random_features(2)
    # Fresh ViPE: W_l is zero, so the model is the base model exactly — with and without a video.
    assert torch.equal(vm(input_ids=ids, attention_mask=mask).logits, base)
    assert torch.equal(vm(input_ids=ids, attention_mask=mask, videos=feats).logits, base)
    roles = {s.role for s in vm.llm_info.sites}
    assert roles == {"q", "k", "v", "o", "mlp"}

    torch.manual_seed(0)
    with torch.no_grad():  # as if trained
        for p in vm.method.W_l.parameters():
            p.normal_(std=0.2)
    with_video = vm(input_ids=ids, attention_mask=mask, videos=feats).logits
    assert not torch.allclose(with_video, base, atol=1e-4)
    alone = vm(input_ids=ids[:1], attention_mask=mask[:1], videos=feats[:1]).logits
    assert torch.allclose(with_video[:1], alone, atol=1e-4)
    ctx = vm.encode_video(feats[1:])
    with vm.merged(ctx):
        merged = vm(input_ids=ids[1:], attention_mask=mask[1:], context=ctx).logits
    assert torch.allclose(merged, with_video[1:], atol=1e-4)

    back = vm.unwrap()
    assert all(back.get_submodule(n) is m for n, m in modules.items() if n)
    assert torch.equal(back(input_ids=ids, attention_mask=mask).logits, base)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_llava_identity_on_text_and_splice(arch):
    llm = make_tiny_lm(arch)
    ids, mask = _ids(llm)
    base = llm(input_ids=ids, attention_mask=mask).logits
    vm = wrap_model(llm, method="llava", vision_hidden_size=DV, num_frames=4)
    assert torch.equal(vm(input_ids=ids, attention_mask=mask).logits, base)
    out = vm(input_ids=ids, attention_mask=mask, videos=random_features(2), labels=ids)
    assert torch.isfinite(out.loss)
    assert out.logits.shape[1] == ids.shape[1] + 16
