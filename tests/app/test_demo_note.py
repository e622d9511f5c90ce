"""The demo says when IWD's lead comes from its initial images rather than from the distillation."""
from iwd_fast.app.demo import _initial_images_note


def _rows(iwd_pairs, base_pairs):
    """(init_accuracy, accuracy) pairs -> demo rows."""
    return ([{"weighting": "iwd (auto, init trusted)", "init_accuracy": i, "accuracy": a} for i, a in iwd_pairs]
            + [{"weighting": "none", "init_accuracy": i, "accuracy": a} for i, a in base_pairs])


def test_a_distillation_that_barely_moves_its_trusted_start_is_named():
    # the digits demo at the demo budget: IWD 93.7 -> 92.4 and 92.3 -> 93.2, unweighted 66.9 -> 88.2, 77.3 -> 90.6
    note = _initial_images_note(_rows([(0.937, 0.924), (0.923, 0.932)], [(0.669, 0.882), (0.773, 0.906)]))
    assert "gain -0.2 points over their own initial images (unweighted: +17.3)" in note
    assert "trusted initial images" in note


def test_no_note_when_the_distillation_gains():
    # Fashion-MNIST demo: IWD 74.1 -> 75.4 and 73.8 -> 75.1 (+1.3 each)
    assert _initial_images_note(_rows([(0.741, 0.754), (0.738, 0.751)], [(0.601, 0.667), (0.633, 0.694)])) == ""
