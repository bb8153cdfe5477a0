import math

from allmil_cli.stages.metrics import binary_metrics, roc_auc


def test_binary_metrics_match_hand_computation():
    y = [1, 1, 1, 1, 0, 0, 0]
    p = [1, 1, 1, 0, 1, 0, 0]
    m = binary_metrics(y, p)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 1, 2)
    assert math.isclose(m["accuracy"], 5 / 7)
    assert math.isclose(m["sensitivity"], 0.75) and math.isclose(m["specificity"], 2 / 3)
    assert math.isclose(m["f1"], 6 / 8)


def test_roc_auc():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))
