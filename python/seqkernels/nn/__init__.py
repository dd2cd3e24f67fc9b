"""Drop-in modules with the constructors, parameters, state_dict keys and forward signatures of torch.nn."""

from .rnn import LSTM, RNN, LSTMCell, RNNCell, convert

__all__ = ["LSTM", "LSTMCell", "RNN", "RNNCell", "convert"]
