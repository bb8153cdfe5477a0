import numpy as np

from allmil_cli.stages.crops import CROP_SIZE, crop_cells
from allmil_cli.stages.scale import CROP_RBC_RATIO


def test_crop_is_centred_and_scaled():
    rgb = np.zeros((400, 500, 3), np.uint8)
    rgb[190:211, 240:261] = 255  # a 21 px white square centred at (250, 200)
    crop = crop_cells(rgb, np.array([[250.0, 200.0]]), rbc_px=70 / CROP_RBC_RATIO)  # 70 px window
    assert crop.shape == (1, CROP_SIZE, CROP_SIZE, 3)
    ys, xs = np.nonzero(crop[0, ..., 0] > 128)
    assert abs(xs.mean() - CROP_SIZE / 2) < 3 and abs(ys.mean() - CROP_SIZE / 2) < 3
    assert 60 < xs.max() - xs.min() < 75  # 21 px of 70 -> ~67 px of 224


def test_edge_cells_are_padded_by_replication():
    rgb = np.full((100, 100, 3), 7, np.uint8)
    rgb[:, :5] = 200
    crop = crop_cells(rgb, np.array([[0.0, 50.0], [99.0, 99.0], [-500.0, 50.0]]), rbc_px=20)
    assert crop.shape[0] == 3
    assert crop[0, 112, 0, 0] == 200  # left half replicated from the bright edge column
    assert crop[1, 200, 200, 0] == 7
    assert crop[2].min() >= 7
