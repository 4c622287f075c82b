"""The hand-written gate equations are nn.LSTM, step by step, over the same weights."""

import pytest
import torch
from torch import nn

from streamlstm.model.cell import layer_weights, lstm_step


@pytest.mark.parametrize("input_size,hidden_size,num_layers,batch", [
    (1, 8, 1, 1), (3, 16, 1, 7), (5, 32, 3, 4), (2, 64, 3, 33), (7, 128, 1, 16),
])
def test_hand_written_step_equals_nn_lstm(input_size, hidden_size, num_layers, batch):
    torch.manual_seed(hidden_size + num_layers)
    lstm = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True)
    x = torch.randn(batch, 12, input_size)
    h0 = torch.randn(num_layers, batch, hidden_size)
    c0 = torch.randn(num_layers, batch, hidden_size)
    with torch.no_grad():
        expected, (h_end, c_end) = lstm(x, (h0, c0))
        layers = layer_weights(lstm)
        h, c = h0, c0
        for t in range(x.shape[1]):
            h, c = lstm_step(x[:, t], h, c, layers)
            torch.testing.assert_close(h[-1], expected[:, t], atol=1e-5, rtol=0)
    torch.testing.assert_close(h, h_end, atol=1e-5, rtol=0)
    torch.testing.assert_close(c, c_end, atol=1e-5, rtol=0)


@pytest.mark.parametrize("weight_scale", [1.0, 3.0])
def test_errors_do_not_grow_over_a_long_sequence(weight_scale):
    """3 000 steps, weights at PyTorch's initial scale and 3x it: the step's float32 rounding (its own
    matmul order, NumPy's tanh on the CPU) stays ~1e-6 of nn.LSTM's instead of adding up step by step."""
    torch.manual_seed(1)
    lstm = nn.LSTM(3, 64, 2, batch_first=True)
    with torch.no_grad():
        for weight in lstm.parameters():
            weight.mul_(weight_scale)
        x = torch.randn(16, 3000, 3) * 3
        expected, _ = lstm(x)
        layers = layer_weights(lstm)
        h = c = torch.zeros(2, 16, 64)
        worst = 0.0
        for t in range(x.shape[1]):
            h, c = lstm_step(x[:, t], h, c, layers)
            worst = max(worst, (h[-1] - expected[:, t]).abs().max().item())
    assert worst < 2e-6


def test_step_detects_a_wrong_gate_order():
    """The comparison above could fail: swapping two gates' weights changes the output."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 8, 1)
    layers = layer_weights(lstm)
    w = layers[0]
    swapped = [w._replace(w_ih=torch.cat([w.w_ih[8:16], w.w_ih[:8], w.w_ih[16:]]))]
    x, h, c = torch.randn(2, 3), torch.zeros(1, 2, 8), torch.zeros(1, 2, 8)
    assert not torch.allclose(lstm_step(x, h, c, layers)[0], lstm_step(x, h, c, swapped)[0], atol=1e-5)
