"""Drop-in modules with the constructors, parameters, state_dict keys and forward signatures of torch.nn."""

from .attention import MultiheadAttention
from .convert import convert
from .rnn import LSTM, RNN, LSTMCell, RNNCell

__all__ = ["LSTM", "LSTMCell", "MultiheadAttention", "RNN", "RNNCell", "convert"]
