"""Contexts under threads and asyncio: what is guaranteed, and the documented limit (contexts don't cross threads)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import DV, encode, random_features
from video2param import VideoAdapterConfig, wrap_model

CALLS = 200


@pytest.fixture
def vm(llama, tokenizer):
    torch.manual_seed(0)
    model = wrap_model(llama, VideoAdapterConfig(method="vipe", vision_hidden_size=DV, num_frames=4, rank=4,
                                                 inject_every=2, options={"hidden_dim": 16, "depth": 1, "num_heads": 2}),
                       tokenizer=tokenizer)
    with torch.no_grad():
        for p in model.method.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def _expected(vm, ids, mask, contexts):
    return [vm(input_ids=ids, attention_mask=mask, context=c).logits for c in contexts]


def test_two_threads_many_calls_on_different_videos(vm, tokenizer):
    ids, mask = encode(tokenizer, ["what colour is the object ?"])
    contexts = [vm.encode_video(random_features(1, seed=s)) for s in (1, 2)]
    expected = _expected(vm, ids, mask, contexts)
    wrong = [0, 0]
    barrier = threading.Barrier(2)

    def worker(i):
        barrier.wait()
        for _ in range(CALLS):
            with torch.no_grad():
                out = vm(input_ids=ids, attention_mask=mask, context=contexts[i]).logits
            wrong[i] += not torch.allclose(out, expected[i], atol=1e-6)

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert wrong == [0, 0]


def test_merge_in_one_thread_while_another_calls(vm, tokenizer):
    ids, mask = encode(tokenizer, ["what colour is the object ?"])
    merged_ctx, other_ctx = (vm.encode_video(random_features(1, seed=s)) for s in (1, 2))
    expected_merged, expected_other = _expected(vm, ids, mask, [merged_ctx, other_ctx])
    results: dict[str, list] = {"merged": [], "other": []}
    inside = threading.Event()
    done = threading.Event()

    def merger():
        with vm.merged(merged_ctx):
            inside.set()
            for _ in range(20):
                with torch.no_grad():
                    out = vm(input_ids=ids, attention_mask=mask, context=merged_ctx).logits
                results["merged"].append(torch.allclose(out, expected_merged, atol=1e-5))
            done.wait(timeout=60)

    def caller():
        inside.wait(timeout=60)
        for _ in range(5):
            try:
                with torch.no_grad():
                    out = vm(input_ids=ids, attention_mask=mask, context=other_ctx).logits
                results["other"].append(torch.allclose(out, expected_other, atol=1e-5))
            except RuntimeError as err:  # refused while another video is merged: never a wrong answer
                results["other"].append("merged" in str(err))
        done.set()

    threads = [threading.Thread(target=merger), threading.Thread(target=caller)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert results["merged"] == [True] * 20 and results["other"] == [True] * 5
    # and afterwards the model serves any video again
    torch.testing.assert_close(vm(input_ids=ids, attention_mask=mask, context=other_ctx).logits, expected_other)


def test_asyncio_tasks_see_their_own_video(vm, tokenizer):
    ids, mask = encode(tokenizer, ["what colour is the object ?"])
    contexts = [vm.encode_video(random_features(1, seed=s)) for s in (1, 2, 3)]
    expected = _expected(vm, ids, mask, contexts)

    async def ask(i):
        with vm.use(contexts[i]):
            await asyncio.sleep(0)  # let the other tasks enter their own blocks
            with torch.no_grad():
                return torch.allclose(vm.llm(input_ids=ids, attention_mask=mask).logits, expected[i], atol=1e-6)

    async def main():
        return await asyncio.gather(*(ask(i) for i in range(3)))

    assert asyncio.run(main()) == [True, True, True]


def test_contexts_do_not_cross_threads_pass_context_instead(vm, tokenizer):
    """The documented limit: work handed to a thread inside `use()` runs without the video."""
    ids, mask = encode(tokenizer, ["what colour is the object ?"])
    ctx = vm.encode_video(random_features(1, seed=1))
    plain = vm.llm(input_ids=ids, attention_mask=mask).logits
    with_video = vm(input_ids=ids, attention_mask=mask, context=ctx).logits
    with vm.use(ctx), ThreadPoolExecutor(1) as pool:
        elsewhere = pool.submit(lambda: vm.llm(input_ids=ids, attention_mask=mask).logits).result()
        recommended = pool.submit(lambda: vm(input_ids=ids, attention_mask=mask, context=ctx).logits).result()
    assert torch.equal(elsewhere, plain)
    torch.testing.assert_close(recommended, with_video)
