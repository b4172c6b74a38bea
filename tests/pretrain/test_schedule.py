import pytest
import torch

from pretrain.schedule import WarmupCosine, scale_lr, set_lr


def test_warmup_is_linear_from_warmup_lr_to_base_lr():
    sched = WarmupCosine(base_lr=1e-3, warmup_steps=10, total_steps=100, min_lr=1e-5, warmup_lr=1e-6)
    assert sched(0) == pytest.approx(1e-6)
    assert sched(5) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))
    assert sched(10) == pytest.approx(1e-3)


def test_cosine_reaches_min_lr_at_total_steps_and_stays():
    sched = WarmupCosine(base_lr=1e-3, warmup_steps=10, total_steps=110, min_lr=1e-5)
    assert sched(60) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # half way: cos(pi/2) = 0
    assert sched(110) == pytest.approx(1e-5)
    assert sched(10_000) == pytest.approx(1e-5)
    lrs = [sched(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_matches_timm_cosine_scheduler_with_warmup_prefix():
    timm_scheduler = pytest.importorskip("timm.scheduler")
    warmup, total = 7, 40
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2e-3)
    ref = timm_scheduler.CosineLRScheduler(opt, t_initial=total - warmup, lr_min=3e-5, warmup_t=warmup,
                                           warmup_lr_init=1e-6, warmup_prefix=True, t_in_epochs=False,
                                           cycle_limit=1)
    ours = WarmupCosine(2e-3, warmup, total, min_lr=3e-5, warmup_lr=1e-6)
    for step in range(total):
        ref.step_update(step)
        assert ours(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), step


def test_no_warmup_starts_at_base_lr():
    assert WarmupCosine(0.1, 0, 10)(0) == pytest.approx(0.1)


@pytest.mark.parametrize("kwargs, word", [
    (dict(base_lr=1e-3, warmup_steps=20, total_steps=10), "warmup_steps"),
    (dict(base_lr=1e-3, warmup_steps=0, total_steps=0), "total_steps"),
    (dict(base_lr=1e-3, warmup_steps=0, total_steps=10, min_lr=1e-2), "min_lr"),
    (dict(base_lr=-1.0, warmup_steps=0, total_steps=10), "base_lr"),
])
def test_bad_arguments_are_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        WarmupCosine(**kwargs)


def test_scale_lr_is_linear_in_global_batch():
    assert scale_lr(5e-4, 1024) == pytest.approx(1e-3)  # official rule: lr * batch / 512
    # The paper's G recipe: 1.4e-3 is already the lr at batch 9216.
    assert scale_lr(1.4e-3, 9216, reference_batch=9216) == pytest.approx(1.4e-3)
    assert scale_lr(1.4e-3, 4608, reference_batch=9216) == pytest.approx(0.7e-3)
    assert scale_lr(1.4e-3, 4608, reference_batch=None) == 1.4e-3
    with pytest.raises(ValueError, match="global_batch"):
        scale_lr(1e-3, 0)


def test_set_lr_applies_each_group_scale_once():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a], "lr_scale": 0.25}, {"params": [b]}], lr=1.0)
    for _ in range(2):  # setting twice must not compound the scale
        set_lr(opt.param_groups, 0.4)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.1), pytest.approx(0.4)]
