"""Dataset-scale scoring in one process: the same numbers as grad_dot / grad_norm_sq batch by batch
(and the float64 oracle), whatever form the data comes in; refusals and non-finite handling."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

import iwd_fast
from iwd_fast.networks import build_network
from iwd_fast.scoring.dataset import score_dataset

N, B = 45, 8


class Items(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def setup(dtype=torch.float32):
    torch.manual_seed(3)
    net = build_network("convnet", 1, 5, (8, 8), width=6, depth=2).to(dtype)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, 1, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 5, (N,), generator=g)
    return net, x, y


def forwards(net):
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    return calls


def held_direction(net, x, y, held, scale=1.0):
    params = [p for p in net.parameters()]
    loss = F.cross_entropy(net(x[held]), y[held], reduction="sum") / len(held)
    return [scale * g for g in torch.autograd.grad(loss, params)]


def test_validation_scores_are_grad_dot_batch_by_batch_and_match_the_oracle():
    net, x, y = setup(torch.float64)
    held = torch.arange(0, N, 5)
    r = score_dataset(net, (x, y), "validation", validation=held, scale=0.5, batch_size=B, impl="torch")
    assert r.scores.shape == (N,) and r.scores.dtype == torch.float64 and not r.nonfinite.numel()
    assert torch.equal(r.validation_positions, held)
    net.eval()
    v = held_direction(net, x, y, held, 0.5)
    per_batch = torch.cat([iwd_fast.grad_dot(net, x[s:s + B], y[s:s + B], v, impl="torch") for s in range(0, N, B)])
    torch.testing.assert_close(r.scores, per_batch, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r.scores, iwd_fast.grad_dot(net, x, y, v, impl="reference"), rtol=1e-9, atol=1e-12)


def test_self_target_streams_norms_and_matches_the_oracle():
    net, x, y = setup(torch.float64)
    r = score_dataset(net, (x, y), "self", batch_size=B)
    torch.testing.assert_close(r.scores, iwd_fast.grad_norm_sq(net.eval(), x, y, impl="reference"), rtol=1e-9, atol=0)


def test_every_data_form_gives_bitwise_the_same_scores():
    net, x, y = setup()
    held = list(range(0, N, 4))
    forms = {"tensors": (x, y), "tensordataset": TensorDataset(x, y), "dataset": Items(x, y),
             "loader": DataLoader(Items(x, y), batch_size=B), "workers": DataLoader(Items(x, y), batch_size=B,
                                                                                    num_workers=1)}
    results = {k: score_dataset(net, d, "validation", validation=held, batch_size=B).scores for k, d in forms.items()}
    for k, s in results.items():
        assert torch.equal(s, results["tensors"]), k
    with pytest.raises(ValueError, match="shuffles"):
        score_dataset(net, DataLoader(Items(x, y), batch_size=B, shuffle=True), "self")


def test_direction_target_k_directions_from_a_file(tmp_path):
    net, x, y = setup(torch.float64)
    g = torch.Generator().manual_seed(1)
    dirs = [{n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in net.named_parameters()} for _ in range(3)]
    torch.save(dirs, tmp_path / "v.pt")
    r = score_dataset(net, (x, y), "direction", directions=str(tmp_path / "v.pt"), batch_size=B)
    assert r.scores.shape == (N, 3)
    torch.testing.assert_close(r.scores, iwd_fast.grad_dot(net.eval(), x, y, dirs, impl="reference"),
                               rtol=1e-9, atol=1e-12)
    aligned = list(dirs[0].values())  # a tuple as torch.autograd.grad returns it
    one = score_dataset(net, (x, y), "direction", directions=aligned, batch_size=B)
    torch.testing.assert_close(one.scores, r.scores[:, 0], rtol=1e-12, atol=1e-14)


def test_out_folder_reports_a_finished_run_and_refuses_another(tmp_path):
    net, x, y = setup()
    out = tmp_path / "run"
    first = score_dataset(net, (x, y), "self", out=out, batch_size=B, chunk_batches=2)
    assert (out / "scores.pt").is_file() and not any((out / "chunks").iterdir())
    calls = forwards(net)
    again = score_dataset(net, (x, y), "self", out=out, batch_size=B, chunk_batches=2)
    assert again.already_complete and torch.equal(again.scores, first.scores) and not calls
    assert again.checksum == first.checksum
    with pytest.raises(ValueError, match="another scoring run \\(target: 'self' there vs 'validation' now"):
        score_dataset(net, (x, y), "validation", validation=[0, 1], out=out, batch_size=B)
    with torch.no_grad():
        net.classifier.bias.add_(1.0)
    with pytest.raises(ValueError, match="refusing to mix runs"):
        score_dataset(net, (x, y), "self", out=out, batch_size=B, chunk_batches=2)
    with pytest.raises(ValueError, match="another scoring run \\(batch_size"):
        score_dataset(setup()[0], (x, y), "self", out=out, batch_size=B + 1, chunk_batches=2)


def test_nonfinite_inputs_named_before_any_work_or_skipped_with_weight_zero():
    net, x, y = setup()
    x[[3, 17]] = float("nan")
    x[30, 0, 0, 0] = float("inf")
    calls = forwards(net)
    with pytest.raises(ValueError, match=r"non-finite inputs \(NaN or Inf\) at dataset positions \[3, 17, 30\]"):
        score_dataset(net, (x, y), "self", batch_size=B)
    assert not calls
    with pytest.raises(ValueError, match=r"dataset positions \[3\]; pass nonfinite='skip'"):
        score_dataset(net, Items(x, y), "self", batch_size=B)  # a dataset: found in its batch, before its forward
    r = score_dataset(net, Items(x, y), "self", batch_size=B, nonfinite="skip")
    assert r.nonfinite.tolist() == [3, 17, 30]
    assert torch.isnan(r.scores[[3, 17, 30]]).all() and torch.isfinite(r.scores[[0, 1, 2, 4, 44]]).all()
    clean = score_dataset(net, (torch.nan_to_num(x, nan=0.0, posinf=0.0), y), "self", batch_size=B).scores
    keep = torch.ones(N, dtype=torch.bool)
    keep[[3, 17, 30]] = False
    torch.testing.assert_close(r.scores[keep], clean[keep], rtol=1e-5, atol=1e-7)


def test_bad_labels_impl_and_targets_refused_before_any_work():
    net, x, y = setup()
    bad = y.clone()
    bad[[4, 40]] = 9
    calls = forwards(net)
    with pytest.raises(ValueError, match=r"labels outside \[0, 5\) at dataset positions \[4, 40\]"):
        score_dataset(net, (x, bad), "self", batch_size=B)
    with pytest.raises(ValueError, match=r"labels outside \[0, 5\) at dataset positions \[40\]"):
        score_dataset(net, Items(x, bad.clamp(max=4).index_put_((torch.tensor([40]),), torch.tensor(7))), "self",
                      batch_size=B)
    calls.clear()
    with pytest.raises(iwd_fast.ImplUnavailableError, match="impl='cuda' cannot run"):
        score_dataset(net, (x, y), "self", impl="cuda")
    with pytest.raises(ValueError, match="float32 of shape"):
        score_dataset(net, (x, y.float()), "self")
    with pytest.raises(ValueError, match="needs validation="):
        score_dataset(net, (x, y), "validation")
    with pytest.raises(ValueError, match=r"validation positions outside \[0, 45\) at entries \[1\]"):
        score_dataset(net, (x, y), "validation", validation=[0, 45])
    with pytest.raises(ValueError, match="target must be one of"):
        score_dataset(net, (x, y), "explicit")
    with pytest.raises(ValueError, match="nonfinite must be"):
        score_dataset(net, (x, y), "self", nonfinite="ignore")
    assert len(calls) <= 1  # at most the label probe (one forward of two items) ran


def test_model_mode_is_restored_and_train_mode_batchnorm_needs_jvp():
    torch.manual_seed(0)
    net = build_network("convnet_bn", 1, 5, (8, 8), width=4, depth=2)
    _, x, y = setup()
    net.train()
    r = score_dataset(net, (x, y), "self", batch_size=B)  # scored in eval mode by default
    assert net.training and r.scores.shape == (N,)
    with pytest.raises(iwd_fast.UnsupportedLayerError, match="jvp"):
        score_dataset(net, (x, y), "self", batch_size=B, eval_mode=False, impl="torch")
    held = list(range(5))
    jvp = score_dataset(net, (x, y), "validation", validation=held, batch_size=B, eval_mode=False, impl="jvp")
    assert torch.isfinite(jvp.scores).all()


def test_resume_after_a_kill_between_direction_file_and_manifest(tmp_path):
    """The direction file is trusted by its own digest: a run killed after writing it, before the manifest
    recorded it, resumes (reading it back) instead of refusing."""
    import json

    net, x, y = setup()
    out = tmp_path / "run"
    held = list(range(0, N, 3))
    first = score_dataset(net, (x, y), "validation", validation=held, out=out, batch_size=B)
    man = json.loads((out / "manifest.json").read_text())
    man["status"] = "running"
    del man["direction_sha256"]
    (out / "manifest.json").write_text(json.dumps(man))
    (out / "scores.pt").unlink()
    calls = forwards(net)
    again = score_dataset(net, (x, y), "validation", validation=held, out=out, batch_size=B)
    assert not again.already_complete and torch.equal(again.scores, first.scores)
    assert len(calls) == 1 + -(-N // B)  # the label probe and the scoring pass: the direction was read back


def test_an_unreadable_chunk_is_scored_again_and_said_so(tmp_path):
    """A chunk file cut short (a kill while it was copied) is not silently dropped: one warning names it, and the
    resumed run's scores are bitwise the uninterrupted ones."""
    import json

    net, x, y = setup()
    out = tmp_path / "run"
    first = score_dataset(net, (x, y), "self", out=out, batch_size=B, chunk_batches=2)
    man = json.loads((out / "manifest.json").read_text())
    man["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(man))
    (out / "scores.pt").unlink()
    (out / "chunks").mkdir(exist_ok=True)
    (out / "chunks" / "000000.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.warns(RuntimeWarning, match=r"000000\.pt is unreadable .*: computing it again"):
        again = score_dataset(net, (x, y), "self", out=out, batch_size=B, chunk_batches=2)
    assert torch.equal(again.scores, first.scores)
