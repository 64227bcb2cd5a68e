"""The diffusion model and objective: shapes, CFG, null embedding, v-target algebra, EMA, overfit."""

import pytest
import torch

from train.diffusion import EMA, diffusion_loss, make_scheduler
from train.models import PRESETS, build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny", cond_dim=16)


def test_shapes_and_null_embedding(model):
    x = torch.randn(3, 3, 32, 32)
    t = torch.tensor([1, 500, 999])
    cond = torch.randn(3, 16)
    assert model(x, t, cond).shape == x.shape
    drop = torch.tensor([True, False, True])
    tok = model.condition_tokens(cond, drop)
    null = model.condition_tokens(model.null_embedding.detach().expand(3, 16))
    assert torch.allclose(tok[0], null[0]) and torch.allclose(tok[2], null[2]) and not torch.allclose(tok[1], null[1])
    assert tok.shape == (3, PRESETS["tiny"].cond_tokens, PRESETS["tiny"].cross_attention_dim)


def test_cfg_scale_one_is_conditional_and_zero_unconditional(model):
    torch.manual_seed(1)
    with torch.no_grad():
        model.null_embedding.normal_()  # make conditional and unconditional differ
        x, t, cond = torch.randn(2, 3, 32, 32), torch.tensor([10, 700]), torch.randn(2, 16)
        assert torch.allclose(model.forward_with_cfg(x, t, cond, 1.0), model(x, t, cond), atol=1e-5)
        uncond = model(x, t, cond, torch.ones(2, dtype=torch.bool))
        assert torch.allclose(model.forward_with_cfg(x, t, cond, 0.0), uncond, atol=1e-5)


def test_v_target_recovers_x0():
    sch = make_scheduler("v_prediction")
    x0, noise, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0, 100, 600, 999])
    xt, v = sch.add_noise(x0, noise, t), sch.get_velocity(x0, noise, t)
    a = sch.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(a.sqrt() * xt - (1 - a).sqrt() * v, x0, atol=1e-4)
    assert sch.alphas_cumprod[0] > 0.99 and sch.alphas_cumprod[-1] < 1e-3  # cosine: clean to pure noise
    with pytest.raises(ValueError):
        make_scheduler("sample")


def test_loss_falls_when_overfitting_a_batch_and_ema_follows():
    torch.manual_seed(0)
    m = build_model("tiny", cond_dim=16)
    ema = EMA(m, decay=0.9)
    sch = make_scheduler()
    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    cond = torch.randn(4, 16)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):  # the same noise, timesteps and dropout every step: a fixed regression target
        loss = diffusion_loss(m, sch, x0, cond, p_uncond=0.1, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(m)
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.65 * losses[0]  # 0.78 -> 0.42 seen
    p, e = m.unet.conv_in.weight, ema.model.unet.conv_in.weight
    assert not torch.equal(p, e) and not e.requires_grad


def test_sampler_is_deterministic_and_guidance_zero_ignores_the_condition(model):
    from train.diffusion import grid, sample, to_pil

    cond = torch.randn(2, 16)
    a = sample(model, cond, steps=4, guidance=3.0, generator=torch.Generator().manual_seed(0))
    b = sample(model, cond, steps=4, guidance=3.0, generator=torch.Generator().manual_seed(0), sampler="ddim")
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b) and a.abs().max() <= 1
    u1 = sample(model, cond, steps=4, guidance=0.0, generator=torch.Generator().manual_seed(0))
    u2 = sample(model, torch.randn(2, 16), steps=4, guidance=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(u1, u2, atol=1e-5)  # unconditional: the embedding does not matter
    assert sample(model, cond, steps=4, sampler="dpm", generator=torch.Generator().manual_seed(0)).shape == (2, 3, 32, 32)
    sheet = grid(to_pil(a) + to_pil(u1), cols=2)
    assert sheet.size == (64, 64)


def test_attention_blocks_put_cross_attention_at_the_deepest_resolutions():
    """`small` attends to the condition at 8 px only (cheaper on a CPU); every preset attends somewhere."""
    import dataclasses

    from train.models import SemanticaUNet

    small = build_model("small", cond_dim=16)
    assert [type(b).__name__ for b in small.unet.down_blocks] == ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"]
    assert [type(b).__name__ for b in small.unet.up_blocks] == ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"]
    tiny = build_model("tiny", cond_dim=16)  # 0 = every resolution but the first
    assert [type(b).__name__ for b in tiny.unet.down_blocks] == ["DownBlock2D", "CrossAttnDownBlock2D"]
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    assert small.to(memory_format=torch.channels_last)(x, torch.tensor([3, 900]), torch.randn(2, 16)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="attention_blocks"):
        SemanticaUNet(dataclasses.replace(PRESETS["small"], attention_blocks=3), 16)
