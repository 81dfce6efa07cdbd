"""gptfast.kernels.nn.LayerNorm as a drop-in for torch.nn.LayerNorm, and swap_layer_norms on whole models."""

import copy

import pytest
import torch
from torch import nn

from gptfast.kernels.nn import LayerNorm, swap_layer_norms

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _assert_same_forward_backward(ours: nn.Module, ref: nn.Module, x: torch.Tensor, atol=1e-5):
    """Outputs and every parameter's (and a float input's) gradient agree in fp32."""
    xo, xr = x.clone().requires_grad_(x.is_floating_point()), x.clone().requires_grad_(x.is_floating_point())
    yo, yr = ours(xo), ref(xr)
    yo = getattr(yo, "logits", yo)
    yr = getattr(yr, "logits", yr)
    torch.testing.assert_close(yo, yr, rtol=1e-4, atol=atol)
    g = torch.randn_like(yr)
    yo.backward(g)
    yr.backward(g)
    if xr.grad is not None:
        torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-4, atol=atol)
    named_ref = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if named_ref[name].grad is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, named_ref[name].grad, rtol=1e-4, atol=atol, msg=name)


@pytest.mark.parametrize(
    "args,kwargs",
    [
        ((48,), {}),
        ((48,), {"eps": 1e-6}),
        ((48,), {"elementwise_affine": False}),
        ((48,), {"bias": False}),
        (((3, 16),), {}),  # multi-dim normalized_shape: trailing dims flattened
    ],
)
def test_drop_in_matches_torch(args, kwargs):
    torch.manual_seed(0)
    ref = nn.LayerNorm(*args, **kwargs, device=DEVICE)
    ours = LayerNorm(*args, **kwargs, device=DEVICE)
    if ref.weight is not None:  # not the trivial init, so a wrong weight/bias shows
        nn.init.normal_(ref.weight, 1.0, 0.3)
    if ref.bias is not None:
        nn.init.normal_(ref.bias, 0.0, 0.3)
    ours.load_state_dict(ref.state_dict())
    shape = (2, 5, *ref.normalized_shape)
    _assert_same_forward_backward(ours, ref, torch.randn(shape, device=DEVICE) * 3 + 1)


def test_same_parameters_state_dict_and_repr():
    ref = nn.LayerNorm(32, eps=1e-6, dtype=torch.float16, device=DEVICE)
    ours = LayerNorm(32, eps=1e-6, dtype=torch.float16, device=DEVICE)
    assert isinstance(ours, nn.LayerNorm)
    assert [n for n, _ in ours.named_parameters()] == ["weight", "bias"]
    assert ours.weight.dtype == torch.float16 and ours.weight.device.type == DEVICE
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert repr(ours) == repr(ref)
    ref.load_state_dict(ours.state_dict())  # and back


def test_half_precision_module():
    ours = LayerNorm(64, device=DEVICE, dtype=torch.bfloat16)
    x = torch.randn(4, 64, device=DEVICE, dtype=torch.bfloat16)
    y = ours(x)
    assert y.dtype == torch.bfloat16
    ref = torch.nn.functional.layer_norm(x.double(), (64,))
    assert (y.double() - ref).abs().max() < 0.05


def test_autocast_output_dtype_is_torchs():
    """Under autocast the drop-in returns what nn.LayerNorm returns (fp32 on CUDA, bf16 on CPU)."""
    device_type = DEVICE
    torch.manual_seed(0)
    ref = nn.LayerNorm(48).to(device_type)
    ours = copy.deepcopy(ref).to(device_type)
    swap_layer_norms(ours)
    x = torch.randn(5, 48, device=device_type, dtype=torch.bfloat16)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        y_ref, y = ref(x), ours(x)
    assert y.dtype == y_ref.dtype
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)


def test_wrong_trailing_dims_raise():
    with pytest.raises(ValueError, match=r"trailing dims \(3, 16\), got shape \(2, 16, 3\)"):
        LayerNorm((3, 16), device=DEVICE)(torch.randn(2, 16, 3, device=DEVICE))
    with pytest.raises(ValueError, match=r"trailing dims \(8,\), got shape \(2, 9\)"):
        LayerNorm(8, device=DEVICE)(torch.randn(2, 9, device=DEVICE))


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class _Custom(nn.LayerNorm):
    """A subclass with its own forward: swap_layer_norms must leave it alone."""

    def forward(self, x):
        return super().forward(x) * 2


def test_swap_torch_model():
    torch.manual_seed(0)
    d = 24
    model = nn.Sequential(nn.Linear(8, d), _Block(d), _Block(d), nn.LayerNorm(d, bias=False), _Custom(d)).to(DEVICE)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.normal_(m.weight, 1.0, 0.3)
    ref = copy.deepcopy(model)
    params = [id(p) for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}

    assert swap_layer_norms(model) is model
    assert [type(m) for m in model.modules() if isinstance(m, nn.LayerNorm)] == [LayerNorm] * 3 + [_Custom]
    assert [id(p) for p in model.parameters()] == params
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    _assert_same_forward_backward(model, ref, torch.randn(3, 7, 8, device=DEVICE))


def test_swap_the_module_itself():
    norm = nn.LayerNorm(16)
    assert type(swap_layer_norms(norm)) is LayerNorm


def test_swap_hugging_face_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32,
        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    config._attn_implementation = "eager"
    model = transformers.GPT2LMHeadModel(config).to(DEVICE).eval()
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)
    ref = copy.deepcopy(model)
    params = [id(p) for p in model.parameters()]

    swap_layer_norms(model)
    assert sum(type(m) is LayerNorm for m in model.modules()) == 5  # ln_1, ln_2 per layer, ln_f
    assert not any(type(m) is nn.LayerNorm for m in model.modules())
    assert [id(p) for p in model.parameters()] == params
    ids = torch.randint(0, 100, (2, 16), device=DEVICE)
    _assert_same_forward_backward(model, ref, ids, atol=1e-4)
