"""mamba-ssm / causal-conv1d kernels against FalconH1's PyTorch path, on a GPU where they import.
Skipped elsewhere (requirements-gpu.txt installs them)."""
import inspect

import pytest
import torch

mamba_ssm = pytest.importorskip("mamba_ssm")
pytest.importorskip("causal_conv1d")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from transformers.models.falcon_h1 import modeling_falcon_h1 as falcon  # noqa: E402

from models.hsa import LANDMARK, NOISE  # noqa: E402
from models.hybrid.testing import PRUNED, tiny_model  # noqa: E402

KERNELIZED = ("causal_conv1d_fn", "causal_conv1d_update", "mamba2_split_conv1d_scan_combined",
              "mamba2_selective_state_update", "mamba2_chunk_scan")


def implementation(function):
    """The function FalconH1's wrapper calls: a kernel package's, or None for the PyTorch fallback."""
    for cell in function.__closure__ or ():
        module = getattr(cell.cell_contents, "__module__", "") or ""
        if callable(cell.cell_contents) and module.startswith(("mamba_ssm", "causal_conv1d")):
            return cell.cell_contents
    return None


def torch_path(monkeypatch):
    for name in KERNELIZED:
        monkeypatch.setattr(falcon, name, inspect.unwrap(getattr(falcon, name)))


@pytest.mark.parametrize("layer_types", [None, PRUNED], ids=["hybrid", "pruned"])
def test_kernels_match_the_pytorch_path(monkeypatch, layer_types):
    assert implementation(falcon.mamba2_chunk_scan) is not None  # the kernels are what runs below
    overrides = {} if layer_types is None else dict(num_hidden_layers=6, layer_types=layer_types)
    # head_dim and state sizes the Triton kernels accept; several chunks
    model = tiny_model(seed=0, hidden_size=64, mamba_d_ssm=128, mamba_n_heads=4, mamba_d_state=16,
                       mamba_chunk_size=16, **overrides).cuda()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 119, (2, 50), generator=gen).cuda()
    roles = torch.randint(0, 3, (2, 50), generator=gen).cuda()
    roles[:, -1] = LANDMARK

    def run():
        with torch.no_grad():
            logits = model.eval()(ids, semantic_ids=roles).logits
            out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
                                 return_dict_in_generate=True)
        model.train()
        loss = model(ids, semantic_ids=roles, labels=ids).loss
        loss.backward()
        grad = model.model.layers[0].mamba.in_proj.weight.grad.clone()
        model.zero_grad()
        with torch.no_grad():  # no mask: the fused training kernel (mamba_split_conv1d_scan_combined)
            plain = model(ids, labels=ids).loss
        return logits, torch.stack(out.scores), loss.detach(), grad, plain

    kernel = run()
    torch_path(monkeypatch)
    reference = run()
    keep = roles != NOISE
    torch.testing.assert_close(kernel[0][keep], reference[0][keep], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(kernel[1], reference[1], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(kernel[2], reference[2], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(kernel[3], reference[3], atol=1e-3, rtol=5e-2)
    torch.testing.assert_close(kernel[4], reference[4], atol=2e-3, rtol=2e-3)
